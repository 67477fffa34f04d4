"""bench report: a self-contained HTML report and a Markdown summary, rendered from real runs and read by a browser."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bench.errors import UsageError
from bench.harness import runner
from bench.report.render import FAULT_COLUMNS, FAULT_TABLE_PREFIX, PLOT_IDS, TABLE_IDS, ReportPaths, write_report
from bench.results import SCHEMA_VERSION
from bench.results.metrics import METRIC_ROWS
from bench.results.model import read_results
from bench.scenario import load_scenario
from tests.conftest import SCENARIOS

RESULTS_DATA = Path(__file__).parent / "data" / "results"
# One passing run of each older version and kind; v9-faults.json (a failed fault run) has a test of its own.
OLD_RESULTS = sorted(p for p in RESULTS_DATA.glob("v*.json") if re.fullmatch(r"v\d+-(run|capacity|load)\.json", p.name))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CAPACITY_PLOTS = ("plot-capacity", "plot-capacity-latency", "plot-usl")
RUN_PLOTS = tuple(p for p in PLOT_IDS if p not in CAPACITY_PLOTS)
CHROMIUM_TIMEOUT_S = 60
# Headless Chromium as a user's browser would open the file, minus everything that talks to the network or needs
# a desktop session. --no-sandbox: these tests may run as root (CI containers), where the sandbox refuses to start.
# The host-resolver rule makes any network reference fail to load, so it would show as a broken image.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
# Appended to a copy of the report: writes into the DOM how many images decoded, and any error the page raised.
PROBE = """<script>
window.addEventListener("error", function (e) {
  var what = e.message || (e.target && e.target.tagName) || "error";
  document.body.setAttribute("data-errors", (document.body.getAttribute("data-errors") || "") + what + ";");
}, true);
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
});
</script>
"""


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lock_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real two-variant run (coarse vs swap lock), cut to 1,500 messages: a few seconds."""
    out = tmp_path_factory.mktemp("runs") / "lock"
    loaded = load_scenario(SCENARIOS / "lock_contention.yaml")
    outcome = runner.run(loaded, runner.RunOptions(out=out, messages=1500, calibrate=False))
    assert outcome.ok, outcome.problems()
    return out


@pytest.fixture(scope="module")
def capacity_run(lock_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder whose results.json holds a synthetic capacity sweep that saturates at every worker count.

    A real sweep that saturates takes minutes; the rendering of saturation, knees, limits and warnings is
    checked here on a copy of the real lock run's results with a sweep of the documented shape added. Real
    sweeps and their reports are in tests/test_capacity.py (embedded broker; Mosquitto with 1 and 2 workers,
    every plot present).
    """
    out = tmp_path_factory.mktemp("runs") / "capacity"
    out.mkdir()
    results = json.loads((lock_run / "results.json").read_text(encoding="utf-8"))
    results["capacity"] = capacity_sweep()
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def lock_report(lock_run: Path, tmp_path_factory: pytest.TempPathFactory) -> ReportPaths:
    return write_report([lock_run], tmp_path_factory.mktemp("report-lock"))


@pytest.fixture(scope="module")
def capacity_report(capacity_run: Path) -> ReportPaths:
    return write_report([capacity_run])


def capacity_sweep() -> dict[str, Any]:
    """A capacity sweep of the shape ``bench capacity`` writes, from a plausible model of a saturating pipeline."""
    lam, sigma, kappa = 1800.0, 0.08, 0.002

    def usl(n: int) -> float:
        return lam * n / (1 + sigma * (n - 1) + kappa * n * (n - 1))

    series = []
    for workers in (1, 2, 4):
        cap = usl(workers)
        steps: list[dict[str, Any]] = []
        for offered in range(500, 6001, 500):
            rho = offered / cap
            persisted = min(offered, cap * 0.97) * 0.998
            ratio = persisted / offered
            growing = ratio < 0.98
            p50 = 18 + 40 * min(rho, 0.95) / (1 - min(rho, 0.95)) + (400 * (rho - 1) if rho > 1 else 0)
            steps.append(
                {
                    "offered_per_s": float(offered),
                    "sent_per_s": offered * 0.999,
                    "publisher_kept_up": True,
                    "persisted_per_s": round(persisted, 1),
                    "achieved_ratio": round(ratio, 3),
                    "backlog_slope_per_s": round(max(offered - persisted, 0) if growing else 0.4, 1),
                    "backlog_end": int(max(offered - persisted, 0) * 20) if growing else 12,
                    "backlog_growing": growing,
                    "latency_ms": {
                        "end_to_end": {
                            "p50": round(p50, 1),
                            "p90": round(p50 * 1.6, 1),
                            "p99": round(p50 * 2.4, 1),
                            "p999": round(p50 * 3.0, 1),
                            "max": round(p50 * 3.5, 1),
                            "count": int(persisted * 20),
                        }
                    },
                    "flush_ms": {"p50": 4.1, "p99": 9.8 + rho * 3, "max": 30.0, "count": 80},
                    "lock_wait_ms": {"p50": 0.001, "p99": 0.004, "max": 0.2, "count": int(persisted * 20)},
                    "cpu_pct": round(min(100.0 * workers, 25 + 60 * rho * workers), 1),
                    "rss_mb": 80.0 + 8 * workers,
                    "sustainable": not growing,
                    "verdict": "unsustainable" if growing else "sustainable",
                    "little": {
                        "mean_in_system": round(persisted * p50 / 1000, 1),
                        "arrival_per_s": round(persisted, 1),
                        "mean_time_s": round(p50 / 1000, 4),
                        "predicted": round(persisted * p50 / 1000, 1),
                        "ratio": 1.02,
                    },
                    "timeline": {"t_s": [0.0, 10.0, 20.0], "backlog": [0, 6, 12]},
                }
            )
        sustainable = [s for s in steps if s["sustainable"]]
        best = sustainable[-1]
        first_p99 = steps[0]["latency_ms"]["end_to_end"]["p99"]
        knee = next((s for s in steps if s["latency_ms"]["end_to_end"]["p99"] > 3 * first_p99), None)
        series.append(
            {
                "workers": workers,
                "limit": f"the pipeline's CPU (pipeline worker {min(95, 60 + 10 * workers)}% of a core)",
                "steps": steps,
                "sustainable_per_s": best["offered_per_s"],
                "sustainable_step": steps.index(best),
                "peak_per_s": max(st["persisted_per_s"] for st in steps),
                "saturated": True,
                "stopped": f"unsustainable at {steps[steps.index(best) + 1]['offered_per_s']:g} msg/s",
                "warnings": [f"step {best['offered_per_s'] + 500:g} msg/s: 3 message(s) lost in overload"],
                "knee": None
                if knee is None
                else {
                    "offered_per_s": knee["offered_per_s"],
                    "p99_ms": knee["latency_ms"]["end_to_end"]["p99"],
                    "method": "first step whose p99 exceeds 3x the first step's",
                },
            }
        )
    points = [[s["workers"], s["peak_per_s"]] for s in series]
    return {
        "threshold": 0.98,
        "step_s": 20,
        "transport": "mqtt",
        "broker": "embedded",
        "series": series,
        "usl": {
            "lambda": lam,
            "sigma": sigma,
            "kappa": kappa,
            "peak_workers": 22.0,
            "peak_per_s": round(usl(22), 1),
            "points": points,
            "note": "fitted to 3 worker counts; beyond 4 workers the curve is an extrapolation",
        },
        "recommendations": [
            {
                "topic": "workers",
                "text": "Run 2 workers: 4 add only 40% more sustainable throughput.",
                "evidence": "sustainable 1,500 / 2,500 / 3,500 msg/s at 1 / 2 / 4 workers",
            },
            {
                "topic": "headroom",
                "text": "Keep the offered rate under 2,000 msg/s per 2 workers <with margin>.",
                "evidence": "backlog grows at 2,500 msg/s (slope 310/s, 6,200 left at the end)",
            },
        ],
    }


# ----------------------------------------------------------------------------- helpers


def sections(html: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r'<section id="([^"]+)"[^>]*>(.*?)</section>', html, re.S)}


def table(html: str, table_id: str) -> str:
    found = re.search(rf'<table id="{re.escape(table_id)}"[^>]*>.*?</table>', html, re.S)
    assert found, f"no <table id={table_id!r}>"
    return found.group(0)


def png_images(section: str) -> list[tuple[bytes, str]]:
    """(PNG bytes, alt text) of every <img> in a section; fails on any image that is not an embedded PNG."""
    images = []
    for tag in re.findall(r"<img\b[^>]*>", section):
        src = re.search(r'src="([^"]*)"', tag)
        alt = re.search(r'alt="([^"]*)"', tag)
        assert src and src.group(1).startswith("data:image/png;base64,"), tag[:120]
        images.append((base64.b64decode(src.group(1).split(",", 1)[1], validate=True), alt.group(1) if alt else ""))
    return images


def assert_png(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.format == "PNG"
        assert image.width > 0 and image.height > 0
        return image.size


def assert_plots(html: str, with_image: tuple[str, ...], missing: dict[str, str]) -> None:
    """Plots drawn, and plots left out: no section of their own, but named with the reason at the end."""
    found = sections(html)
    assert set(with_image) <= set(found), set(with_image) - set(found)
    for plot_id in with_image:
        images = png_images(found[plot_id])
        assert len(images) == 1, plot_id
        data, alt = images[0]
        width, height = assert_png(data)
        assert width >= 800 and height >= 450, (plot_id, width, height)
        assert len(alt) > 20, (plot_id, alt)
    assert "Not plotted" not in html and 'class="missing"' not in html, "no placeholder sections"
    for plot_id, words in missing.items():
        assert plot_id not in found, plot_id
        assert words in found["not-in-this-report"], (plot_id, words)


def read(paths: ReportPaths) -> tuple[str, str]:
    return paths.html.read_text(encoding="utf-8"), paths.markdown.read_text(encoding="utf-8")


def results_of(run: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads((run / "results.json").read_text(encoding="utf-8"))
    return results


# ----------------------------------------------------------------------------- the report of a real run


def test_real_run_report_has_every_plot_and_table_that_applies(lock_run: Path, lock_report: ReportPaths) -> None:
    assert lock_report == ReportPaths(lock_report.html.parent / "report.html", lock_report.html.parent / "summary.md")
    html, _ = read(lock_report)
    assert_plots(html, RUN_PLOTS, {})
    # A plain run has no capacity sweep and no injected anomalies: those sections do not apply, and are not there.
    not_applicable = (
        *CAPACITY_PLOTS,
        "table-capacity",
        "table-capacity-summary",
        "table-recommendations",
        "table-failures",
    )
    for section_id in (*not_applicable, "table-validation"):
        assert f'id="{section_id}"' not in html, section_id
    assert 'id="not-in-this-report"' not in html, "nothing that applies is missing"
    assert 'id="faults"' not in html and FAULT_TABLE_PREFIX not in html, "no faults struck: no Faults section"
    for table_id in TABLE_IDS:
        if table_id not in (*not_applicable, "table-validation"):
            table(html, table_id)

    results = results_of(lock_run)
    variants = results["variants"]
    assert [v["name"] for v in variants] == ["coarse", "swap"]
    ledger = table(html, "table-ledger")
    for variant in variants:
        assert f'<th scope="col">{variant["name"]}</th>' in ledger
        assert f"{variant['ledger']['sent']:,}" in ledger
        assert f"{variant['ledger']['persisted']:,}" in ledger
    assert ledger.count('class="good">yes') == 2, "both variants reconciled"

    strategies = table(html, "table-strategies")
    shown = 0
    for metric in METRIC_ROWS:
        label = metric.label.strip()
        values = [metric.value(v) for v in read_results(lock_run).variants]
        if all(v is None for v in values):
            assert f">{label}<" not in strategies, label
            continue
        assert f">{label}<" in strategies, label
        for value in values:
            if value is not None:
                assert metric.fmt.format(value) in strategies, (label, value)
        shown += 1
    assert shown >= 15
    assert "(x" in strategies or "(1/" in strategies, "ratios to the first variant"

    env = table(html, "table-environment")
    assert results["environment"]["python"] in env
    assert "pyarrow" in env and results["environment"]["packages"]["pyarrow"] in env
    runs = table(html, "table-runs")
    for value in (results["run_id"], results["started_at"], results["scenario"]["sha256"], "lock_contention"):
        assert value in runs


def test_report_needs_no_network(lock_report: ReportPaths, capacity_report: ReportPaths) -> None:
    for paths in (lock_report, capacity_report):
        html, _ = read(paths)
        low = html.lower()
        assert "<script" not in low and "<link" not in low and "@import" not in low and "<iframe" not in low
        assert not re.search(r"url\(", low), "no CSS resources"
        for attr, value in re.findall(r'\b(src|href)\s*=\s*"([^"]*)"', html):
            if attr == "src":
                assert value.startswith("data:image/png;base64,"), value[:80]
            else:
                assert value.startswith("#"), value
        assert not re.search(r'\b(?:src|href|action|srcset)\s*=\s*["\']?\s*(?:https?:)?//', html, re.I)


def test_summary_markdown_has_the_ledger_and_strategies_tables(lock_run: Path, lock_report: ReportPaths) -> None:
    _, markdown = read(lock_report)
    variants = results_of(lock_run)["variants"]
    assert "![" not in markdown and "<img" not in markdown.lower(), "tables only, no images"
    assert "### Ledger" in markdown and "### Strategies side by side" in markdown
    header = "| metric | coarse | swap |"
    assert header in markdown
    sent = next(line for line in markdown.splitlines() if line.startswith("| sent |"))
    assert sent == f"| sent | {variants[0]['ledger']['sent']:,} | {variants[1]['ledger']['sent']:,} |"
    assert "| reconciled | yes | yes |" in markdown
    lock_row = next(line for line in markdown.splitlines() if line.startswith("| lock wait p99 ms |"))
    assert lock_row.count("|") == 4, "a cell per variant"
    # Every table row has as many cells as its header.
    for block in re.findall(r"(?:^\|.*\|\n)+", markdown, re.M):
        counts = {line.count("|") - line.count("\\|") for line in block.splitlines()}
        assert len(counts) == 1, block


def test_same_results_give_the_same_bytes(lock_run: Path, lock_report: ReportPaths, tmp_path: Path) -> None:
    again = write_report([lock_run / "results.json"], tmp_path / "again")
    assert again.html.read_bytes() == lock_report.html.read_bytes()
    assert again.markdown.read_bytes() == lock_report.markdown.read_bytes()


# ----------------------------------------------------------------------------- capacity


def test_capacity_sections_render(capacity_run: Path, capacity_report: ReportPaths) -> None:
    assert capacity_report.html == capacity_run / "report.html", "one run: the default out_dir is its own folder"
    html, markdown = read(capacity_report)
    assert_plots(html, PLOT_IDS, {})
    capacity = results_of(capacity_run)["capacity"]

    steps = table(html, "table-capacity")
    for header in ("offered msg/s", "persisted msg/s", "backlog slope /s", "backlog end", "backlog growing"):
        assert f">{header}<" in steps
    total = sum(len(s["steps"]) for s in capacity["series"])
    assert steps.count('<tr><th scope="row"') == total
    growing = [st for s in capacity["series"] for st in s["steps"] if st["backlog_growing"]]
    assert growing, "the sweep must saturate somewhere"
    assert f"{growing[0]['backlog_end']:,}" in steps

    assert steps.count('class="bad">unsustainable<') == len(growing)
    assert steps.count('class="good">sustainable<') == total - len(growing)

    summary = table(html, "table-capacity-summary")
    for s in capacity["series"]:
        assert f"{s['sustainable_per_s']:,.0f}" in summary
        assert f"{s['peak_per_s']:,.0f}" in summary
        assert s["limit"].replace("'", "&#39;") in summary
        assert s["stopped"] in summary
        assert s["warnings"][0] in sections(html)["capacity-summary"]

    recommendations = table(html, "table-recommendations")
    for rec in capacity["recommendations"]:
        assert rec["evidence"] in recommendations
    assert "&lt;with margin&gt;" in recommendations, "text from results.json is escaped"
    assert capacity["usl"]["note"] in sections(html)["plot-usl"]

    assert "### Sustainable rate and knee per worker count" in markdown
    assert "### Recommendations" in markdown
    assert "&lt;with margin&gt;" in markdown


def test_capacity_without_usl_or_knee_names_what_is_left_out(capacity_run: Path, tmp_path: Path) -> None:
    results = results_of(capacity_run)
    results["variants"] = []
    sweep = results["capacity"]
    sweep["usl"] = None
    for s in sweep["series"]:
        s["knee"] = None
        for step in s["steps"]:
            del step["latency_ms"], step["little"]
    (tmp_path / "results.json").write_text(json.dumps(results), encoding="utf-8")
    html, markdown = read(write_report([tmp_path]))
    assert_plots(
        html,
        ("plot-capacity",),
        {
            "plot-throughput": "no timeline",
            "plot-latency": "no end-to-end latency",
            "plot-flush": "no size- or timeout-triggered parquet flushes",
            "plot-lock": "no lock probes in these runs",
            "plot-append": "no append-cost points",
            "plot-capacity-latency": "no end-to-end latency in the capacity steps",
            "plot-usl": "has none (usl is null)",
        },
    )
    assert 'id="table-ledger"' not in html
    assert "no variants in these runs" in sections(html)["not-in-this-report"]
    assert "### Recommendations" in markdown
    assert "Left out for want of data" in markdown and "has none (usl is null)" in markdown


# ----------------------------------------------------------------------------- several runs


def test_several_runs_overlay_with_run_folder_labels(lock_run: Path, capacity_run: Path, tmp_path: Path) -> None:
    html, markdown = read(write_report([lock_run, capacity_run], tmp_path))
    assert_plots(html, PLOT_IDS, {})
    labels = ["lock/coarse", "lock/swap", "capacity/coarse", "capacity/swap"]
    header = "| metric | " + " | ".join(labels) + " |"
    assert header in markdown
    ledger = table(html, "table-ledger")
    assert all(f'<th scope="col">{label}</th>' in ledger for label in labels)
    assert "lock/coarse" in re.search(r'alt="([^"]*)"', sections(html)["plot-lock"]).group(1)  # type: ignore[union-attr]
    assert ">capacity/1 worker<" in table(html, "table-capacity-summary")


# ----------------------------------------------------------------------------- older results


@pytest.mark.parametrize("fixture", OLD_RESULTS, ids=[p.stem for p in OLD_RESULTS])
def test_the_report_renders_results_of_every_older_version(fixture: Path, tmp_path: Path) -> None:
    """Files each schema version's bench wrote (tests/data/results): a report, its verdict, and a note that the
    file is older."""
    folder = tmp_path / fixture.stem
    folder.mkdir()
    shutil.copy(fixture, folder / "results.json")
    html, markdown = read(write_report([folder]))
    version = json.loads(fixture.read_text(encoding="utf-8"))["schema_version"]
    assert f"results written with schema_version {version}; this report reads" in html
    assert "<strong>PASSED</strong>" in html and markdown.splitlines()[2].startswith("**PASSED**")
    for table_id in ("table-runs", "table-ledger", "table-strategies", "table-environment"):
        table(html, table_id)
    if "capacity" in fixture.stem:
        table(html, "table-capacity")
    assert 'class="missing"' not in html


def test_a_version_9_fault_run_shows_its_faults_and_what_its_ledger_settles(tmp_path: Path) -> None:
    """The real v9 fault run (naive beside crash_safe, ten kill -9 and a restart): a table per variant, counts
    where version 9's ledger settles them and a dash where it cannot say which kill named what."""
    folder = tmp_path / "v9-faults"
    folder.mkdir()
    shutil.copy(RESULTS_DATA / "v9-faults.json", folder / "results.json")
    html, markdown = read(write_report([folder]))
    assert "<strong>FAILED</strong>" in html, "naive left an unfinalised file: its run failed"
    assert "naive: 1 unfinalised file(s), 3,600 sent" in html
    assert "naive: 3,600 loss(es) named by 11 fault(s) the configuration was not expected to survive" in html
    naive, crash_safe = table(html, FAULT_TABLE_PREFIX + "naive"), table(html, FAULT_TABLE_PREFIX + "crash_safe")
    assert naive.count('<tr><th scope="row"') == 11 and crash_safe.count('<tr><th scope="row"') == 10
    first = fault_row(naive, "1. process_kill")
    assert first[:8] == ["2.36", "-", "1.39", "yes", "-", "0", "0", "-"]
    assert fault_row(naive, "11. process_restart")[3:7] == ["yes", "0", "0", "0"]
    assert fault_row(crash_safe, "10. process_kill")[:7] == ["38.34", "-", "1.44", "no", "0", "0", "0"]
    assert "A dash in named, lost or duplicated: not counted" in sections(html)["faults-naive"]
    assert "In all: 0 named, 0 lost, 0 duplicated." in sections(html)["faults-crash_safe"]
    assert "### Faults in naive" in markdown and "| 1. process_kill | 2.36 | - | 1.39 | yes | - | 0 | 0 |" in markdown


def fault_row(table_html: str, label: str) -> list[str]:
    """The cells of a faults table's row, as text."""
    found = re.search(rf'<tr><th scope="row">{re.escape(label)}</th>(.*?)</tr>', table_html, re.S)
    assert found, label
    return [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", found.group(1), re.S)]


# ----------------------------------------------------------------------------- faults, failures (schema 10)


UNREADABLE = (
    "/runs/faults/crash_safe/data/readings-20261206T113200Z-003.parquet: Parquet magic bytes not found in footer"
)


def fault_results() -> dict[str, Any]:
    """A schema-10 run as the bench writes one when faults struck and a variant could not start: two variants of
    the real v9 steady run's 200 messages, with what each fault cost, an unreadable file, a failed variant."""
    base: dict[str, Any] = json.loads((RESULTS_DATA / "v9-run.json").read_text(encoding="utf-8"))
    base["schema_version"] = SCHEMA_VERSION
    (template,) = base["variants"]
    naive, crash_safe = json.loads(json.dumps(template)), json.loads(json.dumps(template))
    naive["name"], crash_safe["name"] = "naive", "crash_safe"
    naive["ledger"].update(
        persisted=39, dropped=161, dropped_by_reason={"process_kill": 41, "broker_partition": 120}, reconciled=True
    )
    naive["fault_events"] = [
        {
            "kind": "process_kill",
            "at_s": 4.2,
            "recovered_s": 1.46,
            "error": None,
            "duration_s": 1.4,
            "expected_loss": True,
            "named": 41,
            "lost": 0,
            "duplicated": 0,
            "latency_ms": {"p50": 912.0, "p99": 1830.5, "max": 2210.0},
            "latency_kind": "receive",
            "detail": None,
        },
        {
            "kind": "broker_partition",
            "at_s": 12.0,
            "recovered_s": 6.25,
            "error": None,
            "duration_s": 5.0,
            "expected_loss": True,
            "named": 120,
            "lost": 0,
            "duplicated": 17,
            "latency_ms": {"p50": 2400.0, "p99": 5120.5, "max": 5230.0},
            "latency_kind": "receive",
            "detail": "mode drop",
        },
    ]
    crash_safe["ledger"].update(
        persisted=193, lost=7, redelivered=3, missing_seq_sample=[20, 21, 22, 23, 24, 25, 26], reconciled=False
    )
    crash_safe["fault_events"] = [
        {
            "kind": "process_kill",
            "at_s": 4.2,
            "recovered_s": 1.52,
            "error": None,
            "duration_s": 1.45,
            "expected_loss": False,
            "named": 0,
            "lost": 7,
            "duplicated": 3,
            "latency_ms": {"p50": 1020.0, "p99": 2400.2, "max": 2600.9},
            "latency_kind": "end_to_end",
            "detail": None,
        },
        {
            "kind": "disk_full",
            "at_s": 20.0,
            "recovered_s": None,
            "error": "not back within 60 s after the fault ended",
            "duration_s": 3.0,
            "expected_loss": False,
            "named": 0,
            "lost": 0,
            "duplicated": 0,
            "latency_ms": None,
            "latency_kind": None,
            "detail": "fill 2 MB tmpfs",
        },
    ]
    crash_safe["unreadable_files"] = [UNREADABLE]
    base["variants"] = [naive, crash_safe]
    base["failures"] = [{"variant": "sql", "error": "ServiceError: the sql sink could not start: connection refused"}]
    return base


@pytest.fixture(scope="module")
def fault_report(tmp_path_factory: pytest.TempPathFactory) -> ReportPaths:
    folder = tmp_path_factory.mktemp("runs") / "faults"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(fault_results(), indent=2), encoding="utf-8")
    assert read_results(folder).schema_version == SCHEMA_VERSION, "a current file, read strictly"
    return write_report([folder])


def test_the_faults_section_shows_what_each_fault_cost(fault_report: ReportPaths) -> None:
    html, _ = read(fault_report)
    found = sections(html)
    assert 'id="faults"' in html and '<a href="#faults">Faults</a>' in html
    assert html.index('id="ledger"') < html.index('id="faults"') < html.index('id="strategies"')
    naive = table(html, FAULT_TABLE_PREFIX + "naive")
    header = re.findall(r'<th scope="col"[^>]*>([^<]*)</th>', naive)
    assert header == list(FAULT_COLUMNS)
    assert header[:8] == ["fault", "at s", "duration s", "back after s", "loss expected", "named", "lost", "duplicated"]
    assert header[8:] == ["p99 ms", "max ms", "latency", "detail"]
    assert fault_row(naive, "1. process_kill") == [
        "4.20", "1.40", "1.46", "yes", "41", "0", "0", "1,830.5", "2,210.0", "to receipt", "-",
    ]  # fmt: skip
    assert fault_row(naive, "2. broker_partition") == [
        "12.00", "5.00", "6.25", "yes", "120", "0", "17", "5,120.5", "5,230.0", "to receipt", "mode drop",
    ]  # fmt: skip
    assert "In all: 161 named, 0 lost, 17 duplicated." in found["faults-naive"]

    crash_safe = table(html, FAULT_TABLE_PREFIX + "crash_safe")
    assert fault_row(crash_safe, "1. process_kill") == [
        "4.20", "1.45", "1.52", "no", "0", "7", "3", "2,400.2", "2,600.9", "end to end", "-",
    ]  # fmt: skip
    assert '<td class="bad">7</td>' in crash_safe, "a loss in a fault is highlighted"
    assert naive.count('class="bad"') == 0, "named losses and zeros are not"
    disk = fault_row(crash_safe, "2. disk_full")
    assert disk[:7] == ["20.00", "3.00", "never", "no", "0", "0", "0"]
    assert disk[-1] == "fill 2 MB tmpfs; not back: not back within 60 s after the fault ended"
    assert '<td class="bad">never</td>' in crash_safe and '<td class="text bad">fill 2 MB tmpfs;' in crash_safe
    assert "Loss expected: the configuration did not promise to survive this fault" in html


def test_failed_variants_and_unreadable_files_are_shown_first(fault_report: ReportPaths) -> None:
    html, markdown = read(fault_report)
    (line,) = re.findall(r'<p class="verdict [^"]*"[^>]*>(.*?)</p>', html, re.S)
    assert line.startswith("<strong>FAILED</strong> sql: did not run: ServiceError: the sql sink could not start")
    assert "crash_safe: 7 lost of 200 sent" in line
    assert f"crash_safe: Parquet file(s) could not be read, their rows are missing: {UNREADABLE}" in line
    assert "crash_safe: 7 message(s) lost unexplained during faults: 7 in process_kill at 4.2 s (faults the " in line
    assert "naive: 161 loss(es) named by 2 fault(s) the configuration was not expected to survive" in line
    assert "crash_safe: disk_full at 20.0 s: not back: not back within 60 s after the fault ended" in line

    failures = sections(html)["failures"]
    assert html.index('id="failures"') < html.index('id="runs"'), "before everything but the verdict"
    assert 'class="alarm"' in html and '<a href="#failures">Failures</a>' in html
    assert fault_row(failures, "sql") == [
        "did not run",
        "ServiceError: the sql sink could not start: connection refused",
    ]
    assert fault_row(failures, "crash_safe") == ["unreadable file", UNREADABLE]
    ledger = table(html, "table-ledger")
    assert '<th scope="col">sql</th>' not in ledger
    assert "Not in this table, because they did not run (see Failures): sql." in sections(html)["ledger"]
    assert re.search(r'<th scope="row">unreadable files</th><td>0</td><td class="bad">1</td>', ledger)

    assert markdown.index("### Failures") < markdown.index("### Ledger") < markdown.index("### Faults in naive")
    assert "| sql | **did not run** | ServiceError: the sql sink could not start: connection refused |" in markdown
    assert (
        "| 1. process_kill | 4.20 | 1.45 | 1.52 | no | 0 | **7** | 3 | 2,400.2 | 2,600.9 | end to end | - |" in markdown
    )
    for block in re.findall(r"(?:^\|.*\|\n)+", markdown, re.M):
        counts = {line.count("|") - line.count("\\|") for line in block.splitlines()}
        assert len(counts) == 1, block


def test_several_runs_get_a_faults_group_each(tmp_path: Path) -> None:
    folders = []
    for name in ("base", "head"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(fault_results()), encoding="utf-8")
        folders.append(folder)
    html, markdown = read(write_report(folders, tmp_path / "out"))
    for name in ("base", "head"):
        assert f'<div class="group" id="faults-{name}">' in html and f"<h2>Faults: {name}</h2>" in html
        for variant in ("naive", "crash_safe"):
            table(html, f"{FAULT_TABLE_PREFIX}{name}-{variant}")
            assert f"### Faults in {name}/{variant}" in markdown
        assert fault_row(sections(html)["failures"], f"{name}/sql")[0] == "did not run"
    assert len(re.findall(r'id="([^"]+)"', html)) == len(set(re.findall(r'id="([^"]+)"', html))), "ids are unique"


def test_a_run_whose_every_variant_failed_still_has_a_report(tmp_path: Path) -> None:
    results = fault_results()
    results["variants"] = []
    results["failures"] = [{"variant": "naive", "error": "ServiceError: broker refused"}]
    (tmp_path / "results.json").write_text(json.dumps(results), encoding="utf-8")
    html, markdown = read(write_report([tmp_path]))
    assert "<strong>FAILED</strong> naive: did not run: ServiceError: broker refused." in html
    assert fault_row(sections(html)["failures"], "naive")[0] == "did not run"
    assert "no variant ran to its ledger (see Failures)" in sections(html)["not-in-this-report"]
    assert markdown.splitlines()[2] == "**FAILED**: naive: did not run: ServiceError: broker refused."


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no results.json in this folder"),
        ("{not json", "not valid JSON (line 1"),
        ("[1, 2]", "expected a JSON object"),
        ('{"schema_version": 5}', "expected a bench results file"),
        ('{"variants": [1]}', "expected a bench results file"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_path(content: str | None, expected: str, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    if content is not None:
        (folder / "results.json").write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=re.escape(expected)) as info:
        write_report([folder])
    assert str(folder) in str(info.value)
    assert info.value.exit_code == 2
    assert not (folder / "report.html").exists()


def test_a_path_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file or folder") as info:
        write_report([tmp_path / "nowhere" / "results.json"])
    assert str(tmp_path / "nowhere" / "results.json") in str(info.value)
    with pytest.raises(UsageError, match="at least one run folder"):
        write_report([])
    notes = tmp_path / "notes.txt"
    notes.write_text("{}", encoding="utf-8")
    with pytest.raises(UsageError, match=re.escape(f"{notes}: not a results.json file")):
        write_report([notes])


# ----------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium; skipped when missing, unless BENCH_REQUIRE_SERVICES=1 (CI installs it).

    Module-scoped and first in the tests' arguments, so a skip comes before the run fixtures cost anything.
    """
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    reason = "headless Chromium is not installed (Debian: apt-get install chromium)"
    if os.environ.get("BENCH_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}; BENCH_REQUIRE_SERVICES=1 requires it", pytrace=False)
    pytest.skip(reason)


def run_chromium(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    # Its own HOME: nothing lands in the user's ~/.config or ~/.pki.
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_chromium_decodes_every_image(chromium: str, capacity_report: ReportPaths, tmp_path: Path) -> None:
    html, _ = read(capacity_report)
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = run_chromium(chromium, tmp_path, "--dump-dom", probed.as_uri()).stdout
    images = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert images, "the probe did not run: " + dom[-500:]
    assert images.group(1) == images.group(2) == str(len(PLOT_IDS)), images.group(0)
    errors = re.search(r'data-errors="([^"]*)"', dom)
    assert errors is None, errors.group(1)


def test_chromium_shows_the_faults_tables(chromium: str, fault_report: ReportPaths, tmp_path: Path) -> None:
    """The faults and failures sections as a browser lays them out: every table, and a page that is not blank."""
    dom = run_chromium(chromium, tmp_path, "--dump-dom", fault_report.html.as_uri()).stdout
    for table_id in ("table-failures", FAULT_TABLE_PREFIX + "naive", FAULT_TABLE_PREFIX + "crash_safe"):
        assert f'id="{table_id}"' in dom, table_id
    shot = tmp_path / "faults.png"
    run_chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", fault_report.html.as_uri())
    with Image.open(shot) as image:
        histogram = image.convert("L").histogram()
    dark = sum(histogram[:128])
    assert dark > 0.005 * sum(histogram), "text on the page"


def test_chromium_screenshot_of_the_report(chromium: str, lock_report: ReportPaths, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    run_chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", lock_report.html.as_uri())
    assert shot.stat().st_size > 10_000
    with Image.open(shot) as image:
        assert image.size == (1280, 4000)
        histogram = image.convert("L").histogram()
    dark, light = sum(histogram[:128]), sum(histogram[128:])
    assert dark > 0.005 * (dark + light) and light > 0.5 * (dark + light), "a rendered page: text and plots on white"
