"""``bench gate`` and ``bench compare``: is the candidate slower than the baseline, beyond noise and tolerance?

Two designs (docs/gates.md says when each one can be trusted):

- **A/B in one job** (``--baseline self``, a git revision, or ``python:/path/to/python``): the baseline
  and the candidate run as separate ``bench run`` processes, interleaved A B B A A B ..., on the same
  machine, so slow drift of the machine hits both alike; each metric is judged on the per-pair ratios
  (geometric mean, bootstrap interval, Wilcoxon signed-rank test).
- **Stored baseline** (``--baseline DIR`` written earlier by ``--save-baseline DIR``): only the candidate
  runs now; time metrics are divided by a fixed reference workload timed just before each replicate, so a
  machine that is uniformly slower today is not a regression (Mann-Whitney test, bootstrap interval).

The gated time metrics form one family: Holm's step-down keeps the chance of any false alarm at
1 - confidence. Deterministic counters are compared exactly (or with their own tolerance) and any lost
message fails the gate whatever the timings say; service-level bounds apply to the candidate's worst
replicate.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench import gate_stats
from bench.errors import ScenarioError, UsageError
from bench.metrics import COUNTERS, GATE_METRICS, MetricName, counter_value, get_path
from bench.results import environment
from bench.runner import make_run_dir
from bench.scenario import GateMetric, GateSettings, LoadedScenario

GATE_SCHEMA = 1
BASELINE_FILE = "baseline.json"
# Time metrics are divided by the reference workload in the stored-baseline design; these are not times.
NOT_TIMES = frozenset({"peak_rss_mb"})
REPLICATE_TIMEOUT_S = 600


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


@dataclass(frozen=True)
class Replicate:
    side: str  # "A" or "B"
    index: int
    run_dir: Path
    exit_code: int
    variant: dict[str, Any]
    reference_ms: float | None = None
    seconds: float = 0.0


@dataclass
class GateOutcome:
    gate_dir: Path
    result: dict[str, Any]
    failed: bool
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Code:
    """How to start ``bench run`` for one side."""

    label: str
    python: str
    pythonpath: str | None = None
    in_process: bool = False

    def command(self, scenario: Path, out: Path) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, "BENCH_NO_REPORT": "1", "BENCH_NO_CALIBRATE": "1", "PYTHONUNBUFFERED": "1"}
        if self.pythonpath is not None:
            # Ahead of the editable install on sys.path: the baseline's own packages are imported.
            env["PYTHONPATH"] = self.pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return [self.python, "-m", "bench", "run", str(scenario), "--out", str(out), "--quiet"], env


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


def _settings(loaded: LoadedScenario, options: GateOptions) -> GateSettings:
    sc = loaded.scenario
    gates = sc.gates or GateSettings()
    if sc.matrix:
        raise ScenarioError(f"{loaded.path}: matrix: a gate compares one configuration; remove the matrix")
    if options.replicates is not None:
        gates = gates.model_copy(update={"replicates": options.replicates})
    if options.confidence is not None:
        # Every metric at the new level: a stricter run (e.g. CI's 0.999) must not keep a looser metric override.
        metrics = {k: m.model_copy(update={"confidence": None}) for k, m in gates.metrics.items()}
        gates = gates.model_copy(update={"confidence": options.confidence, "metrics": metrics})
    return gates


def _replicate_scenario(loaded: LoadedScenario, folder: Path, name: str, slowdown: float | None) -> Path:
    """The scenario each replicate runs: without the gates/capacity sections (an older baseline may not know
    them), with the injected slow disk for the candidate if asked."""
    raw = yaml.safe_load(loaded.path.read_text(encoding="utf-8"))
    raw.pop("gates", None)
    raw.pop("capacity", None)
    if slowdown:
        raw["faults"] = [*raw.get("faults", []), {"kind": "slow_sink", "factor": slowdown}]
    path = folder / f"scenario-{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _baseline_code(spec: str, gate_dir: Path) -> tuple[_Code, dict[str, Any]]:
    if spec == "self":
        return _Code("self", sys.executable, in_process=True), {"kind": "self", "python": sys.executable}
    if spec.startswith("python:"):
        python = spec.removeprefix("python:")
        if not Path(python).is_file():
            raise UsageError(f"--baseline {spec}: no Python interpreter at {python}")
        return _Code(spec, python), {"kind": "installed", "python": python}
    root = _git(["rev-parse", "--show-toplevel"], Path.cwd(), f"--baseline {spec}")
    commit = _git(["rev-parse", "--verify", f"{spec}^{{commit}}"], Path(root), f"--baseline {spec}")
    tree = gate_dir / "baseline-src"
    _git(["worktree", "add", "--detach", "--force", str(tree), commit], Path(root), f"--baseline {spec}")
    return _Code(f"{spec} ({commit[:10]})", sys.executable, str(tree)), {
        "kind": "git",
        "rev": spec,
        "commit": commit,
        "worktree": str(tree),
    }


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


def _run_in_process(scenario: Path, out: Path, *, side: str, index: int, reference: bool) -> Replicate:
    """A replicate of this very code, in this process: a second less per replicate than a new interpreter.

    Used when both sides are this checkout (``--baseline self``, a stored baseline): there is no other code to
    start, and each side runs alike, in the same process, interleaved.
    """
    from bench import runner
    from bench.scenario import load_scenario

    ref = reference_ms() if reference else None
    start = time.monotonic()
    outcome = runner.run(load_scenario(scenario), runner.RunOptions(out=out, calibrate=False))
    seconds = time.monotonic() - start
    return Replicate(side, index, out, 0 if outcome.ok else 1, outcome.results["variants"][0], ref, round(seconds, 2))


def _run_replicate(code: _Code, scenario: Path, out: Path, *, side: str, index: int, reference: bool) -> Replicate:
    if code.in_process:
        return _run_in_process(scenario, out, side=side, index=index, reference=reference)
    ref = reference_ms() if reference else None
    command, env = code.command(scenario, out)
    start = time.monotonic()
    with open(out.parent / f"{out.name}.log", "wb") as log:
        try:
            done = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=REPLICATE_TIMEOUT_S, check=False
            )
            code_ = done.returncode
        except subprocess.TimeoutExpired:
            code_ = -1
    seconds = time.monotonic() - start
    results_path = out / "results.json"
    if not results_path.exists():
        raise UsageError(
            f"replicate {side}{index + 1} ({code.label}) wrote no results (exit code {code_}); see {out}.log"
        )
    results = json.loads(results_path.read_text(encoding="utf-8"))
    return Replicate(side, index, out, code_, results["variants"][0], ref, round(seconds, 2))


def _value(rep: Replicate, metric: MetricName, normalise: bool) -> float | None:
    path, higher_is_better, _ = GATE_METRICS[metric]
    value = get_path(rep.variant, *path)
    if value is None:
        return None
    value = float(value)
    if normalise and metric not in NOT_TIMES and rep.reference_ms:
        # Rates are per time: multiply; times: divide. Either way "as if the machine were as fast as the reference".
        value = value * rep.reference_ms if higher_is_better else value / rep.reference_ms
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
    rows: list[dict[str, Any]] = []
    pvalues: dict[str, float] = {}
    for name, metric in gates.metrics.items():
        higher, unit = GATE_METRICS[name][1], GATE_METRICS[name][2]
        av = [_value(r, name, normalise) for r in a]
        bv = [_value(r, name, normalise) for r in b]
        conf = metric.confidence or gates.confidence
        tol = gates.tolerance if metric.tolerance is None else metric.tolerance
        row: dict[str, Any] = {
            "metric": name,
            "unit": unit if not (normalise and name not in NOT_TIMES) else "x reference",
            "higher_is_better": higher,
            "confidence": conf,
            "tolerance": tol,
            "gated": metric.gate,
        }
        if any(v is None for v in av + bv):
            row.update(verdict="not measured", note="missing in some replicates", a=av, b=bv)
            rows.append(row)
            continue
        a_vals = [float(v) for v in av if v is not None]
        b_vals = [float(v) for v in bv if v is not None]
        change = (
            gate_stats.paired(a_vals, b_vals, confidence=conf, seed=seed)
            if paired
            else gate_stats.unpaired(a_vals, b_vals, confidence=conf, seed=seed)
        )
        # Robust CV (1.4826 x MAD / median): on a shared machine one replicate in ten may stall and double a flush
        # time (seen: A/A pair ratios up to 2.2); that one must not make a metric "too noisy to judge".
        cv_a = gate_stats.cv(a_vals, robust=True) if len(a_vals) >= 2 else 0.0
        cv_b = gate_stats.cv(b_vals, robust=True) if len(b_vals) >= 2 else 0.0
        erratic = max(cv_a, cv_b) > gates.erratic_cv
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
            erratic=erratic,
        )
        if metric.gate and not erratic and change.p_value is not None:
            pvalues[name] = change.p_value
        rows.append(row)
    # One family: the gated, judgeable metrics. Each is compared to its own alpha after Holm's adjustment
    # (with one confidence for all, this is plain Holm).
    adjusted = gate_stats.holm(pvalues, 1 - gates.confidence) if pvalues else {}
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
            row["verdict"] += " (erratic: not gated)"

    counters: list[dict[str, Any]] = []
    for cname in COUNTERS:
        a_c = [counter_value(r.variant, cname) for r in a]
        b_c = [counter_value(r.variant, cname) for r in b]
        ctol = gates.counters.get(cname)
        entry: dict[str, Any] = {"counter": cname, "a": a_c, "b": b_c, "tolerance": ctol, "gated": ctol is not None}
        if cname == "lost":
            bad = [v for v in b_c if v]
            entry["ok"] = not bad
            if bad:
                reasons.append(f"lost: {int(sum(v or 0 for v in bad))} message(s) lost in the candidate's replicates")
        elif ctol is not None and all(v is not None for v in a_c + b_c):
            ref = statistics.median(v for v in a_c if v is not None)
            off = max(abs((v or 0) - ref) for v in b_c)
            entry["ok"] = off <= ctol * abs(ref)
            entry["a_varies"] = len(set(a_c)) > 1
            if not entry["ok"]:
                reasons.append(
                    f"{cname}: candidate {sorted({v for v in b_c if v is not None})} vs baseline {ref:g}"
                    + (" exactly" if ctol == 0 else f" within {ctol:.0%}")
                )
        else:
            entry["ok"] = None
        counters.append(entry)

    bounds: list[dict[str, Any]] = []
    for bname, limit in gates.bounds.items():
        worst_values = [_value(r, bname, False) for r in b]
        measured = [v for v in worst_values if v is not None]
        higher = GATE_METRICS[bname][1]
        worst: float | None = (min(measured) if higher else max(measured)) if measured else None
        ok = worst is not None and (worst >= limit if higher else worst <= limit)
        bounds.append({"metric": bname, "bound": limit, "worst": worst, "ok": ok})
        if not ok:
            reasons.append(
                f"{bname}: candidate's worst replicate {worst if worst is not None else 'not measured'} "
                f"{'below' if higher else 'above'} the bound {limit:g}"
            )
    failed_runs = [f"{r.side}{r.index + 1}" for r in (*a, *b) if r.exit_code != 0]
    if failed_runs:
        reasons.append(f"replicate(s) {', '.join(failed_runs)} failed their own checks (ledger); see their logs")
    return {
        "metrics": rows,
        "counters": counters,
        "bounds": bounds,
        "multiple_comparisons": (
            f"Holm-Bonferroni step-down over the {len(pvalues)} gated, judgeable metric(s) at "
            f"family-wise {_level(1 - gates.confidence)}"
        ),
        "failed": bool(reasons),
        "reasons": reasons,
    }


def run_gate(
    loaded: LoadedScenario, options: GateOptions, on_replicate: Callable[[Replicate, int], None] | None = None
) -> GateOutcome:
    gates = _settings(loaded, options)
    gate_dir = make_run_dir(f"{loaded.scenario.name}-gate", options.out, options.reports_dir)
    (gate_dir / "scenario.yaml").write_bytes(loaded.path.read_bytes())
    stored = Path(options.baseline)
    n = gates.replicates
    # The candidate runs as the baseline does (in this process against self or a stored baseline, in a new
    # interpreter against other code), so start-up costs never differ between the sides.
    candidate = _Code("candidate", sys.executable, in_process=options.baseline == "self" or _is_stored(stored))
    b_scenario = _replicate_scenario(loaded, gate_dir, "B", options.inject_slowdown)
    a: list[Replicate] = []
    b: list[Replicate] = []
    total = 2 * n
    if _is_stored(stored):
        design = "stored"
        baseline_info, a = _load_stored(stored)
        for i in range(n):
            rep = _run_replicate(candidate, b_scenario, gate_dir / f"B{i + 1:02d}", side="B", index=i, reference=True)
            b.append(rep)
            if on_replicate:
                on_replicate(rep, n)
    else:
        design = "paired"
        base, baseline_info = _baseline_code(options.baseline, gate_dir)
        a_scenario = _replicate_scenario(loaded, gate_dir, "A", None)
        try:
            for i in range(n):
                # A B, then B A: each side goes first equally often, so a warm-up or a drift favours neither.
                order = [("A", base, a_scenario, a), ("B", candidate, b_scenario, b)]
                for side, code, scenario, bucket in order if i % 2 == 0 else order[::-1]:
                    rep = _run_replicate(
                        code, scenario, gate_dir / f"{side}{i + 1:02d}", side=side, index=i, reference=False
                    )
                    bucket.append(rep)
                    if on_replicate:
                        on_replicate(rep, total)
        finally:
            if baseline_info.get("kind") == "git":
                _git(["worktree", "remove", "--force", baseline_info["worktree"]], Path.cwd(), "cleanup")
    verdicts = judge(a, b, gates, paired=design == "paired", normalise=design == "stored", seed=options.seed)
    result: dict[str, Any] = {
        "gate_schema": GATE_SCHEMA,
        "kind": "gate",
        "started_at": datetime.now(UTC).isoformat(),
        "scenario": {"name": loaded.scenario.name, "path": str(loaded.path), "sha256": loaded.sha256},
        "design": design,
        "baseline": baseline_info,
        "candidate": {"python": sys.executable, "inject_slowdown": options.inject_slowdown},
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


def _is_stored(path: Path) -> bool:
    return path.is_dir() and (path / BASELINE_FILE).exists()


def _rep_json(r: Replicate) -> dict[str, Any]:
    return {
        "index": r.index,
        "run_dir": str(r.run_dir),
        "exit_code": r.exit_code,
        "reference_ms": r.reference_ms,
        "seconds": r.seconds,
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
        "replicates": [{"variant": r.variant, "reference_ms": r.reference_ms, "exit_code": r.exit_code} for r in reps],
    }
    (folder / BASELINE_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _load_stored(folder: Path) -> tuple[dict[str, Any], list[Replicate]]:
    path = folder / BASELINE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        reps = [
            Replicate("A", i, folder, int(r["exit_code"]), r["variant"], float(r["reference_ms"]))
            for i, r in enumerate(data["replicates"])
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: not a stored baseline written by bench gate --save-baseline ({exc})") from None
    if len(reps) < 3:
        raise UsageError(f"{path}: holds {len(reps)} replicate(s); a comparison needs at least 3")
    return {"kind": "stored", "folder": str(folder), "saved_at": data.get("saved_at")}, reps


def baseline_only(loaded: LoadedScenario, folder: Path, replicates: int | None) -> Path:
    """``bench gate SCENARIO --save-baseline DIR`` without a comparison: run the replicates, keep them."""
    gates = _settings(loaded, GateOptions(baseline="self", replicates=replicates))
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        scenario = _replicate_scenario(loaded, Path(tmp), "A", None)
        reps = [
            _run_replicate(
                _Code("baseline", sys.executable),
                scenario,
                Path(tmp) / f"A{i + 1:02d}",
                side="A",
                index=i,
                reference=True,
            )
            for i in range(gates.replicates)
        ]
        save_baseline(folder, reps, loaded)
        shutil.rmtree(Path(tmp), ignore_errors=True)
    return folder / BASELINE_FILE


def _level(alpha: float) -> str:
    """0.05 -> '5%', 0.001 -> '0.1%' (a level must not round to 0%)."""
    return f"{round(alpha * 100, 4):g}%"


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:+.1%}"


def markdown(result: dict[str, Any]) -> str:
    """The gate's verdict as Markdown, for a pull-request comment or a CI job summary."""
    head = "FAILED" if result["failed"] else "passed"
    lines = [
        f"## bench gate: {result['scenario']['name']} — {head}",
        "",
        f"Design: {result['design']} ({len(result['replicates']['B'])} replicates per side); baseline: "
        f"{result['baseline'].get('rev') or result['baseline'].get('kind')}; "
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
    lines += ["", "| counter | baseline | candidate | check |", "|---|---|---|---|"]
    for c in result["counters"]:
        check = {True: "ok", False: "**FAILED**", None: "-"}[c["ok"]]
        lines.append(f"| {c['counter']} | {_span(c['a'])} | {_span(c['b'])} | {check} |")
    if result["bounds"]:
        lines += ["", "| bound | limit | candidate's worst | check |", "|---|---:|---:|---|"]
        for bnd in result["bounds"]:
            lines.append(
                f"| {bnd['metric']} | {bnd['bound']:g} | {bnd['worst']} | {'ok' if bnd['ok'] else '**FAILED**'} |"
            )
    if result["reasons"]:
        lines += ["", "Why it failed:", *[f"- {r}" for r in result["reasons"]]]
    return "\n".join(lines) + "\n"


def _span(values: Sequence[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    lo, hi = min(known), max(known)
    return f"{lo:,.0f}" if lo == hi else f"{lo:,.0f} .. {hi:,.0f}"


def _replicates_from(path: Path) -> list[Replicate]:
    """A results.json, a run folder, or a folder of run folders (e.g. a gate's), as replicates."""
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
    for i, f in enumerate(files):
        try:
            results = json.loads(f.read_text(encoding="utf-8"))
            variant = results["variants"][0]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise UsageError(f"{f}: not a bench results.json ({exc})") from None
        reps.append(Replicate("A", i, f.parent, 0, variant))
    return reps


def compare(a: Path, b: Path, *, confidence: float = 0.90, tolerance: float = 0.05) -> dict[str, Any]:
    """``bench compare A B``: every metric of the catalogue, unpaired (each side's replicates as a sample).

    With fewer than three replicates a side the change is shown without an interval or a verdict (there is no
    noise estimate to judge it against): compare folders of replicates, or use ``bench gate``.
    """
    reps_a, reps_b = _replicates_from(a), _replicates_from(b)
    reps_b = [Replicate("B", r.index, r.run_dir, r.exit_code, r.variant) for r in reps_b]
    present = [
        name
        for name, (path, _, _) in GATE_METRICS.items()
        if all(get_path(r.variant, *path) is not None for r in (*reps_a, *reps_b))
    ]
    gates = GateSettings(
        confidence=confidence,
        tolerance=tolerance,
        metrics={name: GateMetric() for name in present},
    )
    verdicts = judge(reps_a, reps_b, gates, paired=False, normalise=False)
    return {
        "kind": "compare",
        "scenario": {"name": f"{a} vs {b}"},
        "design": f"unpaired, {len(reps_a)} vs {len(reps_b)} replicate(s)",
        "baseline": {"kind": "runs", "path": str(a)},
        "candidate": {"path": str(b)},
        "replicates": {"A": [_rep_json(r) for r in reps_a], "B": [_rep_json(r) for r in reps_b]},
        **verdicts,
    }


def run_experiment(
    loaded: LoadedScenario,
    *,
    trials: int,
    slowdowns: Sequence[float],
    replicates: int | None = None,
    out: Path | None = None,
    reports_dir: Path = Path("reports"),
    on_gate: Callable[[str, int, GateOutcome], None] | None = None,
) -> Path:
    """How often does the gate cry wolf (A/A), and how often does it catch an injected slowdown?

    Each trial runs one A/A gate and one gate per slowdown, in turn, so that a drift of the machine during the
    experiment hits every condition alike. Rates come with Clopper-Pearson 95% intervals. experiment.json and
    experiment.md are rewritten after every gate, so an interrupted experiment still reports what it measured.
    """
    from scipy.stats import binomtest

    folder = make_run_dir(f"{loaded.scenario.name}-gate-experiment", out, reports_dir)
    conditions: list[tuple[str, float | None]] = [("A/A", None), *((f"{s:.0%} slower", s) for s in slowdowns)]
    outcomes: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in conditions}
    gates = _settings(loaded, GateOptions(baseline="self", replicates=replicates))
    for trial in range(trials):
        for name, slowdown in conditions:
            gate_dir = folder / f"trial-{trial + 1:03d}-{name.replace('/', '').replace(' ', '-').replace('%', 'pct')}"
            options = GateOptions(
                baseline="self", out=gate_dir, inject_slowdown=slowdown, replicates=replicates, seed=trial
            )
            outcome = run_gate(loaded, options)
            flush = next((m for m in outcome.result["metrics"] if m["metric"] == "flush_mean_ms"), None)
            outcomes[name].append(
                {
                    "trial": trial + 1,
                    "failed": outcome.failed,
                    "reasons": outcome.reasons,
                    "flush_mean_change": flush.get("change") if flush else None,
                }
            )
            # Keep only the verdicts: the replicates' data files of hundreds of runs are not worth the disk.
            for rep in gate_dir.glob("[AB][0-9]*"):
                if rep.is_dir():
                    shutil.rmtree(rep / "data", ignore_errors=True)
            if on_gate:
                on_gate(name, trial, outcome)
        summary = []
        for name, slowdown in conditions:
            runs = outcomes[name]
            k = sum(r["failed"] for r in runs)
            ci = binomtest(k, len(runs)).proportion_ci(0.95, method="exact")
            changes = [r["flush_mean_change"] for r in runs if r["flush_mean_change"] is not None]
            summary.append(
                {
                    "condition": name,
                    "injected_slowdown": slowdown,
                    "gates": len(runs),
                    "failed": k,
                    "rate": k / len(runs),
                    "rate_ci95": [ci.low, ci.high],
                    "median_flush_mean_change": statistics.median(changes) if changes else None,
                    "meaning": "false-alarm rate" if slowdown is None else "detection rate",
                }
            )
        data = {
            "kind": "gate-experiment",
            "scenario": {"name": loaded.scenario.name, "path": str(loaded.path), "sha256": loaded.sha256},
            "settings": gates.model_dump(mode="json"),
            "trials_done": trial + 1,
            "summary": summary,
            "gates": outcomes,
            "environment": environment(),
        }
        (folder / "experiment.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        (folder / "experiment.md").write_text(experiment_markdown(data), encoding="utf-8")
    return folder


def experiment_markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    lines = [
        f"## Gate experiment: {data['scenario']['name']} ({data['trials_done']} trial(s) per condition)",
        "",
        f"Each gate: {s['replicates']} A/B pairs interleaved, Holm at family-wise {_level(1 - s['confidence'])}, "
        f"tolerance {s['tolerance']:.0%}; the candidate's storage made slower by the slow_sink fault's factor.",
        "",
        "| condition | gates | failed | rate | 95% interval | median measured flush change |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for row in data["summary"]:
        change = row["median_flush_mean_change"]
        lines.append(
            f"| {row['condition']} ({row['meaning']}) | {row['gates']} | {row['failed']} | {row['rate']:.1%} | "
            f"{row['rate_ci95'][0]:.1%} .. {row['rate_ci95'][1]:.1%} | {_pct(change)} |"
        )
    return "\n".join(lines) + "\n"
