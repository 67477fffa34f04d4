"""``bench gate`` and ``bench compare``: is the candidate slower than the baseline, beyond noise and tolerance?

Two designs (docs/gates.md says when each one can be trusted):

- **A/B in one job** (``--baseline self``, a git revision, or ``python:/path/to/python``): the baseline
  and the candidate run as separate ``bench run`` processes, interleaved A B B A A B ..., on the same
  machine, so slow drift of the machine hits both alike; each metric is judged on the per-pair ratios
  (geometric mean, bootstrap interval, Wilcoxon signed-rank test).
- **Stored baseline** (``--baseline DIR`` written earlier by ``--save-baseline DIR``): only the candidate
  runs now; time metrics are divided by a fixed reference workload timed just before each replicate, so a
  machine that is uniformly slower today is not a regression (Mann-Whitney test, bootstrap interval).

For an external system (``system.kind: external``) both sides run this bench and differ in the user's pipeline:
a revision of the repository holding its cwd (a worktree), or another command (``--baseline-command``); it is
judged on its process tree's CPU and memory and on end-to-end latency, and the built-in pipeline's in-process
metrics are "not applicable" (docs/gates.md).

The gated time metrics form one family: Holm's step-down keeps the chance of any false alarm at
1 - confidence. Deterministic counters are compared exactly (or with their own tolerance) and any lost
message fails the gate whatever the timings say; service-level bounds apply to the candidate's worst
replicate.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bench.errors import Inconclusive, ScenarioError, UsageError
from bench.gate import stats as gate_stats
from bench.gate import worker as gate_worker
from bench.harness.runner import make_run_dir
from bench.results import environment
from bench.results.metrics import (
    BUILT_IN_COUNTERS,
    COUNTERS,
    GATE_METRICS,
    CounterName,
    MetricName,
    counter_value,
    system_kind,
)
from bench.results.model import ScenarioRef, Variant, read_results
from bench.scenario import ExternalSystem, GateMetric, GateSettings, LoadedScenario
from pipeline.config import format_validation_error

GATE_SCHEMA = 2
BASELINE_FILE = "baseline.json"
# Time metrics are divided by the reference workload in the stored-baseline design; these are not wall times.
# The reference is a wall-time workload; thread CPU time already leaves out the waiting a busy machine adds.
NOT_TIMES = frozenset(
    {"peak_rss_mb", "hot_path_cpu_us", "sink_cpu_us_per_row", "system_cpu_s_per_1k", "system_peak_rss_mb"}
)
REPLICATE_TIMEOUT_S = 600
WORKER_START_TIMEOUT_S = 120


@dataclass(frozen=True)
class GateOptions:
    baseline: str
    out: Path | None = None
    replicates: int | None = None
    inject_slowdown: float | None = None
    """The candidate's storage made this fraction slower (slow_sink factor): a known regression, to test the gate."""
    save_baseline: Path | None = None
    confidence: float | None = None
    reports_dir: Path = Path("reports")
    seed: int = 0
    baseline_command: str | None = None
    """system.kind external: the baseline runs the scenario with system.external.command replaced by this."""


@dataclass(frozen=True)
class Replicate:
    side: str  # "A" or "B"
    index: int
    run_dir: Path
    exit_code: int
    variant: Variant
    """The run's (first) variant, as its results.json holds it."""
    reference_ms: float | None = None
    seconds: float = 0.0
    modules: dict[str, str | None] | None = None
    """Where this replicate's process imported bench, pipeline and simulators from."""
    commit: str | None = None
    """The git commit checked out where it imported them from (None outside a git checkout)."""


@dataclass
class GateOutcome:
    gate_dir: Path
    result: dict[str, Any]
    failed: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        """passed, failed or inconclusive."""
        return str(self.result.get("outcome", "failed" if self.failed else "passed"))


EXIT_CODES = {"passed": 0, "failed": 1, "inconclusive": 3}


@dataclass(frozen=True)
class _Side:
    """The code one side of a gate runs: an interpreter, and the folder its packages must come from."""

    name: str  # "A" or "B"
    label: str
    python: str
    root: Path | None
    """Where bench, pipeline and simulators must be imported from (None: another install, not checked)."""
    pythonpath: Path | None = None
    pin: bool = True
    """Pin the worker (and so every process it starts) to one CPU. Not for an external system: the user's
    pipeline may use several threads or processes, and squeezed onto one CPU it would be measured as it never
    runs; the pinning helps the built-in pipeline's threads, which take turns on one GIL."""
    run_args: tuple[str, ...] = ()
    """More arguments for each replicate's ``bench run`` (only what every revision of that side knows)."""


def code_root() -> Path:
    """The folder holding the bench and pipeline packages this process runs: the candidate's code."""
    import pipeline

    return Path(pipeline.__file__).resolve().parent.parent


def code_digest(root: Path) -> str:
    """SHA-256 over the Python sources of bench, pipeline and simulators under ``root``: the code itself."""
    digest = hashlib.sha256()
    for package in gate_worker.PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            digest.update(str(file.relative_to(root)).encode())
            digest.update(b"\0")
            digest.update(file.read_bytes())
    return digest.hexdigest()


def gate_cpu() -> int | None:
    """The CPU both sides' workers are pinned to (bench/gate/worker.py says why): the last one this process may
    use, or none when it may use only one anyway."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[-1] if len(allowed) > 1 else None


class _Worker:
    """A ``bench run`` worker process (bench/gate/worker.py) for one side, started with ``python -P``; the gate
    starts one per replicate (:func:`_replicate` says why)."""

    def __init__(self, side: _Side, folder: Path, name: str, *, ahead: bool = False) -> None:
        """``ahead``: started while another replicate runs on the gate's CPU, so it imports on the other CPUs
        (see :func:`_interleave`); call :meth:`ready` before :meth:`run`. Otherwise ready on return."""
        self.side = side
        self.hello: dict[str, Any] = {}
        # Bytecode may be written: a new process per replicate would otherwise compile the bench every time.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
        env.update(
            BENCH_NO_REPORT="1",
            BENCH_NO_CALIBRATE="1",
            PYTHONUNBUFFERED="1",
            # One hash seed for both sides: dict and set layouts, and so their cost, do not differ by chance.
            PYTHONHASHSEED="0",
        )
        if side.pythonpath is not None:
            env["PYTHONPATH"] = str(side.pythonpath)
        cpu = gate_cpu()
        if cpu is not None and side.pin:
            env["BENCH_GATE_CPU"] = str(cpu)
            others = _spare_cpus(cpu)
            if ahead and others:
                env["BENCH_GATE_IMPORT_CPUS"] = ",".join(map(str, others))
        self.log_path = folder / f"{name}.worker.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in close())
        self._proc = subprocess.Popen(
            [side.python, "-P", str(Path(gate_worker.__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=folder,  # outside any checkout: nothing may be imported from the working directory
            text=True,
        )
        if not ahead:
            self.ready()

    def ready(self) -> None:
        """Wait for the worker's hello (its imports done) and check where it imported the bench from."""
        if self.hello:
            return
        reply = self._read(WORKER_START_TIMEOUT_S, "start")
        if "hello" not in reply:
            self.close()
            raise Inconclusive(
                f"side {self.side.name} ({self.side.label}): the worker could not import the bench: "
                f"{reply.get('error')}; sys.path {reply.get('sys_path')}"
            )
        self.hello = reply["hello"]
        self.check(self.hello["modules"])

    def check(self, modules: dict[str, str | None]) -> None:
        """The side's packages must come from its own folder; otherwise the gate would judge other code."""
        if self.side.root is None:
            return
        wrong = {
            name: file
            for name, file in modules.items()
            if file is None or not Path(file).is_relative_to(self.side.root.resolve())
        }
        if wrong:
            found = ", ".join(f"{n} from {f}" for n, f in wrong.items())
            raise Inconclusive(
                f"side {self.side.name} ({self.side.label}) imported {found}, not from {self.side.root}: "
                "the gate would not judge the code it claims to; refusing"
            )

    def _read(self, timeout_s: float, what: str) -> dict[str, Any]:
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise Inconclusive(
                f"side {self.side.name} ({self.side.label}): the gate worker "
                + ("timed out" if not ready else f"exited (code {self._proc.poll()})")
                + f" during {what}; see {self.log_path}"
            )
        reply: dict[str, Any] = json.loads(line)
        return reply

    def run(self, scenario: Path, out: Path, *, index: int, reference: bool) -> Replicate:
        ref = reference_ms() if reference else None
        argv = ["run", str(scenario), "--out", str(out), "--quiet", *self.side.run_args]
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"argv": argv, "log": str(out.parent / f"{out.name}.log")}) + "\n")
        self._proc.stdin.flush()
        reply = self._read(REPLICATE_TIMEOUT_S, f"replicate {out.name}")
        self.check(reply["modules"])
        results_path = out / "results.json"
        if not results_path.exists():
            raise Inconclusive(
                f"replicate {out.name} ({self.side.label}) wrote no results (exit code {reply['exit_code']}); "
                f"see {out}.log"
            )
        try:
            results = read_results(results_path)
        except UsageError as exc:
            # Another bench (a baseline revision, another install) wrote a file this one cannot read: no verdict.
            raise Inconclusive(f"replicate {out.name} ({self.side.label}): {exc}") from None
        return Replicate(
            self.side.name,
            index,
            out,
            int(reply["exit_code"]),
            results.variants[0],
            ref,
            float(reply["seconds"]),
            reply["modules"],
            self.hello.get("commit"),
        )

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.close()
                self._proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(10)
        self._log.close()


def reference_ms(rows: int = 20_000, batches: int = 20, trials: int = 3) -> float:
    """A fixed workload like a pipeline's flushes (Arrow batches into a Parquet file, fsync each): median ms.

    Measured right before each replicate of a stored-baseline gate, it says how fast this machine is at this
    moment at the pipeline's kind of work; time metrics are divided by it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    per = rows // batches
    table = pa.table(
        {
            "machine": pa.array([f"m-{i % 50:03d}" for i in range(per)]),
            "ts": pa.array(range(per), type=pa.int64()),
            "load_rate": pa.array([float(i % 100) for i in range(per)]),
            "mileage": pa.array([1000.0 + i for i in range(per)]),
        }
    )
    times = []
    with tempfile.TemporaryDirectory(prefix="bench-ref-") as tmp:
        for t in range(trials):
            start = time.perf_counter()
            for i in range(batches):
                path = Path(tmp) / f"ref-{t}-{i}.parquet"
                pq.write_table(table, path, compression="snappy")
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)  # as the pipeline's sink does: durable, not in the page cache
                finally:
                    os.close(fd)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


EXTERNAL_DEFAULT_METRICS: dict[MetricName, GateMetric] = {
    "system_cpu_s_per_1k": GateMetric(),
    "system_peak_rss_mb": GateMetric(),
    "e2e_p99_ms": GateMetric(),
    "e2e_p50_ms": GateMetric(gate=False),
}
"""What a gate judges for an external system when its scenario's gates: section names no metrics: the process
tree's CPU per thousand messages and peak memory (psutil), and end-to-end latency (with the tolerance widened to
the output's polling resolution, see :func:`_metric_row`)."""


def _settings(loaded: LoadedScenario, options: GateOptions) -> GateSettings:
    sc = loaded.scenario
    gates = sc.gates or GateSettings()
    if sc.matrix:
        raise ScenarioError(f"{loaded.path}: matrix: a gate compares one configuration; remove the matrix")
    kind = sc.system.kind
    if kind == "external" and "metrics" not in gates.model_fields_set:
        # The built-in defaults (flush time) do not exist for a program of the user's.
        gates = gates.model_copy(update={"metrics": dict(EXTERNAL_DEFAULT_METRICS)})
    for name in gates.bounds:
        if kind not in GATE_METRICS[name].systems:
            raise ScenarioError(
                f"{loaded.path}: gates.bounds.{name}: not measured for system.kind {kind}; "
                f"expected one of {', '.join(n for n, f in GATE_METRICS.items() if kind in f.systems)}"
            )
    if options.replicates is not None:
        gates = gates.model_copy(update={"replicates": options.replicates})
    if options.confidence is not None:
        # Every metric at the new level: a stricter run (e.g. CI's 0.999) must not keep a looser metric override.
        metrics = {k: m.model_copy(update={"confidence": None}) for k, m in gates.metrics.items()}
        gates = gates.model_copy(update={"confidence": options.confidence, "metrics": metrics})
    return gates


def _replicate_scenario(
    loaded: LoadedScenario,
    folder: Path,
    name: str,
    slowdown: float | None,
    external: dict[str, Any] | None = None,
) -> Path:
    """The scenario each replicate runs: without the gates/capacity sections (an older baseline may not know
    them), with the injected slow disk for the candidate if asked.

    The copy lives in the gate folder, so a path the scenario resolves against its own folder would move with
    it: an external system's ``cwd`` (the only such path) is written absolute, as ``external`` gives it (the
    baseline's may point into a worktree of another revision), with its ``command`` if ``external`` replaces it.
    """
    raw = yaml.safe_load(loaded.path.read_text(encoding="utf-8"))
    raw.pop("gates", None)
    raw.pop("capacity", None)
    if slowdown:
        raw["faults"] = [*raw.get("faults", []), {"kind": "slow_sink", "factor": slowdown}]
    if loaded.scenario.system.external is not None:
        section = raw["system"]["external"]
        section["cwd"] = str(_external_cwd(loaded))
        section.update(external or {})
    path = folder / f"scenario-{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _candidate_side() -> _Side:
    root = code_root()
    # A source checkout goes first on sys.path, ahead of whatever is installed; an installed bench needs none.
    return _Side("B", "candidate", sys.executable, root, root if (root / "pyproject.toml").exists() else None)


def _candidate_for(loaded: LoadedScenario) -> _Side:
    """The candidate's side for this scenario: for an external system not pinned (:class:`_Side` says why), and
    each replicate prints results.json instead of the verdict line: both sides run this bench, which knows
    ``--json``, and it spares each replicate importing the report's plotting library (2-3 s)."""
    candidate = _candidate_side()
    if loaded.scenario.system.external is None:
        return candidate
    return replace(candidate, pin=False, run_args=("--json",))


def _repo_of(root: Path) -> Path:
    """The git checkout the candidate's code lives in (or, for an installed bench, the working directory's)."""
    for where in (root, Path.cwd()):
        done = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=where, capture_output=True, text=True, check=False
        )
        if done.returncode == 0:
            return Path(done.stdout.strip())
    raise UsageError("--baseline: a git revision needs a git checkout (of the candidate or the working directory)")


def _baseline_side(spec: str, gate_dir: Path) -> tuple[_Side, dict[str, Any]]:
    if spec == "self":
        cand = _candidate_side()
        return _Side("A", "self", cand.python, cand.root, cand.pythonpath), {"kind": "self", "python": sys.executable}
    if spec.startswith("python:"):
        python = spec.removeprefix("python:")
        if not Path(python).is_file():
            raise UsageError(f"--baseline {spec}: no Python interpreter at {python}")
        return _Side("A", spec, python, None), {"kind": "installed", "python": python}
    repo = _repo_of(code_root())
    rev = spec.removeprefix("git:")  # git:REV, as for an external system: a name that is not a folder or self
    commit = _git(["rev-parse", "--verify", f"{rev}^{{commit}}"], repo, f"--baseline {spec}")
    tree = gate_dir / "baseline-src"
    _git(["worktree", "add", "--detach", "--force", str(tree), commit], repo, f"--baseline {spec}")
    side = _Side("A", f"{spec} ({commit[:10]})", sys.executable, tree.resolve(), tree.resolve())
    return side, {"kind": "git", "rev": spec, "commit": commit, "worktree": str(tree), "repo": str(repo)}


# ----------------------------------------------------------------------------- an external system's baseline


@dataclass(frozen=True)
class _ExternalBaseline:
    """What the baseline of a gate on an external system runs. Both sides run this bench (the candidate's code);
    they differ in the user's pipeline: another revision of the repository holding ``system.external.cwd`` (a
    worktree of it, made in the gate folder), another command, or neither (``--baseline self``: A/A)."""

    info: dict[str, Any]
    command: list[str] | None = None
    """The baseline's command (None: the scenario's)."""
    repo: Path | None = None
    commit: str | None = None
    relative_cwd: Path | None = None
    """``system.external.cwd`` relative to ``repo``: where the baseline runs inside the worktree."""


def _external_cwd(loaded: LoadedScenario) -> Path:
    """The external system's working directory as ``bench run`` resolves it: relative to the scenario's folder."""
    spec = loaded.scenario.system.external
    assert spec is not None
    folder = loaded.path.parent
    return (folder / spec.cwd).resolve() if spec.cwd else folder.resolve()


def _external_plan(loaded: LoadedScenario, options: GateOptions) -> _ExternalBaseline:
    """Check what the baseline of an external system is to be, before anything runs; a mistake is a one-line
    :class:`UsageError` naming the option."""
    spec = loaded.scenario.system.external
    assert spec is not None
    baseline = options.baseline
    if options.inject_slowdown is not None:
        raise UsageError(
            "--inject-slowdown: slows the built-in pipeline's storage, which an external system does not use; "
            "gate a slower command with --baseline-command CMD or a revision with --baseline REV"
        )
    if baseline.startswith("python:"):
        raise UsageError(
            f"--baseline {baseline}: for system.kind external both sides run this bench; expected "
            "--baseline REV (a revision of your pipeline's repository), --baseline-command CMD, self or a folder"
        )
    _refuse_shared_output(spec, loaded.path)
    if _is_stored(Path(baseline)):
        if options.baseline_command is not None:
            raise UsageError(f"--baseline-command: cannot be combined with the stored baseline {baseline}")
        return _ExternalBaseline({"kind": "stored"})
    command = None if options.baseline_command is None else _baseline_command(spec, options.baseline_command)
    if spec.attach and (command is not None or baseline != "self"):
        raise UsageError(
            f"--baseline {baseline}: {loaded.path}: system.external.attach is true: the bench does not start that "
            "system, so it cannot start a baseline of it; gate a system the bench starts (command)"
        )
    same_command = command is None or command == spec.argv()
    cwd = _external_cwd(loaded)
    if baseline == "self":
        if command is None:
            info: dict[str, Any] = {"kind": "self", "python": sys.executable, "label": "self (A/A)", "cwd": str(cwd)}
            return _ExternalBaseline(info)
        if same_command:
            raise UsageError(
                f"--baseline-command: the same command as system.external.command of {loaded.path}: both sides "
                "would run the same pipeline; for an A/A check use --baseline self without --baseline-command"
            )
        label = f"command: {' '.join(command)}"
        info = {"kind": "external-command", "label": label, "command": command, "cwd": str(cwd)}
        return _ExternalBaseline(info, command=command)
    rev = baseline.removeprefix("git:")
    repo = _repo_holding(cwd, baseline)
    commit = _user_git(["rev-parse", "--verify", f"{rev}^{{commit}}"], repo, f"--baseline {baseline}")
    if same_command and not _tree_differs(repo, commit):
        raise UsageError(
            f"--baseline {baseline}: {repo} has no change against {commit[:10]} (committed, staged, unstaged or "
            "untracked): both sides would run the same pipeline; for an A/A check use --baseline self"
        )
    _refuse_absolute_repo_paths(spec, repo)
    info = {
        "kind": "external-git",
        "rev": rev,
        "commit": commit,
        "repo": str(repo),
        "label": f"{rev} ({commit[:10]}) of {repo}",
        "command": command or spec.argv(),
    }
    return _ExternalBaseline(info, command=command, repo=repo, commit=commit, relative_cwd=cwd.relative_to(repo))


def _external_side(plan: _ExternalBaseline, candidate: _Side, gate_dir: Path) -> tuple[_Side, dict[str, Any]]:
    """The baseline's side (the candidate's code) and what its scenario copy overrides: a worktree of the
    revision made here (removed by the caller, or here if this fails), and the cwd inside it."""
    info = dict(plan.info)
    overrides: dict[str, Any] = {}
    if plan.command is not None:
        overrides["command"] = list(plan.command)
    if plan.repo is not None and plan.commit is not None and plan.relative_cwd is not None:
        tree = (gate_dir / "baseline-src").resolve()
        what = f"--baseline {info['rev']}"
        _user_git(["worktree", "add", "--detach", "--force", str(tree), plan.commit], plan.repo, what)
        info["worktree"] = str(tree)
        cwd = tree / plan.relative_cwd
        if not cwd.is_dir():
            _user_git(["worktree", "remove", "--force", str(tree)], plan.repo, "cleanup")
            raise UsageError(f"{what}: {plan.relative_cwd} (system.external.cwd) does not exist at {plan.commit[:10]}")
        info["cwd"] = str(cwd)
        overrides["cwd"] = str(cwd)
    info["overrides"] = overrides
    return replace(candidate, name="A", label=str(info["label"])), info


def _baseline_command(spec: ExternalSystem, text: str) -> list[str]:
    """``--baseline-command``, split like the scenario's command string (no shell runs), placeholders checked."""
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"--baseline-command: {exc}") from None
    if not argv:
        raise UsageError("--baseline-command: expected a command, e.g. '{python} pipeline.py --fast', got nothing")
    try:
        ExternalSystem.model_validate({**spec.model_dump(), "command": argv})
    except ValidationError as exc:
        message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise UsageError(f"--baseline-command: {message}") from None
    return argv


def _refuse_shared_output(spec: ExternalSystem, scenario: Path) -> None:
    """Each replicate must read only its own rows: an output file outside ``{out_dir}`` would hold every earlier
    replicate's rows too (and the other side's), and the ledger would count them."""
    for where, out in (("output", spec.output), ("rejects", spec.rejects)):
        if out is not None and out.format != "sql" and "{out_dir}" not in (out.path or ""):
            raise UsageError(
                f"{scenario}: system.external.{where}.path: {out.path!r} is outside {{out_dir}}; a gate runs each "
                f"replicate in a folder of its own, expected e.g. '{{out_dir}}/{Path(out.path or 'out').name}'"
            )


def _repo_holding(cwd: Path, spec: str) -> Path:
    if not cwd.is_dir():
        raise UsageError(f"--baseline {spec}: system.external.cwd ({cwd}) is not a folder")
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError:
        raise UsageError(
            f"--baseline {spec}: git is not installed; use --baseline-command or --baseline self"
        ) from None
    if done.returncode != 0:
        raise UsageError(
            f"--baseline {spec}: system.external.cwd ({cwd}) is not in a git repository; compare two commands with "
            "--baseline-command CMD, or use --baseline self for an A/A check"
        )
    return Path(done.stdout.strip()).resolve()


def _user_git(args: list[str], repo: Path, what: str) -> str:
    """git in the repository of the user's pipeline (not the bench's): its refusal named as such."""
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise UsageError(
            f"{what}: expected a revision of {repo} (the repository holding system.external.cwd); "
            f"git {' '.join(args[:2])} said: {said[0] if said else done.returncode}"
        )
    return done.stdout.strip()


def _tree_differs(repo: Path, commit: str) -> bool:
    """Whether the working tree differs from ``commit``: a tracked file changed (staged or not) or an untracked,
    not ignored, file. True when git cannot tell: a gate is not refused on a doubt."""
    diff = subprocess.run(["git", "diff", "--quiet", commit, "--"], cwd=repo, capture_output=True, check=False)
    if diff.returncode != 0:
        return True
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"], cwd=repo, capture_output=True, text=True, check=False
    )
    return untracked.returncode != 0 or bool(untracked.stdout.strip())


def _refuse_absolute_repo_paths(spec: ExternalSystem, repo: Path) -> None:
    """A file of the repository named by its absolute path would be the candidate's copy on both sides: the gate
    would compare the pipeline with itself and call it a revision."""
    for i, arg in enumerate(spec.argv()):
        if not os.path.isabs(arg) or not Path(arg).resolve().is_relative_to(repo):
            continue
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", str(Path(arg).resolve())], cwd=repo, capture_output=True, check=False
        )
        if tracked.returncode == 0:
            raise UsageError(
                f"system.external.command[{i}]: {arg} is a file of {repo} named by its absolute path, so the "
                "baseline revision would run the candidate's copy; write it relative to system.external.cwd"
            )


def _differs_from(repo: Path, commit: str, root: Path) -> bool | None:
    """Whether the candidate's packages differ from ``commit`` (committed or not); None if git cannot tell."""
    if not root.is_relative_to(repo):
        return None
    done = subprocess.run(
        ["git", "diff", "--quiet", commit, "--", *gate_worker.PACKAGES],
        cwd=root,
        capture_output=True,
        check=False,
    )
    return {0: False, 1: True}.get(done.returncode)


def _git(args: list[str], cwd: Path, what: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        raise UsageError(f"{what}: git is not installed; use --baseline self, python:PATH or a stored folder") from None
    if done.returncode != 0:
        raise UsageError(
            f"{what}: expected a git revision of this checkout, a stored baseline folder, self or python:PATH; "
            f"git {' '.join(args[:2])} said: {done.stderr.strip() or done.stdout.strip()}"
        )
    return done.stdout.strip()


def _value(rep: Replicate, metric: MetricName, normalise: bool) -> float | None:
    figure = GATE_METRICS[metric]
    value = figure.value(rep.variant)
    if value is None:
        return None
    value = float(value)
    if normalise and metric not in NOT_TIMES and rep.reference_ms:
        # Rates are per time: multiply; times: divide. Either way "as if the machine were as fast as the reference".
        value = value * rep.reference_ms if figure.higher_is_better else value / rep.reference_ms
    return value


def judge(
    a: Sequence[Replicate],
    b: Sequence[Replicate],
    gates: GateSettings,
    *,
    paired: bool,
    normalise: bool,
    seed: int = 0,
) -> dict[str, Any]:
    """The verdict per metric, counter and bound, and whether the gate fails (with its reasons)."""
    kinds = frozenset(system_kind(r.variant) for r in (*a, *b))
    rows = [
        _metric_row(name, metric, a, b, gates, paired=paired, normalise=normalise, seed=seed, kinds=kinds)
        for name, metric in gates.metrics.items()
    ]
    pvalues = _family(rows)
    # Each metric of the family is compared to its own alpha after Holm's adjustment (with one confidence for
    # all, this is plain Holm).
    adjusted = gate_stats.holm(pvalues, 1 - gates.confidence) if pvalues else {}
    reasons = _metric_verdicts(rows, adjusted)
    counters, counter_reasons = _checked(
        [_counter_check(cname, a, b, gates.counters.get(cname), kinds) for cname in COUNTERS]
    )
    bounds, bound_reasons = _checked([_bound_check(bname, limit, b) for bname, limit in gates.bounds.items()])
    reasons += counter_reasons + bound_reasons
    failed_runs = [f"{r.side}{r.index + 1}" for r in (*a, *b) if r.exit_code != 0]
    if failed_runs:
        reasons.append(f"replicate(s) {', '.join(failed_runs)} failed their own checks (ledger); see their logs")
    unjudged = _unjudged(rows, gates, paired=paired, kinds=kinds)
    failed = bool(reasons)
    return {
        "metrics": rows,
        "counters": counters,
        "bounds": bounds,
        "multiple_comparisons": (
            f"Holm-Bonferroni step-down over the {len(pvalues)} gated, judgeable metric(s) at "
            f"family-wise {_level(1 - gates.confidence)}"
        ),
        "outcome": "failed" if failed else ("inconclusive" if unjudged else "passed"),
        "failed": failed,
        "reasons": reasons,
        "inconclusive": unjudged,
    }


def _metric_row(
    name: MetricName,
    metric: GateMetric,
    a: Sequence[Replicate],
    b: Sequence[Replicate],
    gates: GateSettings,
    *,
    paired: bool,
    normalise: bool,
    seed: int,
    kinds: frozenset[str] = frozenset({"in_process"}),
) -> dict[str, Any]:
    """One metric's values on both sides and their change, before Holm's step says whether it is significant.

    A metric the measured kind of system does not report (an in-process probe of an external system) is "not
    applicable": neither judged nor missing. End-to-end latency of an external system measured by watching its
    output is known only to the polling interval, so its tolerance is at least one interval (relative to the
    baseline's median): a smaller change is below what the measurement can tell.
    """
    figure = GATE_METRICS[name]
    higher, unit = figure.higher_is_better, figure.unit
    conf = metric.confidence or gates.confidence
    row: dict[str, Any] = {
        "metric": name,
        "unit": unit if not (normalise and name not in NOT_TIMES) else "x reference",
        "higher_is_better": higher,
        "confidence": conf,
        "tolerance": gates.tolerance if metric.tolerance is None else metric.tolerance,
        "gated": metric.gate,
        "applicable": not kinds - figure.systems,
    }
    if not row["applicable"]:
        row.update(verdict="not applicable", note=_not_applicable(kinds))
        return row
    av = [_value(r, name, normalise) for r in a]
    bv = [_value(r, name, normalise) for r in b]
    if any(v is None for v in av + bv):
        row.update(verdict="not measured", note="missing in some replicates", a=av, b=bv)
        return row
    a_vals = [float(v) for v in av if v is not None]
    b_vals = [float(v) for v in bv if v is not None]
    test = gate_stats.paired if paired else gate_stats.unpaired
    change = test(a_vals, b_vals, confidence=conf, seed=seed)
    # Robust CV (1.4826 x MAD / median): on a shared machine one replicate in ten may stall and double a flush
    # time (seen: A/A pair ratios up to 2.2); that one must not make a metric "too noisy to judge".
    cv_a, cv_b = _robust_cv(a_vals), _robust_cv(b_vals)
    row.update(
        a=a_vals,
        b=b_vals,
        a_median=statistics.median(a_vals),
        b_median=statistics.median(b_vals),
        change=change.estimate,
        ci=[change.ci_low, change.ci_high],
        p_value=change.p_value,
        method=change.method,
        note=change.note,
        cv=[round(cv_a, 4), round(cv_b, 4)],
        erratic=max(cv_a, cv_b) > gates.erratic_cv,
    )
    resolution = _watch_resolution_ms(name, (*a, *b))
    if resolution is not None:
        row["resolution_ms"] = resolution
        floor = resolution / row["a_median"] if row["a_median"] > 0 else math.inf
        if floor > row["tolerance"]:
            row["tolerance_note"] = (
                f"widened from {row['tolerance']:.0%}: one polling interval ({resolution:g} ms) of the output "
                "is the resolution of this latency"
            )
            row["tolerance"] = floor
    return row


def _not_applicable(kinds: frozenset[str]) -> str:
    """Why a metric does not apply to these kinds of system, and what to gate instead."""
    if "external" in kinds:
        return (
            "an external system has no in-process probes (thread CPU, flushes, lock) and its memory is not the "
            f"bench's; {_instead(kinds)}"
        )
    return f"measured for system.kind external only; {_instead(kinds)}"


def _instead(kinds: frozenset[str]) -> str:
    if "external" in kinds:
        return "gate system_cpu_s_per_1k, system_peak_rss_mb (its process tree) and e2e_p99_ms"
    return "gate hot_path_cpu_us, sink_cpu_us_per_row (thread CPU) and peak_rss_mb"


def _watch_resolution_ms(name: MetricName, reps: Sequence[Replicate]) -> float | None:
    """For end-to-end latency of an external system whose output was watched: the coarsest polling interval."""
    if not name.startswith("e2e_"):
        return None
    found = [
        float(r.variant.system.durable_resolution_ms)
        for r in reps
        if r.variant.system is not None
        and r.variant.system.durable_from == "watching"
        and r.variant.system.durable_resolution_ms is not None
    ]
    return max(found) if found else None


def _robust_cv(values: Sequence[float]) -> float:
    return gate_stats.cv(values, robust=True) if len(values) >= 2 else 0.0


def _family(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The p-values of the one family Holm guards: the gated metrics that could be judged (not erratic, tested)."""
    return {
        row["metric"]: row["p_value"]
        for row in rows
        if "change" in row and row["gated"] and not row["erratic"] and row["p_value"] is not None
    }


def _metric_verdicts(rows: Sequence[dict[str, Any]], adjusted: dict[str, gate_stats.HolmResult]) -> list[str]:
    """Each measured metric's verdict after Holm's step; the reasons the gated regressions give to fail."""
    reasons: list[str] = []
    for row in rows:
        if "change" not in row:
            continue
        h = adjusted.get(row["metric"])
        row["p_holm"] = h.adjusted if h else None
        significant = h is not None and h.adjusted <= 1 - row["confidence"]
        change = gate_stats.Change(
            len(row["a"]),
            len(row["b"]),
            row["change"],
            row["ci"][0],
            row["ci"][1],
            row["confidence"],
            row["p_value"],
            row["method"],
            row["note"],
        )
        row["verdict"] = gate_stats.verdict(
            change, higher_is_better=row["higher_is_better"], tolerance=row["tolerance"], significant=significant
        )
        row["regression"] = bool(row["gated"] and not row["erratic"] and row["verdict"] == "worse")
        if row["regression"]:
            reasons.append(
                f"{row['metric']}: {row['change']:+.1%} (CI {row['ci'][0]:+.1%} .. {row['ci'][1]:+.1%}, "
                f"Holm p {row['p_holm']:.4f}), beyond the {row['tolerance']:.0%} tolerance"
            )
        if row["erratic"] and row["gated"]:
            row["verdict"] += " (erratic: not judged)"
    return reasons


def _checked(checks: Sequence[tuple[dict[str, Any], str | None]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The entries of a table of checks, and the reasons of those that failed, in order."""
    return [entry for entry, _ in checks], [why for _, why in checks if why is not None]


def _counter_check(
    cname: CounterName,
    a: Sequence[Replicate],
    b: Sequence[Replicate],
    ctol: float | None,
    kinds: frozenset[str] = frozenset({"in_process"}),
) -> tuple[dict[str, Any], str | None]:
    """A deterministic counter: any lost message fails; a gated counter must match the baseline within its
    tolerance. The entry, and why it fails the gate (None if it does not)."""
    if "external" in kinds and cname in BUILT_IN_COUNTERS:
        note = "a counter of the built-in pipeline's Parquet sink; an external system writes its own output"
        return {
            "counter": cname,
            "a": [],
            "b": [],
            "tolerance": None,
            "gated": False,
            "ok": None,
            "applicable": False,
            "note": note,
        }, None
    a_c = [counter_value(r.variant, cname) for r in a]
    b_c = [counter_value(r.variant, cname) for r in b]
    entry: dict[str, Any] = {"counter": cname, "a": a_c, "b": b_c, "tolerance": ctol, "gated": ctol is not None}
    found: dict[str, Any]
    why: str | None
    if cname == "lost":
        found, why = _no_loss(b_c)
    elif ctol is not None and all(v is not None for v in a_c + b_c):
        found, why = _as_baseline(cname, a_c, b_c, ctol)
    else:
        # Not gated, or missing in some replicate (an older baseline): reported, not checked.
        found, why = {"ok": None}, None
    entry.update(found)
    return entry, why


def _no_loss(b_c: Sequence[float | None]) -> tuple[dict[str, Any], str | None]:
    bad = [v for v in b_c if v]
    why = f"lost: {int(sum(v or 0 for v in bad))} message(s) lost in the candidate's replicates" if bad else None
    return {"ok": not bad}, why


def _as_baseline(
    cname: CounterName, a_c: Sequence[float | None], b_c: Sequence[float | None], ctol: float
) -> tuple[dict[str, Any], str | None]:
    """Every candidate replicate's count within ``ctol`` of the baseline's median."""
    ref = statistics.median(v for v in a_c if v is not None)
    off = max(abs((v or 0) - ref) for v in b_c)
    ok = off <= ctol * abs(ref)
    why = (
        None
        if ok
        else f"{cname}: candidate {sorted({v for v in b_c if v is not None})} vs baseline {ref:g}"
        + (" exactly" if ctol == 0 else f" within {ctol:.0%}")
    )
    return {"ok": ok, "a_varies": len(set(a_c)) > 1}, why


def _bound_check(bname: MetricName, limit: float, b: Sequence[Replicate]) -> tuple[dict[str, Any], str | None]:
    """A service-level bound on the candidate's worst replicate, in real units (never normalised): the entry,
    and why it fails the gate (None if it does not)."""
    measured = [v for v in (_value(r, bname, False) for r in b) if v is not None]
    higher = GATE_METRICS[bname].higher_is_better
    worst: float | None = (min(measured) if higher else max(measured)) if measured else None
    ok = worst is not None and (worst >= limit if higher else worst <= limit)
    why = (
        None
        if ok
        else f"{bname}: candidate's worst replicate {worst if worst is not None else 'not measured'} "
        f"{'below' if higher else 'above'} the bound {limit:g}"
    )
    return {"metric": bname, "bound": limit, "worst": worst, "ok": ok}, why


def _unjudged(
    rows: list[dict[str, Any]], gates: GateSettings, *, paired: bool, kinds: frozenset[str] = frozenset()
) -> list[str]:
    """Why some gated metric got no verdict: then the gate is inconclusive, never "passed" on nothing."""
    gated = [row for row in rows if row["gated"] and row.get("applicable", True)]
    out: list[str] = []
    if not gated and any(row["gated"] for row in rows):
        out.append(f"no gated metric applies to system.kind {', '.join(sorted(kinds))}: " + _instead(kinds))
    for row in gated:
        name = row["metric"]
        if "change" not in row:
            out.append(f"{name}: not measured ({row.get('note')}; a baseline older than the metric lacks it)")
            row["verdict"] = "insufficient data: not measured"
            continue
        if row["erratic"]:
            out.append(f"{name}: too noisy to judge (robust CV {max(row['cv']):.2f} > erratic_cv {gates.erratic_cv:g})")
            continue
        if row["p_value"] is None:
            out.append(f"{name}: no test possible ({row['note']})")
            row["verdict"] = f"insufficient data: {row['note']}"
            continue
        # Holm's first step is the strictest: alpha / m. A test that cannot reach it can never reject.
        level = (1 - row["confidence"]) / len(gated)
        floor = gate_stats.smallest_p(len(row["a"]), len(row["b"]), paired=paired)
        if floor > level:
            out.append(
                f"{name}: {len(row['a'])} vs {len(row['b'])} replicate(s) cannot reach p <= {level:.3g} "
                f"(the smallest p these sizes allow is {floor:.3g}); add replicates"
            )
            row["verdict"] = "insufficient data: too few replicates for the test to ever reject"
    return out


def run_gate(
    loaded: LoadedScenario, options: GateOptions, on_replicate: Callable[[Replicate, int], None] | None = None
) -> GateOutcome:
    gates = _settings(loaded, options)
    external = loaded.scenario.system.external
    if external is None and options.baseline_command is not None:
        raise UsageError(
            f"--baseline-command: replaces system.external.command; {loaded.path} has system.kind "
            f"{loaded.scenario.system.kind}, expected external"
        )
    # Checked before the gate folder exists: a refused baseline leaves nothing behind.
    plan = _external_plan(loaded, options) if external is not None else None
    gate_dir = make_run_dir(f"{loaded.scenario.name}-gate", options.out, options.reports_dir).resolve()
    (gate_dir / "scenario.yaml").write_bytes(loaded.path.read_bytes())
    stored = Path(options.baseline)
    n = gates.replicates
    candidate = _candidate_for(loaded)
    b_scenario = _replicate_scenario(loaded, gate_dir, "B", options.inject_slowdown)
    a: list[Replicate] = []
    b: list[Replicate] = []
    baseline_info: dict[str, Any] = {}
    code: dict[str, Any] = {}
    try:
        if _is_stored(stored):
            design = "stored"
            baseline_info, a = _load_stored(stored)
            for i in range(n):
                rep = _replicate(candidate, b_scenario, gate_dir / f"B{i + 1:02d}", i, code, reference=True)
                b.append(rep)
                if on_replicate:
                    on_replicate(rep, n)
        else:
            design = "paired"
            if plan is not None:
                base, baseline_info = _external_side(plan, candidate, gate_dir)
            else:
                base, baseline_info = _baseline_side(options.baseline, gate_dir)
            a_scenario = _replicate_scenario(loaded, gate_dir, "A", None, baseline_info.get("overrides"))
            sides = [(base, a_scenario, a), (candidate, b_scenario, b)]
            same_code = partial(_refuse_same_code, baseline_info, code, candidate)
            _interleave(sides, gate_dir, n, code, check=same_code, on_replicate=on_replicate)
    finally:
        if baseline_info.get("kind") in ("git", "external-git"):
            _git(["worktree", "remove", "--force", baseline_info["worktree"]], Path(baseline_info["repo"]), "cleanup")
    verdicts = judge(a, b, gates, paired=design == "paired", normalise=design == "stored", seed=options.seed)
    result: dict[str, Any] = {
        "gate_schema": GATE_SCHEMA,
        "kind": "gate",
        "started_at": datetime.now(UTC).isoformat(),
        "scenario": {"name": loaded.scenario.name, "path": str(loaded.path), "sha256": loaded.sha256},
        "design": design,
        "baseline": baseline_info,
        "candidate": {
            "python": sys.executable,
            "inject_slowdown": options.inject_slowdown,
            "root": str(candidate.root),
            **(
                {"cwd": str(_external_cwd(loaded)), "command": external.argv(), "label": "working tree"}
                if external is not None
                else {}
            ),
        },
        "code": code,
        "settings": gates.model_dump(mode="json"),
        "replicates": {
            "A": [_rep_json(r) for r in a],
            "B": [_rep_json(r) for r in b],
        },
        "environment": environment(),
        **verdicts,
    }
    (gate_dir / "gate.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (gate_dir / "summary.md").write_text(markdown(result), encoding="utf-8")
    if options.save_baseline is not None:
        save_baseline(options.save_baseline, b, loaded)
    return GateOutcome(gate_dir, result, verdicts["failed"], verdicts["reasons"])


def _interleave(
    order: list[tuple[_Side, Path, list[Replicate]]],
    gate_dir: Path,
    n: int,
    code: dict[str, Any],
    *,
    check: Callable[[], None],
    on_replicate: Callable[[Replicate, int], None] | None,
) -> None:
    """``n`` pairs of replicates, each side's appended to its list; ``check`` once both sides' code is known.

    Each replicate's worker is started while the one before runs, importing on the CPUs the replicates do not
    use: a worker's start (interpreter, imports of the bench, pyarrow, pydantic...) took about 0.9 s of the
    2 s each replicate cost; a gate of ``scenarios/gate.yaml`` (20 pairs) went from 78 s to 48 s here. On one
    CPU (nothing to overlap with) or for an unpinned side, each worker starts in its turn, as before.
    """
    # A B, then B A: each side goes first equally often, so a drift of the machine favours neither.
    plan = [
        (i, side, scenario, bucket)
        for i in range(n)
        for side, scenario, bucket in (order if i % 2 == 0 else order[::-1])
    ]

    def start(k: int, ahead: bool) -> _Worker:
        i, side, _, _ = plan[k]
        return _Worker(side, gate_dir, f"{side.name}{i + 1:02d}", ahead=ahead)

    upcoming: _Worker | None = None
    try:
        for k, (i, side, scenario, bucket) in enumerate(plan):
            worker = upcoming if upcoming is not None else start(k, ahead=False)
            upcoming = None
            worker.ready()
            if k + 1 < len(plan) and _overlaps(plan[k + 1][1]):
                upcoming = start(k + 1, ahead=True)
            rep = _replicate(
                side, scenario, gate_dir / f"{side.name}{i + 1:02d}", i, code, reference=False, worker=worker
            )
            bucket.append(rep)
            if i == 0 and len(code) == 2:
                check()
            if on_replicate:
                on_replicate(rep, 2 * n)
    finally:
        if upcoming is not None:
            upcoming.close()


def _overlaps(side: _Side) -> bool:
    """Whether a worker of ``side`` may import while a replicate runs: only pinned, with a CPU to spare."""
    cpu = gate_cpu()
    return cpu is not None and side.pin and bool(_spare_cpus(cpu))


def _spare_cpus(cpu: int) -> list[int]:
    """The CPUs this process may use besides the gate's ``cpu``: where a worker started ahead imports."""
    return sorted(os.sched_getaffinity(0) - {cpu})


def _replicate(
    side: _Side,
    scenario: Path,
    out: Path,
    index: int,
    code: dict[str, Any],
    *,
    reference: bool,
    worker: _Worker | None = None,
) -> Replicate:
    """One replicate in a new worker process of its own (``worker``, started by the caller, or one started here).

    Why a new process each time rather than one warm worker per side: pinned to one CPU, the CPU metrics of one
    process vary by 0.5% (hot path) and 5% (sink) from run to run, but two processes of the same code differ
    by up to 5% and 10% (memory layout); with one worker per side that difference is the same in every pair,
    a bias no number of pairs removes and the rank test takes for a change. With a process per replicate it is
    noise, independent from pair to pair, as the test assumes. The run's own warm-up (first samples, first
    flush) is left out of the metrics, so the fresh interpreter does not need a warm-up run.
    """
    if worker is None:
        worker = _Worker(side, out.parent, out.name)
    try:
        code.setdefault(side.name, _code_info(worker))
        return worker.run(scenario, out, index=index, reference=reference)
    finally:
        worker.close()


def _code_info(worker: _Worker) -> dict[str, Any]:
    """What one side's process really imported, and a digest of that code."""
    hello = worker.hello
    root = Path(hello["root"])
    return {
        "label": worker.side.label,
        "modules": hello["modules"],
        "root": str(root),
        "commit": hello.get("commit"),
        "python": hello.get("python"),
        "code_sha256": code_digest(root) if root.is_dir() else None,
    }


def _refuse_same_code(baseline: dict[str, Any], code: dict[str, Any], candidate: _Side) -> None:
    """A revision whose code differs from the candidate's must not run the candidate's code (or vice versa)."""
    if baseline.get("kind") != "git" or candidate.root is None:
        return
    differs = _differs_from(Path(baseline["repo"]), baseline["commit"], candidate.root)
    if differs and code["A"]["code_sha256"] == code["B"]["code_sha256"]:
        raise Inconclusive(
            f"--baseline {baseline['rev']}: git says the candidate's code differs from {baseline['commit'][:10]}, "
            f"but both sides imported the same code ({code['A']['root']} and {code['B']['root']}); refusing to judge"
        )


def _is_stored(path: Path) -> bool:
    return path.is_dir() and (path / BASELINE_FILE).exists()


def _rep_json(r: Replicate) -> dict[str, Any]:
    return {
        "index": r.index,
        "run_dir": str(r.run_dir),
        "exit_code": r.exit_code,
        "reference_ms": r.reference_ms,
        "seconds": r.seconds,
        "modules": r.modules,
        "commit": r.commit,
    }


def save_baseline(folder: Path, reps: Sequence[Replicate], loaded: LoadedScenario) -> None:
    """Keep the candidate's replicates (their variant results and reference timings) as a stored baseline."""
    if any(r.reference_ms is None for r in reps):
        raise UsageError("--save-baseline: replicates need reference timings; run the gate against a stored baseline")
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "gate_schema": GATE_SCHEMA,
        "scenario": {"name": loaded.scenario.name, "sha256": loaded.sha256},
        "saved_at": datetime.now(UTC).isoformat(),
        "environment": environment(),
        "replicates": [
            {"variant": _variant_json(r.variant), "reference_ms": r.reference_ms, "exit_code": r.exit_code}
            for r in reps
        ],
    }
    (folder / BASELINE_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _variant_json(variant: Variant) -> dict[str, Any]:
    """A variant as its results.json holds it (what a writer left unset stays out)."""
    return variant.model_dump(mode="json", by_alias=True, exclude_unset=True)


def _load_stored(folder: Path) -> tuple[dict[str, Any], list[Replicate]]:
    path = folder / BASELINE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        reps = [
            Replicate(
                "A", i, folder, int(r["exit_code"]), _stored_variant(path, i, r["variant"]), float(r["reference_ms"])
            )
            for i, r in enumerate(data["replicates"])
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: not a stored baseline written by bench gate --save-baseline ({exc})") from None
    if len(reps) < 3:
        raise UsageError(f"{path}: holds {len(reps)} replicate(s); a comparison needs at least 3")
    return {"kind": "stored", "folder": str(folder), "saved_at": data.get("saved_at")}, reps


def _stored_variant(path: Path, index: int, data: Any) -> Variant:
    """One replicate's variant of a stored baseline, through the results model."""
    try:
        return Variant.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_error(f"{path}: replicates[{index}].variant", exc)
        raise UsageError(
            f"{path}: not a stored baseline this bench reads (written by bench gate --save-baseline):\n{problems}"
        ) from None


def baseline_only(loaded: LoadedScenario, folder: Path, replicates: int | None) -> Path:
    """``bench gate SCENARIO --save-baseline DIR`` without a comparison: run the replicates, keep them."""
    gates = _settings(loaded, GateOptions(baseline="self", replicates=replicates))
    if loaded.scenario.system.external is not None:
        _refuse_shared_output(loaded.scenario.system.external, loaded.path)
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        where = Path(tmp).resolve()
        scenario = _replicate_scenario(loaded, where, "A", None)
        code: dict[str, Any] = {}
        reps = [
            _replicate(_candidate_for(loaded), scenario, where / f"A{i + 1:02d}", i, code, reference=True)
            for i in range(gates.replicates)
        ]
        save_baseline(folder, reps, loaded)
    return folder / BASELINE_FILE


def _level(alpha: float) -> str:
    """0.05 -> '5%', 0.001 -> '0.1%' (a level must not round to 0%)."""
    return f"{round(alpha * 100, 4):g}%"


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:+.1%}"


def markdown(result: dict[str, Any]) -> str:
    """The gate's verdict as Markdown, for a pull-request comment or a CI job summary."""
    head = outcome_label(result)
    lines = [
        f"## bench {result.get('kind', 'gate')}: {result['scenario']['name']} — {head}",
        "",
        verdict_line(result),
        "",
        f"Design: {result['design']} ({len(result['replicates']['B'])} replicates per side); baseline: "
        f"{result['baseline'].get('label') or result['baseline'].get('rev') or result['baseline'].get('kind')}; "
        f"{result['multiple_comparisons']}.",
        "",
        "| metric | A median | B median | change | CI | p (Holm) | tolerance | verdict |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in result["metrics"]:
        if "change" not in row:
            lines.append(f"| {row['metric']} | - | - | - | - | - | - | {row['verdict']} |")
            continue
        p = row.get("p_holm")
        lines.append(
            f"| {row['metric']} | {row['a_median']:,.3f} | {row['b_median']:,.3f} | {_pct(row['change'])} | "
            f"{_pct(row['ci'][0])} .. {_pct(row['ci'][1])} | {'-' if p is None else f'{p:.4f}'} | "
            f"{row['tolerance']:.0%} | {row['verdict']}{'' if row['gated'] else ' (not gated)'} |"
        )
    notes = [f"- {row['metric']}: {row['note']}" for row in result["metrics"] if row.get("applicable") is False]
    notes += [
        f"- {row['metric']}: tolerance {row['tolerance_note']}" for row in result["metrics"] if "tolerance_note" in row
    ]
    if notes:
        lines += ["", *sorted(set(notes), key=notes.index)]
    lines += ["", "| counter | baseline | candidate | check |", "|---|---|---|---|"]
    for c in result["counters"]:
        check = {True: "ok", False: "**FAILED**", None: "-"}[c["ok"]]
        if c.get("applicable") is False:
            check = "not applicable"
        lines.append(f"| {c['counter']} | {_span(c['a'])} | {_span(c['b'])} | {check} |")
    if result["bounds"]:
        lines += ["", "| bound | limit | candidate's worst | check |", "|---|---:|---:|---|"]
        for bnd in result["bounds"]:
            lines.append(
                f"| {bnd['metric']} | {bnd['bound']:g} | {bnd['worst']} | {'ok' if bnd['ok'] else '**FAILED**'} |"
            )
    if result["reasons"]:
        lines += ["", "Why it failed:", *[f"- {r}" for r in result["reasons"]]]
    if result.get("inconclusive"):
        why = [f"- {r}" for r in result["inconclusive"]]
        lines += ["", "Why it is inconclusive (neither passed nor failed):", *why]
    if result.get("warnings"):
        lines += ["", "Warnings:", *[f"- {w}" for w in result["warnings"]]]
    return "\n".join(lines) + "\n"


def verdict_line(result: dict[str, Any]) -> str:
    """The conclusion first, in one line: the outcome and the reason that decided it (the full lists follow)."""
    head = outcome_label(result)
    if head == "FAILED":
        why = [str(r) for r in result.get("reasons", [])]
    elif head == "INCONCLUSIVE":
        why = [str(r) for r in result.get("inconclusive", [])]
    else:
        gated = [m for m in result.get("metrics", []) if m.get("gated", True) and m.get("applicable", True)]
        why = [
            f"{len(gated)} gated metric(s) judged, none slower beyond tolerance; "
            f"{len(result.get('counters', []))} counter(s) and {len(result.get('bounds', []))} bound(s) held"
        ]
    more = f" (and {len(why) - 1} more below)" if len(why) > 1 else ""
    return f"**{head}**" + (f": {why[0]}{more}" if why else "")


def outcome_label(result: dict[str, Any]) -> str:
    """FAILED, INCONCLUSIVE or passed (results from before the inconclusive outcome know only failed)."""
    outcome = result.get("outcome") or ("failed" if result["failed"] else "passed")
    return {"failed": "FAILED", "inconclusive": "INCONCLUSIVE"}.get(outcome, "passed")


def _span(values: Sequence[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    lo, hi = min(known), max(known)
    return f"{lo:,.0f}" if lo == hi else f"{lo:,.0f} .. {hi:,.0f}"


def _replicates_from(path: Path) -> tuple[list[Replicate], list[ScenarioRef]]:
    """A results.json, a run folder, or a folder of run folders (e.g. a gate's), as replicates, with the
    scenario each one ran."""
    if path.is_file():
        files = [path]
    elif (path / "results.json").exists():
        files = [path / "results.json"]
    elif path.is_dir():
        files = sorted(path.glob("*/results.json"))
    else:
        raise UsageError(f"{path}: no such file or folder")
    if not files:
        raise UsageError(f"{path}: expected a results.json, a run folder or a folder of run folders; found none")
    reps = []
    scenarios = []
    for i, f in enumerate(files):
        results = read_results(f)  # a UsageError naming the file when it is not a bench results.json
        if not results.variants:
            raise UsageError(f"{f}: not a bench results.json (no variants)")
        reps.append(Replicate("A", i, f.parent, 0, results.variants[0]))
        scenarios.append(results.scenario)
    return reps, scenarios


def compare(
    a: Path,
    b: Path,
    *,
    confidence: float = 0.90,
    tolerance: float = 0.05,
    allow_different_scenarios: bool = False,
) -> dict[str, Any]:
    """``bench compare A B``: every metric of the catalogue, unpaired (each side's replicates as a sample).

    With too few replicates a side for the test ever to reject, the outcome is inconclusive and each metric
    says "insufficient data": compare folders of replicates, or use ``bench gate``. Runs of different scenarios
    are refused (their ratios mean nothing) unless ``allow_different_scenarios``.
    """
    (reps_a, sc_a), (reps_b, sc_b) = _replicates_from(a), _replicates_from(b)
    names = {s.name for s in (*sc_a, *sc_b)}
    warnings: list[str] = []
    if len(names) > 1:
        message = (
            f"the runs are of different scenarios ({', '.join(sorted(str(n) for n in names))}): "
            "a change between them is the scenarios', not the code's"
        )
        if not allow_different_scenarios:
            raise UsageError(f"bench compare: {message}; pass --allow-different-scenarios to compare anyway")
        warnings.append(message)
    elif len({s.sha256 for s in (*sc_a, *sc_b)}) > 1:
        warnings.append("the scenario file differs between runs (same name, other content): check it is intended")
    reps_b = [Replicate("B", r.index, r.run_dir, r.exit_code, r.variant) for r in reps_b]
    kinds = {system_kind(r.variant) for r in (*reps_a, *reps_b)}
    present = [
        name
        for name, figure in GATE_METRICS.items()
        if kinds <= figure.systems and all(figure.value(r.variant) is not None for r in (*reps_a, *reps_b))
    ]
    gates = GateSettings(
        confidence=confidence,
        tolerance=tolerance,
        metrics={name: GateMetric() for name in present},
    )
    verdicts = judge(reps_a, reps_b, gates, paired=False, normalise=False)
    return {
        "kind": "compare",
        "scenario": {"name": f"{a} vs {b}", "names": sorted(str(n) for n in names)},
        "design": f"unpaired, {len(reps_a)} vs {len(reps_b)} replicate(s)",
        "baseline": {"kind": "runs", "path": str(a)},
        "candidate": {"path": str(b)},
        "replicates": {"A": [_rep_json(r) for r in reps_a], "B": [_rep_json(r) for r in reps_b]},
        "warnings": warnings,
        **verdicts,
    }


PATCH_FOLDER = Path("scenarios") / "gate-patches"
DEFAULT_PATCHES = ("aa-comment.patch", "sink-cpu-10.patch", "validator-cpu-10.patch")
PATCHED_GATE_TIMEOUT_S = 3600


def run_patched_gate(
    scenario: Path,
    patch: Path,
    *,
    base: str,
    out: Path,
    replicates: int | None = None,
    confidence: float | None = None,
    seed: int = 0,
) -> GateOutcome:
    """Gate a candidate built from ``patch`` on revision ``base`` against ``base``, as a user's CI would.

    The candidate is a temporary worktree of ``base`` with the patch applied, uncommitted, like a branch checked
    out in CI; ``bench gate SCENARIO --baseline <base>`` then runs from that worktree's root, its own code first
    on ``sys.path``, in a new process: the same path as ``bench gate`` from a user's checkout.
    """
    repo = _repo_of(code_root())
    commit = _git(["rev-parse", "--verify", f"{base}^{{commit}}"], repo, f"--baseline {base}")
    patch = patch.resolve()
    if not patch.is_file():
        raise UsageError(f"--candidate-patch {patch}: no such file")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tree = out / "candidate-src"
    _git(["worktree", "add", "--detach", "--force", str(tree), commit], repo, f"--baseline {base}")
    try:
        _git(["apply", "--whitespace=nowarn", str(patch)], tree, f"--candidate-patch {patch}")
        gate_dir = out / "gate"
        command = [sys.executable, "-P", "-m", "bench", "gate", str(scenario.resolve()), "--baseline", commit]
        command += ["--out", str(gate_dir), "--markdown", "--seed", str(seed)]
        if replicates is not None:
            command += ["--replicates", str(replicates)]
        if confidence is not None:
            command += ["--confidence", str(confidence)]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        with open(out / "gate.log", "wb") as log:
            proc = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                returncode = proc.wait(PATCHED_GATE_TIMEOUT_S)
            except BaseException:
                # Interrupted or timed out: SIGTERM lets the inner gate remove its own worktree and workers.
                proc.terminate()
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
        path = gate_dir / "gate.json"
        if not path.exists():
            raise Inconclusive(f"the gate of {patch.name} wrote no gate.json (exit code {returncode}); see {out}")
        result = json.loads(path.read_text(encoding="utf-8"))
        result["candidate"]["patch"] = str(patch)
        result["candidate"]["exit_code"] = returncode
        return GateOutcome(gate_dir, result, bool(result["failed"]), list(result["reasons"]))
    finally:
        _git(["worktree", "remove", "--force", str(tree)], repo, "cleanup")


def run_experiment(
    loaded: LoadedScenario,
    *,
    trials: int,
    patches: Sequence[Path],
    base: str = "HEAD",
    replicates: int | None = None,
    out: Path | None = None,
    reports_dir: Path = Path("reports"),
    on_gate: Callable[[str, int, GateOutcome], None] | None = None,
) -> Path:
    """How often does the gate cry wolf (A/A), and how often does it catch a real slower code change?

    Each condition is a patch on ``base`` (docs/gates.md: an A/A comment change, a 10% slower sink, a 10% slower
    validator); every gate goes through :func:`run_patched_gate`, the path a user's CI takes. Each trial runs
    every condition in turn, so a drift of the machine hits them alike. A patch named ``aa-*`` measures false
    alarms, the others detection. Rates come with Clopper-Pearson 95% intervals; experiment.json and
    experiment.md are rewritten after every gate, so an interrupted experiment still reports what it measured.
    """
    folder = make_run_dir(f"{loaded.scenario.name}-gate-experiment", out, reports_dir).resolve()
    # Resolved once: a commit made while the experiment runs must not change what later trials measure.
    base = _git(["rev-parse", "--verify", f"{base}^{{commit}}"], _repo_of(code_root()), f"--base {base}")
    outcomes: dict[str, list[dict[str, Any]]] = {p.stem: [] for p in patches}
    gates = _settings(loaded, GateOptions(baseline="self", replicates=replicates))
    for trial in range(trials):
        for patch in patches:
            name = patch.stem
            started = time.monotonic()
            outcome = run_patched_gate(
                loaded.path,
                patch,
                base=base,
                out=folder / f"trial-{trial + 1:03d}-{name}",
                replicates=replicates,
                seed=trial,
            )
            outcomes[name].append(_experiment_gate(trial, outcome, started))
            _drop_replicate_data(outcome.gate_dir)
            if on_gate:
                on_gate(name, trial, outcome)
            data = {
                "kind": "gate-experiment",
                "scenario": {"name": loaded.scenario.name, "path": str(loaded.path), "sha256": loaded.sha256},
                "base": base,
                "patches": [str(p) for p in patches],
                "settings": gates.model_dump(mode="json"),
                "trials_done": trial + 1,
                "summary": [_condition_summary(cname, runs) for cname, runs in outcomes.items() if runs],
                "gates": outcomes,
                "environment": environment(),
            }
            (folder / "experiment.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            (folder / "experiment.md").write_text(experiment_markdown(data), encoding="utf-8")
    return folder


def _experiment_gate(trial: int, outcome: GateOutcome, started: float) -> dict[str, Any]:
    """What the experiment keeps of one gate: its outcome, why, and each metric's change."""
    return {
        "trial": trial + 1,
        "outcome": outcome.outcome,
        "failed": outcome.outcome == "failed",
        "reasons": outcome.reasons,
        "inconclusive": outcome.result.get("inconclusive", []),
        "changes": {m["metric"]: m.get("change") for m in outcome.result["metrics"]},
        "seconds": round(time.monotonic() - started, 1),
    }


def _drop_replicate_data(gate_dir: Path) -> None:
    # Keep the verdicts: the replicates' data files of hundreds of runs are not worth the disk.
    for rep in gate_dir.glob("*"):
        if rep.is_dir():
            shutil.rmtree(rep / "data", ignore_errors=True)


def _condition_summary(cname: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One condition's rate of failed gates so far, with its Clopper-Pearson interval and median changes."""
    from scipy.stats import binomtest

    k = sum(r["failed"] for r in runs)
    ci = binomtest(k, len(runs)).proportion_ci(0.95, method="exact")
    medians = {
        metric: statistics.median(vals)
        for metric in GATE_METRICS
        if (vals := [r["changes"][metric] for r in runs if r["changes"].get(metric) is not None])
    }
    return {
        "condition": cname,
        "gates": len(runs),
        "failed": k,
        "inconclusive": sum(r["outcome"] == "inconclusive" for r in runs),
        "rate": k / len(runs),
        "rate_ci95": [ci.low, ci.high],
        "median_change": medians,
        "median_seconds": statistics.median(r["seconds"] for r in runs),
        "meaning": "false-alarm rate" if cname.startswith("aa-") else "detection rate",
    }


def experiment_markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    gated = [name for name, m in s["metrics"].items() if m.get("gate", True)]
    lines = [
        f"## Gate experiment: {data['scenario']['name']} ({data['trials_done']} trial(s) per condition)",
        "",
        f"Each gate: a candidate built from a patch on {data.get('base', 'HEAD')}, gated against that revision "
        f"from its own worktree; {s['replicates']} A/B pairs interleaved, Holm at family-wise "
        f"{_level(1 - s['confidence'])}, tolerance {s['tolerance']:.0%}; gated: {', '.join(gated)}.",
        "",
        "| condition | gates | failed | inconclusive | rate | 95% interval | median change "
        + " | ".join(gated)
        + " | median s per gate |",
        "|---|---:|---:|---:|---:|---|" + "---:|" * len(gated) + "---:|",
    ]
    for row in data["summary"]:
        changes = " | ".join(_pct(row["median_change"].get(m)) for m in gated)
        lines.append(
            f"| {row['condition']} ({row['meaning']}) | {row['gates']} | {row['failed']} | {row['inconclusive']} | "
            f"{row['rate']:.1%} | {row['rate_ci95'][0]:.1%} .. {row['rate_ci95'][1]:.1%} | {changes} | "
            f"{row['median_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"
