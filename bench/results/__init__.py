"""results.json: one plain, versioned JSON file per run.

Its definition is the typed model in :mod:`bench.results.model` (writers build a
:class:`~bench.results.model.Results`, readers get one from
:func:`~bench.results.model.read_results`); this module holds the version, the
environment every run records, and the atomic write.

Schema changelog (bump ``SCHEMA_VERSION`` on every change, note it here and in
``docs/results.md``):

1. First version: scenario, environment, one variant with config, ledger,
   throughput, latency_ms (end_to_end, send_lag), probes.flush, publisher.
2. One entry per matrix variant; probes.lock, probes.append_cost,
   probes.queue_depth, probes.loop_lag_ms, probes.overhead;
   throughput.sink_rows_per_s (throughput.wall_s removed); sql; faults;
   pipeline.dropped_by_reason and refused_after_close; latency summaries gain
   "total" (ms).
3. opcua (source statistics, security, reference), publisher.not_sent;
   ledger dropped reasons opcua_queue_overflow and server_outage.
4. validation; ledger.redelivered and quarantine_rows.
5. timeline per variant; percentile ladders in flush total_ms and lock
   wait_ms; capacity runs (kind, capacity); bench load runs (load,
   latency_ms.ack); resources.peak_rss_mb; data_bytes.
6. probes.cpu (thread CPU time: hot path per message, sinks per row); latency
   summaries' mean is exact (total / count), no longer HdrHistogram's bucket mean.
7. publisher.window and MQTT reasons in publisher.not_sent; append_cost gains
   slope_stderr_ms_per_mb, slope_ci95_ms_per_mb and slope_summary; a capacity
   variant's flush, lock and append figures cover its ledger's steps, and its
   ledger gains steps_offered_per_s; lock hold_ms leaves out condition waits.
8. environment.git_commit: the commit of the checkout the bench ran from (null
   outside a git checkout). The model (bench.results.model) is the definition;
   files of versions 1 to 7 still load through it.
9. system (kind, starts, exit codes) for a pipeline run as a process of its
   own; fault_events (kind, at_s, recovered_s, error); ledger dropped reasons
   process_kill and process_restart (losses a configuration that is not
   crash-safe does not promise to avoid).
10. fault_events gain what each fault cost: duration_s, expected_loss, named,
    lost, duplicated, latency_ms (p50, p99, max of the messages intended in its
    window) with latency_kind, detail; variants gain unreadable_files (Parquet
    files the read-back could not open, skipped and named instead of ending the
    run); failures at the top level (variants that could not run to their
    ledger, beside those that did). Version 9's fault events get expected_loss
    and the counts its ledger settles when read (model._account_v9_fault_events).
11. truth per variant of an external system (what its output shows per truth
    label, and the findings); ledger.not_persisted_expected and
    not_persisted_by_truth (bad input it left out, set aside from lost).
12. the other pipeline shapes' own parts of a variant (bench/shapes/): recompute
    (staleness, recompute cost against series length, the oracle), forward
    (delivered, lost by fault, duplicates upstream, left in the outbox) and
    windows (mismatches against the oracle, late, drops by policy, memory and
    CPU per tick against window length).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.probes import Recorder

if TYPE_CHECKING:
    from bench.results.model import Results

SCHEMA_VERSION = 14
PACKAGES = (
    "iiot-bench",
    "asyncua",
    "amqtt",
    "paho-mqtt",
    "pyarrow",
    "SQLAlchemy",
    "pydantic",
    "PyYAML",
    "hdrhistogram",
    "rich",
    "jinja2",
    "matplotlib",
    "numpy",
    "locust",
)
# Latency histograms: one implementation, shared with the pipeline's probes.
LatencyRecorder = Recorder
# The checkout the bench package lives in: bench/results/__init__.py -> the project root.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
GIT_TIMEOUT_S = 5
_SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")


def environment() -> dict[str, Any]:
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "host_load": list(load) if load else None,
        "packages": packages,
        "git_commit": git_commit(),
    }


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """The commit checked out at ``root`` (the bench's own checkout), or None when ``root`` is no git checkout.

    Read from ``.git`` itself (a few small files: no process, no git needed); git is asked only when the
    repository keeps its refs in a form this does not read (reftable). An installed bench (site-packages) has
    no ``.git`` beside it and records None rather than the commit of whatever repository encloses it.
    """
    dot_git = root / ".git"
    if not dot_git.exists():
        return None
    try:
        found = _read_head(dot_git)
    except (OSError, UnicodeDecodeError, ValueError):
        found = None
    return found if found is not None else _ask_git(root)


def _read_head(dot_git: Path) -> str | None:
    git_dir = dot_git
    if dot_git.is_file():  # a worktree or a submodule: "gitdir: <path>"
        pointer = dot_git.read_text(encoding="utf-8").strip()
        if not pointer.startswith("gitdir:"):
            return None
        git_dir = (dot_git.parent / pointer.removeprefix("gitdir:").strip()).resolve()
    head = (git_dir / "HEAD").read_text(encoding="utf-8").strip()
    if not head.startswith("ref:"):
        return head if _SHA.fullmatch(head) else None  # detached
    ref = head.removeprefix("ref:").strip()
    # A worktree keeps its HEAD; branches live in the repository it shares ("commondir").
    common = git_dir
    if (git_dir / "commondir").is_file():
        common = (git_dir / (git_dir / "commondir").read_text(encoding="utf-8").strip()).resolve()
    for base in (git_dir, common):
        loose = base / ref
        if loose.is_file():
            sha = loose.read_text(encoding="utf-8").strip()
            return sha if _SHA.fullmatch(sha) else None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(encoding="utf-8").splitlines():
            sha, _, name = line.partition(" ")
            if name == ref and _SHA.fullmatch(sha):
                return sha
    return None


def _ask_git(root: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--verify", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = done.stdout.strip()
    return sha if done.returncode == 0 and _SHA.fullmatch(sha) else None


def write_results(path: Path, results: Results | Mapping[str, Any]) -> None:
    """Write results.json atomically: a temporary file beside it, then a rename.

    A :class:`~bench.results.model.Results` is written as built (keys a writer left unset stay out); a plain
    mapping as given, while writers move to the model.
    """
    data = results if isinstance(results, Mapping) else results.to_json()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
