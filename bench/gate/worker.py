"""A worker process for ``bench gate``: runs ``bench run`` replicates for one side of a gate.

Started by path, never imported by the gate: ``python -P /path/to/gate_worker.py`` with ``PYTHONPATH`` set to
the code of its side (a worktree of the baseline revision, or the candidate's checkout). ``-P`` keeps the working
directory off ``sys.path``: ``python -m`` would put it first, ahead of ``PYTHONPATH``, so a gate started from
the candidate's checkout would import the candidate's code for the baseline too. Standard library only, and
nothing of the bench is imported before ``sys.path`` is final, so this file works with any revision's code.

Protocol, one JSON object per line: the worker first writes ``{"hello": ...}`` (which files it imported
``bench``, ``pipeline`` and ``simulators`` from, the git commit there, its interpreter); then for every line
``{"argv": [...], "log": PATH}`` on stdin it runs ``bench.cli.main(argv)`` in this process, with stdout and
stderr going to ``log``, and answers ``{"exit_code": N, "seconds": S, "cpu_s": C, "modules": {...}}``.
The gate sends one replicate per worker: two processes of the same code differ by a few percent (memory
layout), and a worker kept for one side would turn that into a bias between the sides (docs/gates.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PACKAGES = ("bench", "pipeline", "simulators")


def modules() -> dict[str, str | None]:
    """Where each package of the bench was imported from (its ``__init__.py``), as loaded in this process."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        out[name] = None if file is None else str(Path(file).resolve())
    return out


def git_commit(folder: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


PRELOAD = ("bench.harness.runner",)
"""Modules a replicate imports on its way (``bench run`` loads the harness lazily), imported by :func:`hello`
instead, where it may overlap the previous replicate; a revision without one of them simply skips it."""


def hello() -> dict[str, Any]:
    import importlib

    import bench.cli  # noqa: F401  (the command the replicates run; imports bench, pipeline, simulators)
    import pipeline
    import simulators  # noqa: F401

    for name in PRELOAD:
        # An older revision laid out otherwise lacks one: its replicates import what they need themselves.
        with contextlib.suppress(Exception):
            importlib.import_module(name)

    mods = modules()
    root = Path(pipeline.__file__).resolve().parent.parent
    return {
        "pid": os.getpid(),
        "python": sys.executable,
        "version": sys.version.split()[0],
        "modules": mods,
        "root": str(root),
        "commit": git_commit(root),
        "sys_path0": sys.path[0] if sys.path else None,
    }


def serve(proto_out: Any) -> None:
    import bench.cli

    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        # Started ahead of its turn, the worker imported on the other CPUs; the replicate runs on the gate's.
        pin("BENCH_GATE_CPU")
        log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        started, cpu0 = time.monotonic(), time.process_time()
        try:
            code = bench.cli.main(list(request["argv"]))
        except SystemExit as exc:  # argparse on a bad argument
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException as exc:  # a replicate that crashes must not take the worker with it
            print(f"gate worker: replicate crashed: {exc!r}", file=sys.stderr)
            code = -1
        sys.stdout.flush()
        sys.stderr.flush()
        reply = {
            "exit_code": code,
            "seconds": round(time.monotonic() - started, 3),
            "cpu_s": round(time.process_time() - cpu0, 3),
            "modules": modules(),
        }
        proto_out.write(json.dumps(reply) + "\n")
        proto_out.flush()


def pin(variable: str) -> set[int] | None:
    """Pin this process, every thread it has and every one it starts, to the CPUs listed in ``variable``
    (comma-separated): ``BENCH_GATE_CPU`` for the replicate, ``BENCH_GATE_IMPORT_CPUS`` for the imports of a
    worker started while another replicate runs on the gate's CPU.

    Why one CPU for the replicate: the pipeline's threads take turns on the GIL; spread over two cores, the
    cache lines they share move between the cores at every turn, and the flusher's CPU time per row varied
    10-12% from run to run (5% on one core); the hot path 2% (0.5%). Both sides' workers are pinned to the same
    CPU and never run a replicate at once.
    """
    wanted = os.environ.get(variable)
    if not wanted or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = {int(c) for c in wanted.split(",")}
    # sched_setaffinity(0) sets the calling thread only: a thread an import started keeps its own otherwise.
    tasks = Path("/proc/self/task")
    for tid in [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cpus)
    return cpus


def main() -> None:
    # Replies go out on a private copy of stdout; fd 1 and 2 then belong to each replicate's log.
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    try:
        pin("BENCH_GATE_IMPORT_CPUS")
        cpu = os.environ.get("BENCH_GATE_CPU")
        info = {**hello(), "cpu": int(cpu) if cpu else None}
    except BaseException as exc:
        proto_out.write(json.dumps({"error": f"cannot import the bench: {exc!r}", "sys_path": sys.path}) + "\n")
        proto_out.flush()
        raise SystemExit(1) from None
    proto_out.write(json.dumps({"hello": info}) + "\n")
    proto_out.flush()
    serve(proto_out)


if __name__ == "__main__":
    main()
