"""bench gate and bench compare: the verdict logic on replicates with known values, and real gates end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.cli import main
from bench.errors import Inconclusive, UsageError
from bench.gate import runner as gate
from bench.gate import stats as gate_stats
from bench.results import SCHEMA_VERSION
from bench.results.model import Results, Variant, read_results
from bench.scenario import GateMetric, GateSettings, load_scenario
from tests.conftest import ROOT, SCENARIOS


def _variant(flush_ms: float, *, lost: int = 0, persisted: int = 10_000, flushes: int = 20) -> Variant:
    """A variant holding only what the gate reads: the ledger, the files, the size flushes and the peak RSS."""
    return Variant.model_validate(
        {
            "name": "default",
            "config": {"pipeline": {}},
            "ledger": {
                "sent": persisted + lost,
                "persisted": persisted,
                "rejected": 0,
                "dropped": 0,
                "lost": lost,
                "duplicates": 0,
            },
            "throughput": {},
            "latency_ms": {},
            "files": 1,
            "probes": {
                "flush": {
                    "parquet": {
                        "size": {"count": flushes, "rows": persisted, "total_ms": {"count": flushes, "mean": flush_ms}}
                    }
                }
            },
            "resources": {"peak_rss_mb": 200.0},
        }
    )


def _write_results(folder: Path, scenario: str, variant: Variant) -> None:
    """A run folder whose results.json holds ``variant``, as a run of ``scenario`` would write it."""
    folder.mkdir(parents=True, exist_ok=True)
    results = Results.model_validate(
        {
            "schema_version": SCHEMA_VERSION,
            "run_id": f"{scenario}-0000",
            "started_at": "2026-01-01T00:00:00+00:00",
            "scenario": {"name": scenario, "path": f"scenarios/{scenario}.yaml", "sha256": "0" * 64, "seed": 0},
            "environment": {
                "python": "3.11.7",
                "implementation": "cpython",
                "platform": "Linux",
                "machine": "x86_64",
                "packages": {},
            },
            "variants": [variant],
        }
    )
    results.write(folder / "results.json")


def _reps(side: str, values: list[float], **kw: Any) -> list[gate.Replicate]:
    return [gate.Replicate(side, i, Path(f"{side}{i}"), 0, _variant(v, **kw)) for i, v in enumerate(values)]


SETTINGS = GateSettings(
    replicates=8,
    confidence=0.90,
    tolerance=0.05,
    metrics={"flush_mean_ms": GateMetric()},
    bounds={"peak_rss_mb": 1000},
)
# Lognormal noise with a fixed seed: the verdicts below are deterministic.
NOISE = np.random.default_rng(7).lognormal(0.0, 0.03, size=(2, 8))


def test_a_clear_slowdown_beyond_the_tolerance_fails_the_gate() -> None:
    a = _reps("A", list(10 * NOISE[0]))
    b = _reps("B", list(12 * NOISE[1]))
    verdict = gate.judge(a, b, SETTINGS, paired=True, normalise=False)
    (row,) = verdict["metrics"]
    assert row["verdict"] == "worse" and row["regression"]
    assert 0.15 < row["change"] < 0.25 and row["ci"][0] > 0
    assert verdict["failed"] and "flush_mean_ms" in verdict["reasons"][0]
    assert "Holm" in verdict["multiple_comparisons"]


def test_the_same_code_against_itself_passes() -> None:
    verdict = gate.judge(
        _reps("A", list(10 * NOISE[0])), _reps("B", list(10 * NOISE[1])), SETTINGS, paired=True, normalise=False
    )
    assert not verdict["failed"], verdict["reasons"]
    assert verdict["metrics"][0]["verdict"] == "no significant change"


def test_a_significant_change_within_the_tolerance_passes() -> None:
    # +3% every time: significant, but smaller than the 5% that matters.
    verdict = gate.judge(
        _reps("A", [10.0] * 8), _reps("B", [10.3 + 0.001 * i for i in range(8)]), SETTINGS, paired=True, normalise=False
    )
    assert not verdict["failed"]


def test_an_erratic_gated_metric_makes_the_gate_inconclusive_not_passed() -> None:
    wild = [10.0, 30.0, 5.0, 40.0, 8.0, 60.0, 9.0, 50.0]
    verdict = gate.judge(_reps("A", wild), _reps("B", [2 * v for v in wild]), SETTINGS, paired=True, normalise=False)
    row = verdict["metrics"][0]
    assert row["erratic"] and not row["regression"] and "erratic" in row["verdict"]
    assert not verdict["failed"]
    assert verdict["outcome"] == "inconclusive"
    assert "flush_mean_ms: too noisy to judge" in verdict["inconclusive"][0]


def test_too_few_pairs_for_the_test_to_ever_reject_is_inconclusive() -> None:
    # 4 pairs: the smallest two-sided Wilcoxon p is 2/16 = 0.125, above the 10% level: whatever the data.
    a, b = _reps("A", [10.0, 10.1, 9.9, 10.0]), _reps("B", [20.0, 20.1, 19.9, 20.0])
    verdict = gate.judge(a, b, SETTINGS, paired=True, normalise=False)
    assert verdict["outcome"] == "inconclusive" and not verdict["failed"]
    assert "cannot reach p <= 0.1" in verdict["inconclusive"][0]
    assert verdict["metrics"][0]["verdict"].startswith("insufficient data")
    # 5 pairs can (2/32 = 0.0625 <= 0.10): the same +100% now fails.
    a5, b5 = _reps("A", [10.0, 10.1, 9.9, 10.0, 10.2]), _reps("B", [20.0, 20.1, 19.9, 20.0, 20.3])
    assert gate.judge(a5, b5, SETTINGS, paired=True, normalise=False)["outcome"] == "failed"


def test_a_gated_metric_missing_from_the_baseline_is_inconclusive() -> None:
    # An older baseline revision that does not report a metric the scenario gates: nothing to judge it on.
    settings = SETTINGS.model_copy(update={"metrics": {"flush_mean_ms": GateMetric(), "hot_path_cpu_us": GateMetric()}})
    verdict = gate.judge(_reps("A", [10.0] * 8), _reps("B", [10.0] * 8), settings, paired=True, normalise=False)
    assert verdict["outcome"] == "inconclusive"
    assert any(r.startswith("hot_path_cpu_us: not measured") for r in verdict["inconclusive"])


def test_lost_data_fails_even_when_the_timings_are_inconclusive() -> None:
    verdict = gate.judge(_reps("A", [10.0] * 4), _reps("B", [10.0] * 4, lost=2), SETTINGS, paired=True, normalise=False)
    assert verdict["outcome"] == "failed" and verdict["inconclusive"]


def test_any_lost_message_fails_whatever_the_timings() -> None:
    verdict = gate.judge(
        _reps("A", list(10 * NOISE[0])), _reps("B", list(10 * NOISE[1]), lost=1), SETTINGS, paired=True, normalise=False
    )
    assert verdict["failed"] and any(r.startswith("lost:") for r in verdict["reasons"])


def test_a_counter_that_changes_fails_exactly() -> None:
    verdict = gate.judge(
        _reps("A", [10.0] * 8), _reps("B", [10.0] * 8, persisted=9_999), SETTINGS, paired=True, normalise=False
    )
    assert verdict["failed"] and any(r.startswith("persisted:") for r in verdict["reasons"])
    # flushes has a 10% tolerance by default: 25 instead of 20 is beyond it.
    verdict = gate.judge(
        _reps("A", [10.0] * 8), _reps("B", [10.0] * 8, flushes=25), SETTINGS, paired=True, normalise=False
    )
    assert verdict["failed"] and any(r.startswith("flushes:") for r in verdict["reasons"])


def test_a_bound_is_a_service_level_on_the_worst_replicate() -> None:
    settings = SETTINGS.model_copy(update={"bounds": {"flush_mean_ms": 11.0}})
    b = _reps("B", [10.0] * 7 + [11.5])
    verdict = gate.judge(_reps("A", [10.0] * 8), b, settings, paired=True, normalise=False)
    assert verdict["bounds"][0] == {"metric": "flush_mean_ms", "bound": 11.0, "worst": 11.5, "ok": False}
    assert verdict["failed"]


def test_a_stored_baseline_is_normalised_by_the_reference_workload() -> None:
    # The machine is 30% slower today: every flush and the reference alike. Normalised, nothing changed.
    a = [gate.Replicate("A", i, Path("a"), 0, _variant(10.0 * n), 100.0 * n) for i, n in enumerate(NOISE[0])]
    b = [gate.Replicate("B", i, Path("b"), 0, _variant(13.0 * n), 130.0 * n) for i, n in enumerate(NOISE[1])]
    normalised = gate.judge(a, b, SETTINGS, paired=False, normalise=True)
    assert not normalised["failed"]
    raw = gate.judge(a, b, SETTINGS, paired=False, normalise=False)
    assert raw["failed"], "without the reference the slower machine would read as a regression"


def test_a_stored_baseline_keeps_its_variants_as_the_results_hold_them(tmp_path: Path) -> None:
    reps = [gate.Replicate("B", i, Path(f"B{i}"), 0, _variant(10.0 + i), 100.0 + i) for i in range(3)]
    gate.save_baseline(tmp_path, reps, load_scenario(SCENARIOS / "gate.yaml"))
    _, stored = gate._load_stored(tmp_path)
    assert [r.variant for r in stored] == [r.variant for r in reps]
    assert [r.reference_ms for r in stored] == [100.0, 101.0, 102.0]
    # A variant this bench cannot read is refused, naming the file and the field.
    path = tmp_path / "baseline.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["replicates"][1]["variant"]["ledger"]["persited"] = 1
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UsageError, match=r"baseline\.json: replicates\[1\]\.variant: ledger\.persited: unknown key"):
        gate._load_stored(tmp_path)


def test_markdown_names_the_method_and_the_reasons() -> None:
    verdict = gate.judge(
        _reps("A", list(10 * NOISE[0])), _reps("B", list(12 * NOISE[1])), SETTINGS, paired=True, normalise=False
    )
    result = {
        "scenario": {"name": "gate"},
        "design": "paired",
        "baseline": {"kind": "self"},
        "replicates": {"A": [{}] * 8, "B": [{}] * 8},
        **verdict,
    }
    text = gate.markdown(result)
    assert "FAILED" in text and "Holm" in text and "| flush_mean_ms |" in text and "Why it failed" in text


def test_the_reference_workload_takes_measurable_time() -> None:
    assert gate.reference_ms(rows=2_000, batches=4, trials=1) > 0


# ----------------------------------------------------------------------------- real gates, end to end


def _gate(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "gate"
    code = main(["gate", str(SCENARIOS / "gate.yaml"), "--out", str(out), "--replicates", "3", "--json", *args])
    return code, json.loads((out / "gate.json").read_text())


def test_a_gate_against_a_git_revision_runs_both_sides_interleaved(tmp_path: Path) -> None:
    """A/B against HEAD of this checkout (a worktree on PYTHONPATH); three pairs, so no verdict is possible
    (Wilcoxon's smallest two-sided p with 3 pairs is 0.25): the gate is inconclusive (exit 3), never "passed",
    and every replicate says which code it imported."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    code, result = _gate(tmp_path, "--baseline", "HEAD")
    assert code == 3 and result["outcome"] == "inconclusive", result["reasons"]
    assert result["design"] == "paired" and result["baseline"]["commit"] == head.stdout.strip()
    assert [r["index"] for r in result["replicates"]["A"]] == [0, 1, 2]
    assert all(c["ok"] in (True, None) for c in result["counters"])
    persisted = next(c for c in result["counters"] if c["counter"] == "persisted")
    assert persisted["a"] == persisted["b"] == [20_000.0] * 3
    worktree = (tmp_path / "gate" / "baseline-src").resolve()
    for rep in result["replicates"]["A"]:
        assert all(Path(f).is_relative_to(worktree) for f in rep["modules"].values()), rep["modules"]
        assert rep["commit"] == head.stdout.strip()
    for rep in result["replicates"]["B"]:
        assert all(Path(f).is_relative_to(ROOT.resolve()) for f in rep["modules"].values()), rep["modules"]
    assert result["code"]["A"]["commit"] == head.stdout.strip()
    assert not (tmp_path / "gate" / "baseline-src").exists(), "the worktree is removed afterwards"


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def marked_repo(tmp_path: Path) -> tuple[Path, str]:
    """A git repository holding a copy of this project (the baseline commit), and in its working tree a
    candidate whose runs write a mark into results.json that the baseline's runs cannot write."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("bench", "pipeline", "simulators"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "baseline")
    base = _git(repo, "rev-parse", "HEAD")
    runner = repo / "bench" / "harness" / "runner.py"
    text = runner.read_text()
    # The mark is the run id's prefix: a field every schema version has, so the results model accepts it.
    anchor = '    run_id = f"{sc.name}-{uuid.uuid4().hex[:8]}"'
    assert anchor in text, "the mark needs a stable place in bench/harness/runner.py's results"
    runner.write_text(text.replace(anchor, '    run_id = f"candidate-{sc.name}-{uuid.uuid4().hex[:8]}"', 1))
    return repo, base


def test_a_marked_baseline_revision_is_really_the_code_that_ran(tmp_path: Path, marked_repo: tuple[Path, str]) -> None:
    """Run as a user's CI does, from the candidate's checkout root (the working directory that ``python -m``
    used to put ahead of the baseline's worktree): the baseline's replicates must run the baseline commit,
    the candidate's the working tree, as the mark in each replicate's results.json shows."""
    repo, base = marked_repo
    out = tmp_path / "gate"
    argv = ["gate", str(SCENARIOS / "gate.yaml"), "--baseline", base, "--replicates", "3", "--out", str(out), "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *argv],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 3, done.stderr[-3000:]  # 3 pairs: inconclusive, as above
    result = json.loads((out / "gate.json").read_text())
    marks = {
        side: [read_results(Path(r["run_dir"])).run_id.startswith("candidate-") for r in reps]
        for side, reps in result["replicates"].items()
    }
    assert marks == {"A": [False] * 3, "B": [True] * 3}
    assert result["code"]["A"]["commit"] == base
    assert result["code"]["B"]["root"] == str(repo.resolve())
    assert result["code"]["A"]["code_sha256"] != result["code"]["B"]["code_sha256"]


def test_the_same_code_on_both_sides_of_a_differing_revision_is_refused(marked_repo: tuple[Path, str]) -> None:
    repo, base = marked_repo
    same = {"code_sha256": "0" * 64, "root": str(repo)}
    baseline = {"kind": "git", "rev": "base", "commit": base, "repo": str(repo)}
    side = gate._Side("B", "candidate", sys.executable, repo)
    with pytest.raises(Inconclusive, match="both sides imported the same code"):
        gate._refuse_same_code(baseline, {"A": same, "B": same}, side)
    # Different code, as git says: no objection.
    gate._refuse_same_code(baseline, {"A": same, "B": {**same, "code_sha256": "1" * 64}}, side)


def test_a_worker_that_imports_other_code_than_its_side_is_refused(tmp_path: Path) -> None:
    # The side claims its code lives in tmp_path; the worker (no PYTHONPATH) imports this checkout instead.
    side = gate._Side("A", "elsewhere", sys.executable, tmp_path)
    with pytest.raises(Inconclusive, match=r"imported bench from .*, not from"):
        gate._Worker(side, tmp_path, "check")


def test_a_stored_baseline_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stored = tmp_path / "baseline"
    assert main(["gate", str(SCENARIOS / "gate.yaml"), "--save-baseline", str(stored), "--replicates", "3"]) == 0
    data = json.loads((stored / "baseline.json").read_text())
    assert len(data["replicates"]) == 3 and all(r["reference_ms"] > 0 for r in data["replicates"])
    code, result = _gate(tmp_path, "--baseline", str(stored))
    assert code == 3, result["reasons"]  # 3 vs 3: Mann-Whitney cannot reach the level
    assert result["design"] == "stored"
    hot = next(m for m in result["metrics"] if m["metric"] == "hot_path_cpu_us")
    assert hot["unit"] == "us/msg", "CPU time is not divided by the wall-time reference"
    flush = next(m for m in result["metrics"] if m["metric"] == "flush_mean_ms")
    assert flush["unit"] == "x reference" and "Mann-Whitney" in flush["method"]


def test_bench_compare_two_folders_of_replicates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _gate(tmp_path, "--baseline", "self")
    assert code == 3  # three pairs: inconclusive
    runs = tmp_path / "gate"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for rep in sorted(runs.glob("[AB]0*/")):
        (a if rep.name.startswith("A") else b).joinpath(rep.name).symlink_to(rep)
    capsys.readouterr()
    # 3 vs 3 runs: Mann-Whitney's smallest p is 0.1, far above 10% over a dozen metrics: insufficient data.
    assert main(["compare", str(a), str(b), "--json"]) == 3
    result = json.loads(capsys.readouterr().out)
    assert result["design"] == "unpaired, 3 vs 3 replicate(s)" and result["outcome"] == "inconclusive"
    names = {m["metric"] for m in result["metrics"]}
    assert {"flush_mean_ms", "e2e_p99_ms", "peak_rss_mb", "hot_path_cpu_us"} <= names
    assert all(m["verdict"].startswith("insufficient data") or m["erratic"] for m in result["metrics"])
    # One run a side: insufficient data in every output format, and a non-zero exit.
    for fmt in ("--markdown", "--json", None):
        argv = ["compare", str(a / "A01"), str(b / "B01")] + ([fmt] if fmt else [])
        assert main(argv) == 3
        captured = capsys.readouterr()
        assert "insufficient data" in captured.out and "INCONCLUSIVE" in captured.out + captured.err


def test_bench_compare_refuses_runs_of_different_scenarios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = {}
    for name in ("steady", "burst"):
        folder = tmp_path / name
        _write_results(folder, name, _variant(10.0))
        runs[name] = folder
    assert main(["compare", str(runs["steady"]), str(runs["burst"])]) == 2
    err = capsys.readouterr().err
    assert "different scenarios (burst, steady)" in err and "--allow-different-scenarios" in err
    assert main(["compare", str(runs["steady"]), str(runs["burst"]), "--allow-different-scenarios"]) == 3
    assert "warning: the runs are of different scenarios" in capsys.readouterr().err


def test_a_failed_comparison_exits_1(tmp_path: Path) -> None:
    for side, flush in (("a", 10.0), ("b", 20.0)):
        for i in range(8):
            _write_results(tmp_path / side / f"r{i}", "x", _variant(flush * (1 + 0.01 * i)))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 1


def test_a_bad_baseline_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["gate", str(SCENARIOS / "gate.yaml"), "--baseline", "no-such-rev-xyz", "--out", str(tmp_path / "g")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--baseline no-such-rev-xyz" in err and "git revision" in err and "Traceback" not in err


def test_one_stalled_replicate_does_not_make_a_metric_erratic() -> None:
    # Seen on the CI machine: about one replicate in ten stalls and doubles its flush time.
    a = [10.0, 10.3, 9.8, 10.1, 21.0, 9.9, 10.2, 10.0]
    b = [12.1, 12.4, 11.8, 12.2, 12.0, 11.9, 12.3, 12.0]
    verdict = gate.judge(_reps("A", a), _reps("B", b), SETTINGS, paired=True, normalise=False)
    row = verdict["metrics"][0]
    assert not row["erratic"] and "erratic" not in row["verdict"]
    assert gate_stats.cv(a) > 0.25, "the plain CV would have called it erratic"
    # (Whether +20% is significant here is the rank test's business: one pair the other way round, with the
    # largest difference, leaves p = 50/256 with 8 pairs.)


def test_one_coalesced_flush_is_within_the_default_flush_tolerance() -> None:
    # Seen in an A/A gate on a busy machine: a stalled flush served two size triggers, 19 flushes instead of 20.
    defaults = GateSettings(metrics={"flush_mean_ms": GateMetric()})
    b = _reps("B", [10.0] * 7, flushes=20) + _reps("B", [10.0], flushes=19)
    verdict = gate.judge(_reps("A", [10.0] * 8), b, defaults, paired=True, normalise=False)
    flushes = next(c for c in verdict["counters"] if c["counter"] == "flushes")
    assert flushes["ok"] and not verdict["failed"]


PATCHES = sorted((ROOT / "scenarios" / "gate-patches").glob("*.patch"))


@pytest.mark.parametrize("patch", PATCHES, ids=[p.stem for p in PATCHES])
def test_the_shipped_gate_patches_apply_to_this_tree(patch: Path) -> None:
    """The experiment and .ci/run build candidates from these; a patch that no longer applies must fail here."""
    done = subprocess.run(
        ["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_the_default_experiment_patches_are_shipped() -> None:
    assert {p.name for p in PATCHES} >= set(gate.DEFAULT_PATCHES) | {"sink-cpu-50.patch"}


def test_a_candidate_patch_gates_a_worktree_against_its_base(tmp_path: Path) -> None:
    """The path the experiment and .ci/run take, end to end: HEAD + a patch in a worktree, gated from that
    worktree's root against HEAD; three pairs, so inconclusive (exit 3), with the candidate's code from the
    worktree and the baseline's from its own."""
    out = tmp_path / "patched"
    patch = ROOT / "scenarios" / "gate-patches" / "aa-comment.patch"
    argv = ["gate", str(SCENARIOS / "gate.yaml"), "--baseline", "HEAD", "--candidate-patch", str(patch)]
    assert main([*argv, "--replicates", "3", "--out", str(out), "--json"]) == 3
    result = json.loads((out / "gate" / "gate.json").read_text())
    assert result["outcome"] == "inconclusive"
    assert result["code"]["B"]["root"] == str((out / "candidate-src").resolve())
    assert result["code"]["A"]["root"] == str((out / "gate" / "baseline-src").resolve())
    assert result["code"]["A"]["code_sha256"] != result["code"]["B"]["code_sha256"], "the comment is code too"
    assert not (out / "candidate-src").exists() and not (out / "gate" / "baseline-src").exists()


def test_a_patch_that_does_not_apply_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.patch"
    bad.write_text("--- a/pipeline/nothing.py\n+++ b/pipeline/nothing.py\n@@ -1 +1 @@\n-x\n+y\n")
    argv = ["gate", str(SCENARIOS / "gate.yaml"), "--baseline", "HEAD", "--candidate-patch", str(bad)]
    assert main([*argv, "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "--candidate-patch" in err and "bad.patch" in err and "Traceback" not in err


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin apart"
)
def test_a_worker_started_ahead_imports_on_other_cpus_and_runs_every_thread_on_the_gate_cpu() -> None:
    """A gate starts the next replicate's worker while one runs (bench/gate/runner.py ``_interleave``): it must
    import away from the gate's CPU, then move every thread it has, not only the calling one (what
    ``sched_setaffinity(0)`` sets), to that CPU before its replicate."""
    first, gate_cpu = sorted(os.sched_getaffinity(0))[0], gate.gate_cpu()
    assert gate_cpu is not None and gate_cpu != first
    script = """
import json, os, threading
from pathlib import Path
from bench.gate import worker
started = threading.Event()
stop = threading.Event()
def idle():
    started.set()
    stop.wait(30)
t = threading.Thread(target=idle)
t.start()
started.wait()
def where():
    return {t.name: sorted(os.sched_getaffinity(int(t.name))) for t in Path("/proc/self/task").iterdir()}
worker.pin("BENCH_GATE_IMPORT_CPUS")
before = where()
worker.pin("BENCH_GATE_CPU")
after = where()
stop.set()
t.join()
print(json.dumps({"before": before, "after": after}))
"""
    env = {**os.environ, "BENCH_GATE_IMPORT_CPUS": str(first), "BENCH_GATE_CPU": str(gate_cpu)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert len(seen["before"]) >= 2, "the idle thread and the main thread"
    assert all(cpus == [first] for cpus in seen["before"].values()), seen
    assert all(cpus == [gate_cpu] for cpus in seen["after"].values()), seen
