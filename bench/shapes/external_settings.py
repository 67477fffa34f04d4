"""A user's pipeline of one of the other shapes, run beside the built-in strategies (``<shape>.external``).

Imports pydantic and ``pipeline.config`` only, so ``bench.scenario`` can import it without a cycle.

The contract every shape shares: the bench starts the command, writes the stream to its standard input as JSON
lines (the same bytes the built-in strategies get, one reading a line, at their intended send times), and closes
its standard input after the last one; what the pipeline produces is read back the shape's own way (recompute:
its HTTP read API; forward: what reached the bench's upstream; windows: the window values it writes).
"""

from __future__ import annotations

import re
import shlex
import string

from pydantic import Field, model_validator

from pipeline.config import Duration, Frozen

SHAPE_PLACEHOLDERS = ("dir", "port", "url", "python", "upstream_url", "seed")
"""What the bench fills into a shape pipeline's command and environment:

- ``{dir}``: the variant's own folder (absolute), for its files;
- ``{port}`` / ``{url}``: a free TCP port on 127.0.0.1 the bench picked, and ``http://127.0.0.1:{port}``;
- ``{python}``: the interpreter running the bench;
- ``{upstream_url}``: forward only, the bench's upstream server;
- ``{seed}``: the scenario's seed."""


def check_placeholders(value: str, where: str, allowed: tuple[str, ...] = SHAPE_PLACEHOLDERS) -> str:
    """``value`` unchanged, or a ValueError naming ``where``, the unknown placeholder and the ``allowed`` ones."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as exc:
        raise ValueError(f"{where}: {exc} (write {{{{ and }}}} for literal braces)") from None
    unknown = sorted(names - set(allowed))
    if unknown:
        raise ValueError(
            f"{where}: unknown placeholder {{{unknown[0]}}}; expected one of " + ", ".join(f"{{{p}}}" for p in allowed)
        )
    return value


class ShapeReady(Frozen):
    """How the bench knows the pipeline is ready; absent: as soon as it started (its standard input buffers)."""

    log: str | None = Field(None, description="A regular expression its stdout or stderr prints once ready.")
    http: str | None = Field(
        None,
        description="A path, e.g. /status: ready once GET http://127.0.0.1:{port}<path> answers at all (any status).",
    )
    file: str | None = Field(None, description="A file that appears once ready (placeholders allowed).")
    timeout: Duration = Field(30.0, gt=0, description="How long to wait before giving up with its last output.")

    @model_validator(mode="after")
    def _one_signal(self) -> ShapeReady:
        given = [k for k in ("log", "http", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"expected exactly one of log, http or file, got {', '.join(given) or 'none'}")
        if self.log is not None:
            try:
                re.compile(self.log)
            except re.error as exc:
                raise ValueError(f"log: not a regular expression: {exc}") from None
        if self.http is not None and not self.http.startswith("/"):
            raise ValueError(f"http: expected a path starting with /, got {self.http!r}")
        if self.file is not None:
            check_placeholders(self.file, "file")
        return self


class ShapeExternal(Frozen):
    """A pipeline the user brings, of the same shape as the section it is listed in."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Its column in the summary (unique among variants)."
    )
    command: tuple[str, ...] | str = Field(
        description="What to run: a list of arguments, or one string split like a shell would (no shell runs). "
        "Placeholders: " + ", ".join(f"{{{p}}}" for p in SHAPE_PLACEHOLDERS) + "."
    )
    cwd: str | None = Field(None, description="Working directory, relative to the scenario file.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables (placeholders allowed).")
    ready: ShapeReady | None = Field(None, description="How the bench knows it is ready; absent: once started.")
    stop_timeout: Duration = Field(
        15.0,
        gt=0,
        description="After its standard input closes, how long it may take to finish and exit before SIGTERM "
        "(then SIGKILL 5 s later).",
    )

    @model_validator(mode="after")
    def _placeholders(self) -> ShapeExternal:
        args = self.argv()
        if not args:
            raise ValueError("command: expected a program to run, got nothing")
        for i, arg in enumerate(args):
            check_placeholders(arg, f"command[{i}]")
        for key, value in self.env.items():
            check_placeholders(value, f"env.{key}")
        return self

    def argv(self) -> list[str]:
        return shlex.split(self.command) if isinstance(self.command, str) else list(self.command)
