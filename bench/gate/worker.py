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


def hello() -> dict[str, Any]:
    import bench.cli  # noqa: F401  (the command the replicates run; imports bench, pipeline, simulators)
    import pipeline
    import simulators  # noqa: F401

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


def pin() -> int | None:
    """Pin this process (every thread it starts inherits it) to the CPU named in ``BENCH_GATE_CPU``.

    Why: the pipeline's threads take turns on the GIL; spread over two cores, the cache lines they share move
    between the cores at every turn, and the flusher's CPU time per row varied 10-12% from run to run (5% on
    one core); the hot path 2% (0.5%). Both sides' workers are pinned to the same CPU and never run at once.
    """
    wanted = os.environ.get("BENCH_GATE_CPU")
    if not wanted or not hasattr(os, "sched_setaffinity"):
        return None
    os.sched_setaffinity(0, {int(wanted)})
    return int(wanted)


def main() -> None:
    # Replies go out on a private copy of stdout; fd 1 and 2 then belong to each replicate's log.
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    try:
        cpu = pin()
        info = {**hello(), "cpu": cpu}
    except BaseException as exc:
        proto_out.write(json.dumps({"error": f"cannot import the bench: {exc!r}", "sys_path": sys.path}) + "\n")
        proto_out.flush()
        raise SystemExit(1) from None
    proto_out.write(json.dumps({"hello": info}) + "\n")
    proto_out.flush()
    serve(proto_out)


if __name__ == "__main__":
    main()
