"""``bench report``: one self-contained HTML report and a Markdown summary from one or more run folders.

The HTML file needs no network to be read: every plot is a PNG in a ``data:``
URI, the CSS is inline and there is no JavaScript. The Markdown summary holds
tables only, for a CI job summary (GitHub's ``$GITHUB_STEP_SUMMARY``)::

    paths = write_report([Path("reports/burst-20261125T120000Z")])
    paths.html      # reports/burst-20261125T120000Z/report.html
    paths.markdown  # reports/burst-20261125T120000Z/summary.md

Several runs go into a new folder, ``reports/compare-<UTC time>/``, never into
the first run's folder, whose own report stays as its run wrote it.

The conclusion comes first: one verdict line per run (ledger, validation,
capacity, the gate's outcome when a ``gate.json`` sits beside the run), derived
from the results. Every plot and table has a fixed section id (:data:`PLOT_IDS`,
:data:`TABLE_IDS`) and is there when the runs hold its data. Sections for
another kind of run (the capacity plots of a plain run, say) are left out; one
that applies but has no data (lock probes disabled) is named with the reason
in a short list at the end of the page, instead of an empty placeholder.
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from matplotlib.typing import RcKeyType

from bench.errors import UsageError
from bench.report.verdict import (
    Verdict,
    _fmt,
    _number,
    _Run,
    _verdict,
    _workers_text,
    verdict,
)
from bench.results import SCHEMA_VERSION
from bench.results.metrics import METRIC_ROWS, TAIL_SHARE_WARNING, tail_share_bound
from bench.results.model import (
    Capacity,
    CapacitySeries,
    CapacityStep,
    CpuAccount,
    FaultEvent,
    FlushStats,
    FlushTrigger,
    LatencySummary,
    Ledger,
    Results,
    UslFit,
    Variant,
    read_results,
)

__all__ = [
    "FAULT_TABLE_PREFIX",
    "PLOT_IDS",
    "TABLE_IDS",
    "FaultGroup",
    "ReportPaths",
    "Verdict",
    "default_out_dir",
    "verdict",
    "write_report",
]

HTML_NAME = "report.html"
MARKDOWN_NAME = "summary.md"
# Where a report of several runs goes by default (relative to the working directory, like the run folders).
REPORTS_DIR = Path("reports")
PLOT_IDS = (
    "plot-throughput",
    "plot-latency",
    "plot-flush",
    "plot-lock",
    "plot-append",
    "plot-capacity",
    "plot-capacity-latency",
    "plot-usl",
)
TABLE_IDS = (
    "table-failures",
    "table-runs",
    "table-ledger",
    "table-validation",
    "table-strategies",
    "table-environment",
    "table-capacity-summary",
    "table-capacity",
    "table-recommendations",
)
FAULT_TABLE_PREFIX = "table-faults-"
"""The faults table of a variant (one per variant with fault events): this and the variant's label as a slug."""
FLUSH_SINK = "parquet"
# The shutdown flush is one per run and flushes whatever is left: it says little about the distribution.
FLUSH_TRIGGERS: tuple[FlushTrigger, ...] = ("size", "timeout")
ALL_TRIGGERS: tuple[FlushTrigger, ...] = ("size", "timeout", "shutdown")
# Okabe-Ito (without its yellow, too pale on white), then two of Paul Tol's: distinct for colour-blind readers too.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999", "#882255", "#44AA99")
FIG_SIZE_IN = (8.0, 4.5)
# 8 x 4.5 in (plus the legend below) at 150 dpi, shown at 100 CSS px per inch (800 px wide): sharp on
# high-density screens, about 60 kB a plot.
FIG_DPI = 150
DISPLAY_DPI = 100
E2E_PERCENTILES = (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p99.9", "p999"), ("max", "max"))
STYLE: dict[RcKeyType, Any] = {
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "legend.framealpha": 0.85,
    "font.family": "DejaVu Sans",
}


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_report` wrote the report."""

    html: Path
    markdown: Path


@dataclass(frozen=True)
class _TemplateRun:
    """A run as the templates read it: its label, file and typed results."""

    label: str
    file: Path
    results: Results


@dataclass(frozen=True)
class _Series:
    """One variant of one run: one line in every plot, one column in every table."""

    label: str
    run: _Run
    variant: Variant
    color: str
    style: str = "-"


# What the templates render: tables of cells, and plots.


@dataclass(frozen=True)
class Cell:
    text: str
    note: str = ""  # the ratio to the first column, shown small beside the value
    tone: str = ""  # CSS classes: "good", "bad" (bold in Markdown), "dim", "text" (a left-aligned prose cell)


@dataclass(frozen=True)
class Row:
    label: str
    cells: tuple[Cell, ...]
    indent: bool = False


@dataclass(frozen=True)
class Table:
    id: str
    title: str
    header: tuple[str, ...]
    rows: tuple[Row, ...]
    caption: str = ""
    missing: str = ""
    numeric: bool = True  # right-align the value columns
    applies: bool = True  # False: the runs are of a kind that never has this section; it is left out unnamed


@dataclass(frozen=True)
class Plot:
    id: str
    title: str
    caption: str = ""
    image: str = ""  # data: URI
    width: int = 0  # CSS px the image is shown at
    height: int = 0
    alt: str = ""
    missing: str = ""
    notes: tuple[str, ...] = ()
    applies: bool = True  # False: the runs are of a kind that never has this plot; it is left out unnamed


@dataclass(frozen=True)
class FaultGroup:
    """One run's faults: a table per variant that had any."""

    id: str  # the section id: "faults", or "faults-<run>" when the report has several runs
    title: str
    tables: tuple[Table, ...]
    caption: str = ""  # how to read the tables, once for all of them


@dataclass(frozen=True)
class Absent:
    """Sections left out because the runs hold no data for them: named once at the end, with the reason."""

    titles: tuple[str, ...]
    reason: str


# ----------------------------------------------------------------------------- entry point


def write_report(run_dirs: Sequence[Path], out_dir: Path | None = None) -> ReportPaths:
    """Read ``results.json`` from each run folder; write ``report.html`` and ``summary.md`` into ``out_dir``.

    A run folder or a ``results.json`` path may be given. ``out_dir`` defaults to the run's own folder for one
    run, and to a new ``reports/compare-<UTC time>/`` for several (their first run's report is its own, not
    the comparison's). Raises :class:`~bench.errors.UsageError` naming the path when a results file is
    missing, unreadable or not a bench results file.
    """
    if not run_dirs:
        raise UsageError("bench report: expected at least one run folder (holding results.json)")
    runs = _load_runs([Path(p) for p in run_dirs])
    series = _series(runs)
    out = out_dir if out_dir is not None else default_out_dir([r.folder for r in runs])
    context = _context(runs, series)
    env = _environment()
    html = env.get_template("report.html.j2").render(**context)
    markdown = env.get_template("summary.md.j2").render(**context)
    paths = ReportPaths(out / HTML_NAME, out / MARKDOWN_NAME)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_text(paths.html, html)
        _write_text(paths.markdown, markdown)
    except OSError as exc:
        raise UsageError(f"cannot write the report into {out}: {exc}") from None
    return paths


def default_out_dir(run_folders: Sequence[Path], now: datetime | None = None) -> Path:
    """One run: its own folder. Several: a new ``reports/compare-<UTC time>/`` (``-2``, ``-3``... when taken)."""
    if len(run_folders) == 1:
        return run_folders[0]
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    base = REPORTS_DIR / f"compare-{stamp}"
    out, i = base, 2
    while out.exists():
        out, i = base.with_name(f"{base.name}-{i}"), i + 1
    return out


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bench.report", "templates"),
        # Markdown is not HTML: its cells are escaped by the md filter instead.
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), disabled_extensions=("md.j2",)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md"] = _md_escape
    return env


def _md_escape(value: Any) -> str:
    """A Markdown table cell: pipes escaped, one line, no raw HTML."""
    text = str(value).replace("\r", " ").replace("\n", " ")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


# ----------------------------------------------------------------------------- loading


def _load_runs(paths: list[Path]) -> list[_Run]:
    loaded: list[tuple[Path, Path, Results]] = []
    for path in paths:
        folder, file = (path, path / "results.json") if path.is_dir() else (path.parent, path)
        loaded.append((folder, file, read_results(path)))
    names = [folder.resolve().name or str(folder) for folder, _, _ in loaded]
    runs = []
    for i, (folder, file, results) in enumerate(loaded):
        label = names[i] if names.count(names[i]) == 1 else f"{names[i]}#{i + 1}"
        runs.append(_Run(folder, file, label, results))
    return runs


def _series(runs: list[_Run]) -> list[_Series]:
    several = len(runs) > 1
    out: list[_Series] = []
    for run in runs:
        for variant in run.results.variants:
            name = variant.name
            i = len(out)
            # Past ten series the colours repeat: the line style tells them apart.
            style = ("-", "--", ":", "-.")[(i // len(PALETTE)) % 4]
            out.append(
                _Series(f"{run.label}/{name}" if several else name, run, variant, PALETTE[i % len(PALETTE)], style)
            )
    return out


# ----------------------------------------------------------------------------- the template's context


def _context(runs: list[_Run], series: list[_Series]) -> dict[str, Any]:
    capacity = _capacity_series(runs)
    plots = [
        _throughput_plot(series),
        _latency_plot(series),
        _flush_plot(series),
        _lock_plot(series),
        _append_plot(series),
        _capacity_plot(capacity),
        _capacity_latency_plot(capacity),
        _usl_plot(runs),
    ]
    tables = {
        "failures": _failures_table(runs, series),
        "runs": _runs_table(runs),
        "ledger": _ledger_table(runs, series),
        "validation": _validation_table(series),
        "truth": _truth_table(series),
        "strategies": _strategies_table(series),
        "environment": _environment_table(runs),
        "capacity": _capacity_table(capacity),
        "capacity_summary": _capacity_summary_table(capacity),
        "recommendations": _recommendations_table(runs),
    }
    names = sorted({r.results.scenario.name or "?" for r in runs})
    title = f"iiot-bench report: {', '.join(names)}"
    versions = sorted({r.results.schema_version for r in runs}, key=str)
    schema_note = ""
    if any(v != SCHEMA_VERSION for v in versions):
        schema_note = (
            f"results written with schema_version {', '.join(map(str, versions))}; this report reads "
            f"{SCHEMA_VERSION}: sections whose data older files lack are named at the end"
        )
    shown = {p.id: p for p in plots if not p.missing}
    return {
        "title": title,
        "verdicts": [_verdict(run, len(runs) > 1) for run in runs],
        "runs": [_TemplateRun(r.label, r.file, r.results) for r in runs],
        "series": series,
        "plots": [p for p in plots if not p.missing],
        "plot_by_id": shown,
        "tables": {key: t for key, t in tables.items() if not t.missing},
        "fault_groups": _fault_groups(runs, series),
        "absent": _absent([*plots, *tables.values()]),
        "schema_note": schema_note,
        "bench_version": _bench_version(),
    }


def _absent(sections: Sequence[Plot | Table]) -> list[Absent]:
    """The sections that apply to these runs but lack data (lock probes disabled, a run too short to flush),
    grouped by reason. Sections for another kind of run (capacity plots of a plain run, the validation table
    without injected anomalies) are left out without a word: naming them would only be clutter."""
    by_reason: dict[str, list[str]] = {}
    for section in sections:
        if section.missing and section.applies:
            by_reason.setdefault(section.missing, []).append(section.title)
    return [Absent(tuple(titles), reason) for reason, titles in by_reason.items()]


def _bench_version() -> str:
    try:
        return importlib.metadata.version("iiot-bench")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- the verdict


# ----------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class _Image:
    uri: str
    width: int
    height: int


def _draw(draw: Callable[[Axes], None]) -> _Image:
    """Run ``draw`` on a fresh axes; the legend goes below the plot, so it never hides a line."""
    with rc_context(STYLE):
        # The object API with an explicit Agg canvas: no pyplot state, no display, nothing to leak between plots.
        fig = Figure(figsize=FIG_SIZE_IN, dpi=FIG_DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        draw(ax)
        handles, labels = ax.get_legend_handles_labels()
        width_in, height_in = FIG_SIZE_IN
        if handles:
            longest = max(len(label) for label in labels)
            ncols = max(1, min(4, len(handles), int(width_in * 100) // (longest * 6 + 60)))
            rows = math.ceil(len(handles) / ncols)
            height_in += 0.25 * rows + 0.1
            fig.set_size_inches(width_in, height_in)
            fig.legend(handles, labels, loc="outside lower center", ncols=ncols, frameon=False)
        buf = io.BytesIO()
        # No Software/time metadata: the same results give the same bytes.
        fig.savefig(buf, format="png", dpi=FIG_DPI, metadata={"Software": None})
        fig.clear()
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return _Image(uri, round(width_in * DISPLAY_DPI), round(height_in * DISPLAY_DPI))


def _ms_axis(ax: Axes, values: Iterable[float | None], label: str) -> None:
    """Milliseconds on y: a log scale when the values span 20x or more, else linear from 0."""
    positive = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if positive and max(positive) / min(positive) >= 20:
        decades = math.log10(max(positive) / min(positive))
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if decades > 4 else (1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(_ms_tick))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(f"{label} (ms, log scale)")
    else:
        ax.set_ylim(bottom=0, top=max(positive, default=1.0) * 1.08)
        ax.yaxis.set_major_formatter(FuncFormatter(_ms_tick))
        ax.set_ylabel(f"{label} (ms)")


def _plot(id: str, title: str, caption: str, image: _Image, alt: str, *, notes: tuple[str, ...] = ()) -> Plot:
    return Plot(id, title, caption, image.uri, image.width, image.height, alt, notes=notes)


def _missing_note(names: list[str], what: str) -> tuple[str, ...]:
    return (f"not shown ({what}): {', '.join(names)}",) if names else ()


def _cumulative(t_s: Sequence[Any], counts: Sequence[Any]) -> tuple[Any, Any] | None:
    """Sorted (elapsed s, cumulative count) from a timeline, starting at (0, 0); a repeated time keeps its latest."""
    points: dict[float, float] = {}
    for t, c in zip(t_s, counts, strict=False):
        tf, cf = _number(t), _number(c)
        if tf is not None and cf is not None and tf > 0:
            points[tf] = max(cf, points.get(tf, 0.0))
    if not points:
        return None
    ts = np.array([0.0, *sorted(points)])
    return ts, np.maximum.accumulate(np.array([0.0, *(points[t] for t in ts[1:])]))


def _window_s(durable_t: Any, durable: Any, flush_interval_s: float | None) -> float:
    """The averaging window for rates: a whole number of flush cadences (two when the run is long enough).

    Durable moves one flush at a time; averaged over a whole number of flushes it reads as a rate rather than as
    spikes or a square wave. The cadence is what the timeline shows (the median time between durable steps,
    size-triggered flushes included), the configured flush interval only when durable never moved.
    """
    span = float(durable_t[-1])
    sampling = float(np.median(np.diff(durable_t))) if len(durable_t) > 2 else span
    steps = durable_t[1:][np.diff(durable) > 0]
    if len(steps) >= 3:
        cadence: float | None = float(np.median(np.diff(steps)))
    else:
        cadence = flush_interval_s
    if not cadence or cadence > span / 4:
        return max(sampling, min(1.0, span / 4))
    # At least a second (on runs long enough): several workers flush out of step with each other, and their
    # merged staircase has no single cadence to average over.
    return max(sampling, cadence * min(2, math.floor(span / 4 / cadence)), min(1.0, span / 8))


def _centred_rate(ts: Any, cum: Any, at: Any, window: float) -> Any:
    """msg/s over a ``window`` centred on each time in ``at``; near the ends of the timeline the window slides
    inwards rather than shrinking (a shrunk window would bring the flush spikes back)."""
    window = min(window, float(ts[-1]))
    lo = np.clip(at - window / 2, 0.0, ts[-1] - window)
    hi = lo + window
    return (np.interp(hi, ts, cum) - np.interp(lo, ts, cum)) / max(window, 1e-9)


def _throughput_plot(series: list[_Series]) -> Plot:
    title = "Throughput over time"
    drawn: list[tuple[_Series, Any, Any, Any]] = []
    windows: set[float] = set()
    without: list[str] = []
    for s in series:
        timeline = s.variant.timeline
        t_s = timeline.t_s if timeline else []
        sent = _cumulative(t_s, timeline.sent if timeline else [])
        durable = _cumulative(t_s, timeline.durable if timeline else [])
        if sent is None or durable is None or len(sent[0]) < 3:
            without.append(s.label)
            continue
        window = _window_s(*durable, s.variant.config.flush_interval_s)
        windows.add(round(window, 2))
        at = sent[0][1:]
        drawn.append(
            (s, at, _centred_rate(*sent, at, window), _centred_rate(*durable, at, window)),
        )
    if not drawn:
        return Plot("plot-throughput", title, missing="no timeline (sent/durable over time) in these runs")

    def draw(ax: Axes) -> None:
        for s, at, sent, durable in drawn:
            ax.plot(at, sent, color=s.color, linewidth=1.6, label=f"{s.label} sent")
            ax.plot(at, durable, color=s.color, linewidth=1.2, linestyle="--", alpha=0.85, label=f"{s.label} durable")
        ax.set_title(title)
        ax.set_xlabel("elapsed time since the variant started (s)")
        ax.set_ylabel("messages per second")
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))

    window_text = " / ".join(f"{w:g}" for w in sorted(windows))
    return _plot(
        "plot-throughput",
        title,
        (
            "Messages per second handed to the transport (solid) and made durable in Parquet (dashed), from the "
            f"cumulative counts in each variant's timeline, averaged over a sliding {window_text} s window (whole "
            "flush intervals: durable moves one flush at a time, so a lone spike or dip is a flush a little early or "
            "late). "
            "Sent staying above durable means a backlog is building; durable catching up after a burst is the "
            "pipeline draining it."
        ),
        _draw(draw),
        f"{title}: sent and durable messages per second against elapsed seconds for "
        + ", ".join(s.label for s, *_ in drawn),
        notes=_missing_note(without, "no timeline"),
    )


def _latency_plot(series: list[_Series]) -> Plot:
    title = "End-to-end latency percentiles"
    drawn: list[tuple[_Series, list[float | None], Any]] = []
    without: list[str] = []
    for s in series:
        e2e = s.variant.latency_ms.end_to_end
        values = [_number(getattr(e2e, key)) if e2e else None for _, key in E2E_PERCENTILES]
        if e2e is None or not e2e.count or all(v is None for v in values):
            without.append(s.label)
            continue
        drawn.append((s, values, e2e.count))
    if not drawn:
        return Plot("plot-latency", title, missing="no end-to-end latency in these runs (nothing was persisted)")

    def draw(ax: Axes) -> None:
        x = np.arange(len(E2E_PERCENTILES))
        for s, values, count in drawn:
            ys = [v if v is not None and v > 0 else np.nan for v in values]
            n = f" (n={count:,} persisted messages)" if isinstance(count, int) else ""
            ax.plot(x, ys, marker="o", color=s.color, linestyle=s.style, label=f"{s.label}{n}")
        ax.set_xticks(x, [name for name, _ in E2E_PERCENTILES])
        _ms_axis(ax, (v for _, values, _ in drawn for v in values), "durable time - intended send time")
        ax.set_title(title)
        ax.set_xlabel("percentile of persisted messages")

    return _plot(
        "plot-latency",
        title,
        (
            "Per persisted message: the time its Parquet flush became durable minus its intended send time (open "
            "model, so a stalled pipeline cannot hide behind a publisher that slowed down). Lower is better; a "
            "steep rise towards p99.9 and max is the tail a burst or a slow flush leaves. n counts persisted "
            "messages: the ledger's persisted, not its sent (rejected and dropped messages have no durable time)."
        ),
        _draw(draw),
        f"{title}: p50, p90, p99, p99.9 and max in ms for " + ", ".join(s.label for s, *_ in drawn),
        notes=_scope_notes([s for s, *_ in drawn], latency=True) + _missing_note(without, "no end-to-end latency"),
    )


def _ms_tick(value: float, _pos: Any) -> str:
    if value >= 10 or value == 0:
        return f"{value:,.0f}"
    return f"{value:.3g}"


# Percentiles on a "nines" axis: p90 -> 1, p99 -> 2, p99.9 -> 3; min at 0 and max one step past the last nine.
_LADDER_TICKS = ((0, "min"), (50, "p50"), (90, "p90"), (99, "p99"), (99.9, "p99.9"), (99.99, "p99.99"))


def _nines(p: float) -> float:
    return -math.log10(1 - p / 100) if p < 100 else math.inf


def _ladder_xy(ladder: Any) -> tuple[list[float], list[float]] | None:
    if not isinstance(ladder, list):
        return None
    pairs = []
    for item in ladder:
        if isinstance(item, list | tuple) and len(item) == 2:
            p, v = _number(item[0]), _number(item[1])
            if p is not None and v is not None and 0 <= p <= 100:
                pairs.append((p, v))
    if not pairs:
        return None
    below = [_nines(p) for p, _ in pairs if p < 100]
    top = (max(below) if below else 0) + 1
    xs = [_nines(p) if p < 100 else top for p, _ in pairs]
    ys = [v if v > 0 else math.nan for _, v in pairs]
    return xs, ys


def _ladder_axes(ax: Axes, top: float, values: Iterable[float], ylabel: str) -> None:
    ticks = [(_nines(p), name) for p, name in _LADDER_TICKS if _nines(p) < top] + [(top, "max")]
    ax.set_xticks([t for t, _ in ticks], [name for _, name in ticks])
    ax.set_xlim(-0.15, top + 0.15)
    _ms_axis(ax, values, ylabel)
    ax.set_xlabel('percentile ("nines" scale: each step to the right is ten times rarer)')


def _flush_plot(series: list[_Series]) -> Plot:
    title = f"Flush latency distribution per strategy ({FLUSH_SINK} sink)"
    drawn: list[tuple[_Series, str, list[float], list[float], Any]] = []
    without: list[str] = []
    for s in series:
        found = False
        for trigger in FLUSH_TRIGGERS:
            stats = _flushes(s.variant, trigger)
            xy = _ladder_xy(stats.total_ms.ladder) if stats else None
            if stats is not None and xy is not None:
                drawn.append((s, trigger, xy[0], xy[1], stats.total_ms.count))
                found = True
        if not found:
            without.append(s.label)
    if not drawn:
        what = f"no size- or timeout-triggered {FLUSH_SINK} flushes (with a percentile ladder) in these runs"
        if series and all(_flushes(s.variant, "shutdown") for s in series):
            what += ": only the shutdown flush, one per variant (the runs ended before the buffer filled or timed out)"
        return Plot("plot-flush", title, missing=what)
    top = max(max(xs) for _, _, xs, _, _ in drawn)

    def draw(ax: Axes) -> None:
        for s, trigger, xs, ys, count in drawn:
            style, marker = ("-", "o") if trigger == "size" else ("--", "s")
            n = f", n={count:,} flushes" if isinstance(count, int) else ""
            ax.plot(
                xs, ys, color=s.color, linestyle=style, marker=marker, markersize=4, label=f"{s.label} {trigger}{n}"
            )
        _ladder_axes(ax, top, (y for *_, ys, _ in drawn for y in ys), "flush total time")
        ax.set_title(title)

    return _plot(
        "plot-flush",
        title,
        (
            f"Each flush's total time (build + write + commit) in the {FLUSH_SINK} sink, as a percentile ladder: "
            "solid lines and circles for size-triggered flushes, dashed lines and squares for timeout-triggered "
            "ones (not merged: percentiles of two groups cannot be combined without the raw samples). The "
            "shutdown flush, one per run, is left out. Flat and low is good; a line rising at the right shows "
            "rare slow flushes. With few flushes (small n) the ladder is coarse."
        ),
        _draw(draw),
        f"{title}: flush time in ms against percentile for " + ", ".join(f"{s.label} {t}" for s, t, *_ in drawn),
        notes=_scope_notes(list({s.label: s for s, *_ in drawn}.values()), latency=False)
        + _missing_note(without, f"no {FLUSH_SINK} size/timeout flushes"),
    )


def _lock_plot(series: list[_Series]) -> Plot:
    title = "Lock wait distribution per strategy"
    drawn: list[tuple[_Series, str, list[float], list[float], Any]] = []
    disabled: list[str] = []
    without: list[str] = []
    for s in series:
        lock = s.variant.probes.lock
        if lock is not None and lock.enabled is False:
            disabled.append(s.label)
            continue
        wait = lock.wait_ms if lock else None
        xy = _ladder_xy(wait.ladder) if wait else None
        if lock is None or wait is None or xy is None:
            without.append(s.label)
            continue
        drawn.append((s, lock.strategy or "?", xy[0], xy[1], wait.count))
    notes = _missing_note(disabled, "lock probes disabled") + _missing_note(without, "no lock probes")
    if not drawn:
        what = "no lock probes in these runs"
        if disabled:
            what += f" (disabled in {', '.join(disabled)})"
        return Plot("plot-lock", title, missing=what)
    top = max(max(xs) for _, _, xs, _, _ in drawn)

    def draw(ax: Axes) -> None:
        for s, strategy, xs, ys, count in drawn:
            name = s.label if s.label.rsplit("/", 1)[-1] == strategy else f"{s.label} ({strategy} lock)"
            n = f", n={count:,} puts" if isinstance(count, int) else ""
            ax.plot(xs, ys, color=s.color, linestyle=s.style, marker="o", markersize=4, label=f"{name}{n}")
        _ladder_axes(ax, top, (y for *_, ys, _ in drawn for y in ys), "wait for the buffer lock")
        ax.set_title(title)

    return _plot(
        "plot-lock",
        title,
        (
            "Per put into the readings buffer: the time from asking for the lock to holding it, as a percentile "
            "ladder. A coarse lock (held across the flush, disk included) shows as a jump in the tail to about one "
            "flush time; a swap lock stays near a microsecond throughout. n counts puts: one per accepted "
            "message, so it is the ledger's persisted (plus rows the buffer itself dropped), not its sent: a "
            "rejected message goes to the quarantine and never takes this lock."
        ),
        _draw(draw),
        f"{title}: lock wait in ms against percentile for " + ", ".join(s.label for s, *_ in drawn),
        notes=_scope_notes([s for s, *_ in drawn], latency=False) + notes,
    )


def _append_plot(series: list[_Series]) -> Plot:
    title = "Append cost against file size"
    drawn: list[tuple[_Series, list[float], list[float], float | None, float | None, str]] = []
    without: list[str] = []
    for s in series:
        cost = s.variant.probes.append_cost
        xy = []
        for p in (cost.points if cost else None) or []:
            mb, ms = _number(p[0]), _number(p[2])
            if mb is not None and ms is not None:
                xy.append((mb, ms))
        if cost is None or not xy:
            without.append(s.label)
            continue
        slope, intercept = _number(cost.slope_ms_per_mb), _number(cost.intercept_ms)
        drawn.append((s, [mb for mb, _ in xy], [ms for _, ms in xy], slope, intercept, cost.slope_summary or ""))
    if not drawn:
        return Plot("plot-append", title, missing="no append-cost points (Parquet flushes) in these runs")

    def draw(ax: Axes) -> None:
        for s, mbs, costs, slope, intercept, summary in drawn:
            ax.scatter(mbs, costs, s=14, color=s.color, alpha=0.6, label=f"{s.label} flushes (n={len(mbs):,})")
            if slope is not None and intercept is not None:
                xs = np.linspace(0, max(mbs), 50)
                ax.plot(
                    xs,
                    intercept + slope * xs,
                    color=s.color,
                    linestyle=s.style,
                    linewidth=1.8,
                    label=f"{s.label} fit: {intercept:,.2f} ms at 0 MB, slope {summary}",
                )
        ax.set_title(title)
        ax.set_xlabel("size of the file appended to, before the flush (MB)")
        ax.set_ylabel("append cost: write + commit (ms)")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)

    return _plot(
        "plot-append",
        title,
        (
            "Each point is one Parquet flush: the MB already in the file it appended to, and what putting the batch "
            "into it cost (write + commit). The line is the least-squares fit; its slope comes with a 95% interval "
            '(t, from the scatter around the line), and reads "flat within noise" when that interval holds 0: '
            "a few noisy flushes then make any slope, up or down. A flat line means a true append (row groups, or "
            "a file per flush); a rising one means each append rewrites or rereads the file, so flushes get slower "
            "as the file grows, until the file rotates."
        ),
        _draw(draw),
        f"{title}: append cost in ms against MB in the file, with fitted lines, for "
        + ", ".join(s.label for s, *_ in drawn),
        notes=_missing_note(without, "no append-cost points"),
    )


def _flushes(variant: Variant, trigger: FlushTrigger) -> FlushStats | None:
    """The variant's flushes of the plotted sink by one trigger."""
    sink = variant.probes.flush.get(FLUSH_SINK)
    return sink.trigger(trigger) if sink else None


def _scope_notes(series: list[_Series], *, latency: bool) -> tuple[str, ...]:
    """What a capacity sweep's variant counts in a plot: its figures come from chosen steps, not a whole run."""
    notes = []
    for s in series:
        scope = _capacity_scope(s)
        if scope is not None:
            notes.append(f"{s.label}: {scope[1] if latency else scope[0]}.")
    return tuple(notes)


def _capacity_scope(s: _Series) -> tuple[str, str] | None:
    """For a variant of a capacity sweep: (the steps its ledger, flush and lock figures cover; the step its
    latency and throughput come from). None for a plain run's variant."""
    if s.run.results.kind != "capacity" and s.variant.capacity_step is None:
        return None
    rates = s.variant.ledger.steps_offered_per_s
    if rates:
        listed = ", ".join(f"{_number(r) or 0:,.0f}" for r in rates)
        steps = (
            f"ledger, flush and lock figures cover its {len(rates)} sustainable step(s) ({listed} msg/s), flushes "
            "after each step's settle time"
        )
    else:
        steps = (
            "its ledger covers the sustainable steps, its flush and lock figures every step of the sweep, overloaded "
            "ones included (results written before both covered the same steps)"
        )
    best = _number(s.variant.throughput.offered_per_s)
    at = f" ({best:,.0f} msg/s)" if best is not None else ""
    latency = (
        f"latency and throughput are its highest sustainable step's{at} after the settle time, so n is that step's "
        "persisted messages, not the ledger's"
    )
    return steps, latency


# ----------------------------------------------------------------------------- capacity


@dataclass(frozen=True)
class _CapacitySeries:
    label: str
    run: _Run
    workers: int
    steps: list[CapacityStep]
    data: CapacitySeries
    color: str


def _capacity_series(runs: list[_Run]) -> list[_CapacitySeries]:
    several = len(runs) > 1
    out: list[_CapacitySeries] = []
    for run in runs:
        for entry in run.results.capacity.series if run.results.capacity else []:
            name = _workers_text(entry.workers)
            color = PALETTE[len(out) % len(PALETTE)]
            label = f"{run.label}/{name}" if several else name
            out.append(_CapacitySeries(label, run, entry.workers, entry.steps, entry, color))
    return out


NO_CAPACITY = "no capacity sweep in these runs (`bench capacity` writes one: the 'capacity' key of results.json)"


def _step_points(
    steps: list[CapacityStep], y_of: Callable[[CapacityStep], float | None]
) -> list[tuple[float, float, CapacityStep]]:
    """(offered rate, y, step) of each step that has both, by offered rate."""
    pts = []
    for step in steps:
        x, y = _number(step.offered_per_s), _number(y_of(step))
        if x is not None and y is not None:
            pts.append((x, y, step))
    return sorted(pts, key=lambda p: p[0])


def _step_e2e(step: CapacityStep) -> LatencySummary | None:
    return step.latency_ms.end_to_end if step.latency_ms else None


def _step_p50(step: CapacityStep) -> float | None:
    e2e = _step_e2e(step)
    return e2e.p50 if e2e else None


def _step_p99(step: CapacityStep) -> float | None:
    e2e = _step_e2e(step)
    return e2e.p99 if e2e else None


def _rate_axes(ax: Axes) -> None:
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


# Steps that were not sustainable, and why: marker and face colour in the capacity plot.
_UNSUSTAINABLE_MARKERS = {"unsustainable": ("X", "black"), "publisher-limited": ("s", "none")}
_STEP_KIND_LABELS = {
    "unsustainable": "step not sustainable",
    "publisher-limited": "publishers could not offer the rate (says nothing of the pipeline)",
}


def _step_kind(step: CapacityStep) -> str:
    if step.verdict is not None:
        return step.verdict
    return "sustainable" if step.sustainable is not False else "unsustainable"


def _capacity_plot(capacity: list[_CapacitySeries]) -> Plot:
    title = "Capacity: achieved against offered rate"
    drawn = [(cs, pts) for cs in capacity if (pts := _step_points(cs.steps, lambda st: st.persisted_per_s))]
    if not drawn:
        what = NO_CAPACITY if not capacity else "no steps with offered and persisted rates in the capacity sweeps"
        return Plot("plot-capacity", title, missing=what, applies=bool(capacity))
    thresholds = {_number(_threshold(cs.run.results.capacity)) for cs, _ in drawn} - {None}
    threshold = min(t for t in thresholds if t is not None) if thresholds else None
    top = max(max(max(x, y) for x, y, _ in pts) for _, pts in drawn) * 1.05

    def draw(ax: Axes) -> None:
        ax.plot([0, top], [0, top], color="#777777", linewidth=1, linestyle="--", label="achieved = offered")
        if threshold is not None:
            ax.plot(
                [0, top],
                [0, top * threshold],
                color="#777777",
                linewidth=0.8,
                linestyle=":",
                label=f"{threshold:.0%} of offered (sustainable threshold)",
            )
        for cs, pts in drawn:
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], color=cs.color, marker="o", markersize=4,
                    label=cs.label)  # fmt: skip
            for kind, (marker, face) in _UNSUSTAINABLE_MARKERS.items():
                xy = [(x, y) for x, y, step in pts if _step_kind(step) == kind]
                if xy:
                    ax.scatter([x for x, _ in xy], [y for _, y in xy], marker=marker, s=45, facecolors=face,
                               edgecolors="black", linewidths=1.2, zorder=3)  # fmt: skip
            best = cs.data.best_step()
            sx, sy = (_number(best.offered_per_s), _number(best.persisted_per_s)) if best else (None, None)
            if sx is not None and sy is not None:
                ax.scatter([sx], [sy], marker="*", s=220, color=cs.color, edgecolors="black", linewidths=0.8, zorder=4,
                           label=f"{cs.label} sustainable: {sx:,.0f} msg/s")  # fmt: skip
        kinds = {_step_kind(step) for _, pts in drawn for *_, step in pts}
        for kind, (marker, face) in _UNSUSTAINABLE_MARKERS.items():
            if kind in kinds:
                ax.scatter([], [], marker=marker, facecolors=face, edgecolors="black", label=_STEP_KIND_LABELS[kind])
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_title(title)
        ax.set_xlabel("offered rate (msg/s)")
        ax.set_ylabel("achieved rate: persisted (msg/s)")
        _rate_axes(ax)

    return _plot(
        "plot-capacity",
        title,
        (
            "One line per worker count: each step of the sweep offered a fixed rate and measured what was persisted. "
            "On the dashed diagonal the pipeline keeps up; where a line bends below it, it saturates. The star marks "
            "the highest step the sweep called sustainable (persisted at least the threshold share of offered, "
            "backlog not growing); a cross marks a step that was not, a hollow square one where the publishers could "
            "not offer the rate (publisher-limited: it says nothing about the pipeline)."
        ),
        _draw(draw),
        f"{title}: persisted against offered msg/s per worker count, with the y = x line and the sustainable "
        "point marked, for " + ", ".join(cs.label for cs, _ in drawn),
    )


def _capacity_latency_plot(capacity: list[_CapacitySeries]) -> Plot:
    title = "Latency against load"
    drawn = []
    for cs in capacity:
        p50 = _step_points(cs.steps, _step_p50)
        p99 = _step_points(cs.steps, _step_p99)
        if p50 or p99:
            drawn.append((cs, p50, p99))
    if not drawn:
        what = NO_CAPACITY if not capacity else "no end-to-end latency in the capacity steps of these runs"
        return Plot("plot-capacity-latency", title, missing=what, applies=bool(capacity))

    def draw(ax: Axes) -> None:
        values: list[float] = []
        for cs, p50, p99 in drawn:
            for pts, style, name in ((p99, "-", "p99"), (p50, "--", "p50")):
                if pts:
                    ys = [y if y > 0 else np.nan for _, y, _ in pts]
                    values += [y for _, y, _ in pts]
                    ax.plot([x for x, _, _ in pts], ys, color=cs.color, linestyle=style, marker="o", markersize=3,
                            label=f"{cs.label} {name}")  # fmt: skip
            knee = cs.data.knee
            kx, ky = (_number(knee.offered_per_s), _number(knee.p99_ms)) if knee else (None, None)
            if kx is not None:
                ax.axvline(kx, color=cs.color, linewidth=0.9, linestyle=":")
                if ky is not None and ky > 0:
                    ax.scatter([kx], [ky], marker="D", s=60, color=cs.color, edgecolors="black", zorder=4,
                               label=f"{cs.label} knee: {kx:,.0f} msg/s")  # fmt: skip
        _ms_axis(ax, values, "end-to-end latency")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlim(left=0)
        ax.set_title(title)
        ax.set_xlabel("offered rate (msg/s)")

    return _plot(
        "plot-capacity-latency",
        title,
        (
            "End-to-end latency of each capacity step: p99 solid, p50 dashed, one colour per worker count. Latency "
            "stays flat while the pipeline keeps up and climbs once a queue forms; the diamond and the dotted "
            "vertical line mark the knee the sweep found (where p99 starts to climb)."
        ),
        _draw(draw),
        f"{title}: p50 and p99 end-to-end latency in ms against offered msg/s, knee marked, for "
        + ", ".join(cs.label for cs, *_ in drawn),
    )


def _usl(n: Any, lam: float, sigma: float, kappa: float) -> Any:
    return lam * n / (1 + sigma * (n - 1) + kappa * n * (n - 1))


def _usl_plot(runs: list[_Run]) -> Plot:
    title = "Universal Scalability Law fit"
    fits: list[tuple[_Run, UslFit, tuple[float, float, float], list[tuple[float, float]]]] = []
    unfitted: list[str] = []
    for run in runs:
        capacity = run.results.capacity
        if capacity is None:
            continue
        usl = capacity.usl
        lam, sigma, kappa = (_number(usl.lambda_), _number(usl.sigma), _number(usl.kappa)) if usl else (None,) * 3
        if usl is None or lam is None or sigma is None or kappa is None:
            unfitted.append(run.label)
            continue
        points = []
        for p in usl.points:
            n, x = _number(p[0]), _number(p[1])
            if n is not None and x is not None:
                points.append((n, x))
        fits.append((run, usl, (lam, sigma, kappa), points))
    if not fits:
        what = NO_CAPACITY
        if unfitted:
            counts = {len(r.results.capacity.series) for r in runs if r.label in unfitted and r.results.capacity}
            why = (
                "one worker count measured: a fit needs two or more (--workers 1,2)" if counts == {1} else "usl is null"
            )
            what = f"no USL fit in these runs: the capacity sweep of {', '.join(unfitted)} has none ({why})"
        return Plot("plot-usl", title, missing=what, applies=bool(unfitted))
    several = len(runs) > 1

    def draw(ax: Axes) -> None:
        top_n = 1.0
        for i, (run, usl, (lam, sigma, kappa), points) in enumerate(fits):
            measured = max((n for n, _ in points), default=1.0)
            peak = _number(usl.peak_workers)
            # Show the peak when it is within reach of the data; a far-off peak would flatten the measured part.
            reach = max(measured * 2, min(peak * 1.25, measured * 6) if peak is not None else 0)
            top_n = max(top_n, reach)
            prefix = f"{run.label}: " if several else ""
            color = PALETTE[i % len(PALETTE)]
            ns = np.linspace(1, reach, 200)
            ax.plot(ns, _usl(ns, lam, sigma, kappa), color=color,
                    label=f"{prefix}USL fit: λ={lam:,.0f} msg/s per worker, σ={sigma:.3g}, κ={kappa:.3g}")  # fmt: skip
            if points:
                ax.scatter([n for n, _ in points], [x for _, x in points], color=color, edgecolors="black", zorder=3,
                           s=36, label=f"{prefix}measured")  # fmt: skip
            peak_x = _number(usl.peak_per_s)
            if peak is not None and peak_x is not None and peak <= reach:
                ax.scatter([peak], [peak_x], marker="*", s=200, color=color, edgecolors="black", zorder=4,
                           label=f"{prefix}predicted peak: {peak_x:,.0f} msg/s at {peak:.3g} workers")  # fmt: skip
        ax.set_xlim(0, top_n * 1.02)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_title(title)
        ax.set_xlabel("workers (N)")
        ax.set_ylabel("throughput (msg/s)")

    notes = tuple(f"{r.label}: {usl.note}" if several else usl.note for r, usl, *_ in fits if usl.note)
    return _plot(
        "plot-usl",
        title,
        (
            "X(N) = λN / (1 + σ(N-1) + κN(N-1)), fitted to the throughput measured at each worker count (dots). σ "
            "(contention) is the share of work that does not parallelise; κ (coherency) the cost of workers "
            "keeping each other in step, which makes throughput fall past the peak. Trust the curve near the dots; "
            "far beyond them it is an extrapolation."
        ),
        _draw(draw),
        f"{title}: measured msg/s against workers with the fitted curve for " + ", ".join(r.label for r, *_ in fits),
        notes=notes + _missing_note(unfitted, "no USL fit"),
    )


def _threshold(capacity: Capacity | None) -> float | None:
    return capacity.threshold if capacity else None


# ----------------------------------------------------------------------------- tables


def _ratio(value: Any, base: Any) -> str:
    """The terminal summary's ratio to the first column: x1.23, or 1/N below 0.1."""
    v, b = _number(value), _number(base)
    if v is None or not b:
        return ""
    r = v / b
    return f"x{r:,.2f}" if r >= 0.1 or r == 0 else f"1/{1 / r:,.0f}"


def _runs_table(runs: list[_Run]) -> Table:
    rows = []
    for label, get in (
        ("folder", lambda r: str(r.folder)),
        ("scenario", lambda r: r.results.scenario.name),
        ("scenario file", lambda r: r.results.scenario.path),
        ("scenario sha256", lambda r: r.results.scenario.sha256),
        ("seed", lambda r: r.results.scenario.seed),
        ("run id", lambda r: r.results.run_id),
        ("started at", lambda r: r.results.started_at),
        ("schema version", lambda r: r.results.schema_version),
        ("variants", lambda r: ", ".join(v.name for v in r.results.variants) or None),
        ("capacity sweep", lambda r: "yes" if r.results.capacity is not None else "no"),
    ):
        rows.append(Row(label, tuple(Cell(_fmt(get(r), "{}")) for r in runs)))
    return Table("table-runs", "Runs", ("", *(r.label for r in runs)), tuple(rows), numeric=False)


def _ledger_table(runs: list[_Run], series: list[_Series]) -> Table:
    title = "Ledger: where every sent message went"
    if not series:
        missing = "no variants in these runs (nothing was sent)"
        if any(r.results.failures for r in runs):
            missing = "no variant ran to its ledger (see Failures)"
        return Table("table-ledger", title, (), (), missing=missing)
    ledgers = [s.variant.ledger for s in series]
    rows = [Row("reconciled", tuple(_reconciled_cell(lg) for lg in ledgers))]
    for key, bad_if_nonzero in (
        ("sent", False),
        ("persisted", False),
        ("rejected", False),
        ("dropped", False),
        ("lost", True),
        ("duplicates", True),
        ("unexpected", True),
        ("redelivered", False),
        ("quarantine_rows", False),
    ):
        values = [getattr(lg, key) for lg in ledgers]
        if all(v is None for v in values):
            continue
        rows.append(Row(key.replace("_", " "), tuple(_count_cell(v, bad_if_nonzero) for v in values)))
    set_aside = [lg.not_persisted_expected for lg in ledgers]
    if any(n is not None for n in set_aside):
        # An external system's bad input left out of its output, as its truth label says it may be: not lost.
        rows.append(Row("not persisted (truth: bad input)", tuple(_count_cell(n) for n in set_aside)))
    for by_reason, name in (
        ([lg.by_reason or {} for lg in ledgers], "rejected"),
        ([lg.dropped_by_reason or {} for lg in ledgers], "dropped"),
        ([lg.not_persisted_by_truth or {} for lg in ledgers], "not persisted"),
    ):
        for reason in sorted({r for counts in by_reason for r in counts}):
            by = [counts.get(reason) or 0 for counts in by_reason]
            rows.append(Row(f"{name}: {reason}", tuple(_count_cell(v) for v in by), indent=True))
    # Unreadable files beside a reconciled ledger were named by faults the configuration never promised to survive.
    broken = [(len(s.variant.unreadable_files), bool(s.variant.ledger.reconciled)) for s in series]
    for label, counts in (
        ("unfinalised files", [len(lg.unfinalised_files or []) for lg in ledgers]),
        ("unreadable files", [0 if named else n for n, named in broken]),
        ("files broken by named faults", [n if named else 0 for n, named in broken]),
    ):
        if any(counts):
            bad = label != "files broken by named faults"
            rows.append(Row(label, tuple(_count_cell(n, bad_if_nonzero=bad) for n in counts)))
    if any(lg.missing_seq_sample for lg in ledgers):
        samples = [", ".join(map(str, lg.missing_seq_sample or [])) or "-" for lg in ledgers]
        rows.append(Row("missing seq (sample)", tuple(Cell(text, tone="bad") for text in samples)))
    caption = (
        "sent = persisted + rejected + dropped + lost, counted by reading the sinks back; lost, duplicates "
        "and unexpected must be 0."
    )
    if any(n is not None for n in set_aside):
        caption += (
            " An external system's sends found nowhere whose truth label says they should not be stored are "
            "'not persisted (truth: bad input)', added to that sum; only the rest are lost."
        )
    not_run = [label for label, _ in _failed(runs)]
    if not_run:
        # A variant that did not run has no column: say so here too, or the table reads as the whole matrix.
        caption += f" Not in this table, because they did not run (see Failures): {', '.join(not_run)}."
    return Table("table-ledger", title, ("", *(s.label for s in series)), tuple(rows), caption=caption)


def _failed(runs: list[_Run]) -> list[tuple[str, str]]:
    """(label, error) of each variant that did not run; labelled ``run/variant`` like the series of several runs."""
    several = len(runs) > 1
    return [(f"{r.label}/{f.variant}" if several else f.variant, f.error) for r in runs for f in r.results.failures]


def _failures_table(runs: list[_Run], series: list[_Series]) -> Table:
    """What kept a run from its full result: variants that did not run, files the read-back could not read."""
    rows = [Row(label, (Cell("did not run", tone="bad"), Cell(error, tone="text"))) for label, error in _failed(runs)]
    for s in series:
        # A reconciled ledger beside unreadable files: the runner named them by faults the configuration never
        # promised to survive (each entry says which); a finding, not a failure of the run.
        named = bool(s.variant.ledger.reconciled)
        what = Cell("broken by a fault (named)") if named else Cell("unreadable file", tone="bad")
        for file in s.variant.unreadable_files:
            rows.append(Row(s.label, (what, Cell(file, tone="text"))))
    return Table(
        "table-failures",
        "Failures",
        ("variant", "what", "detail"),
        tuple(rows),
        caption="A variant that did not run has no column in the tables below and no line in the plots; the run "
        "failed for it. An unreadable file (path: error) was skipped by the read-back: the rows it held count as "
        "lost or are missing from the ledger, which is therefore not reconciled, unless faults the "
        "configuration never promised to survive broke it: then its rows are named by those faults, and the "
        "entry says which.",
        missing="" if rows else "no failures",
        numeric=False,
        applies=False,  # nothing failed: no section, and nothing to name at the end of the page
    )


FAULT_COLUMNS = (
    "fault",
    "at s",
    "duration s",
    "back after s",
    "loss expected",
    "named",
    "lost",
    "duplicated",
    "p99 ms",
    "max ms",
    "latency",
    "detail",
)
LATENCY_KINDS = {"end_to_end": "end to end", "receive": "to receipt"}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-") or "variant"


def _fault_groups(runs: list[_Run], series: list[_Series]) -> list[FaultGroup]:
    """Per run whose variants had faults, a table per such variant: a row per fault that struck."""
    groups = []
    used: set[str] = set()
    for run in runs:
        tables = []
        for s in series:
            if s.run is not run or not s.variant.fault_events:
                continue
            base = table_id = FAULT_TABLE_PREFIX + _slug(s.label)
            n = 1
            while table_id in used:  # two labels with one slug ("a/b", "a-b"): keep ids unique
                n += 1
                table_id = f"{base}-{n}"
            used.add(table_id)
            tables.append(_fault_table(table_id, s.label, s.variant.fault_events))
        if tables:
            several = len(runs) > 1
            groups.append(
                FaultGroup(
                    f"faults-{_slug(run.label)}" if several else "faults",
                    f"Faults: {run.label}" if several else "Faults",
                    tuple(tables),
                    FAULTS_CAPTION,
                )
            )
    return groups


def _fault_table(table_id: str, label: str, events: list[FaultEvent]) -> Table:
    rows = []
    for i, e in enumerate(events, 1):
        back = Cell(_fmt(e.recovered_s, "{:,.2f}"))
        if e.recovered_s is None and e.error:
            back = Cell("never", tone="bad")
        latency = e.latency_ms
        detail = "; ".join(t for t in (e.detail, f"not back: {e.error}" if e.error else None) if t)
        cells = (
            Cell(_fmt(e.at_s, "{:,.2f}")),
            Cell(_fmt(e.duration_s, "{:,.2f}")),
            back,
            Cell(_fmt(e.expected_loss), tone="dim" if e.expected_loss else ""),
            _count_cell(e.named),
            _count_cell(e.lost, bad_if_nonzero=True),
            _count_cell(e.duplicated),
            Cell(_fmt(latency.p99 if latency else None, "{:,.1f}")),
            Cell(_fmt(latency.max if latency else None, "{:,.1f}")),
            Cell(LATENCY_KINDS.get(e.latency_kind or "", _fmt(e.latency_kind, "{}")), tone="text dim"),
            Cell(detail or "-", tone="text bad" if e.error else "text"),
        )
        rows.append(Row(f"{i}. {e.kind}", cells))
    if all(e.counted for e in events):
        named, lost = sum(e.named or 0 for e in events), sum(e.lost or 0 for e in events)
        duplicated = sum(e.duplicated or 0 for e in events)
        note = f"In all: {named:,} named, {lost:,} lost, {duplicated:,} duplicated."
    else:
        note = (
            "A dash in named, lost or duplicated: not counted. Results written before schema version 10 say when "
            "a fault struck, and what it cost only where the ledger settles it."
        )
    return Table(table_id, f"Faults in {label}", FAULT_COLUMNS, tuple(rows), caption=note)


FAULTS_CAPTION = (
    "One row per fault that struck, at seconds after the first send. Its window runs from a little before it "
    "struck (what a naive writer held dies with it) to a little after the system was back (back after: from the "
    "strike until it received again); the counts and the latency are of the messages intended within it. Loss "
    "expected: the configuration did not promise to survive this fault, so its losses are named by it (dropped "
    "in the ledger). Lost: what nothing explains; it fails the run. Duplicated: arrived or stored more than once. "
    "Latency end to end: to the durable flush; to receipt: to the row's received_at, all that is known of a "
    "pipeline in another process."
)


def _comparable(s: _Series) -> tuple[str, str]:
    """Columns with the same key ran the same stream the same way: only between those is a ratio a comparison
    of strategies (a plain run and a capacity sweep of one scenario measure different things too)."""
    return s.run.results.scenario.name or "?", s.run.results.kind or "run"


def _flush_count_rows(series: Sequence[Any]) -> list[Row]:
    """The built-in pipeline's Parquet flushes per trigger, and how many triggers were coalesced."""
    return [
        Row(
            "flushes size/timeout/shutdown",
            tuple(
                Cell("/".join(str(f.count if (f := _flushes(s.variant, t)) else 0) for t in ALL_TRIGGERS))
                for s in series
            ),
        ),
        Row(
            "coalesced triggers",
            tuple(
                Cell(str(sum((f.coalesced or 0) if (f := _flushes(s.variant, t)) else 0 for t in ALL_TRIGGERS)))
                for s in series
            ),
        ),
    ]


def _strategies_table(series: list[_Series]) -> Table:
    title = "Strategies side by side"
    if not series:
        return Table("table-strategies", title, (), (), missing="no variants in these runs")
    # Each column's ratio is to the first column of its own scenario; the first of each scenario has none.
    base_of: dict[tuple[str, str], int] = {}
    for i, s in enumerate(series):
        base_of.setdefault(_comparable(s), i)
    bases = [base_of[_comparable(s)] for s in series]
    notes: list[str] = []
    rows = [Row("ledger reconciled", tuple(_reconciled_cell(s.variant.ledger) for s in series))]
    for metric in METRIC_ROWS:
        label = metric.label.strip()
        values = [metric.value(s.variant) for s in series]
        if all(v is None for v in values):
            continue
        cells = []
        for i, (s, v) in enumerate(zip(series, values, strict=True)):
            note = _ratio(v, values[bases[i]]) if metric.ratio and i != bases[i] and v is not None else ""
            tone = ""
            summary = metric.summary(s.variant) if metric.summary else None
            share = tail_share_bound(summary)
            if summary is not None and share is not None and share >= TAIL_SHARE_WARNING:
                # A ratio of two p99s that both miss where the time went would only mislead further.
                note, tone = f"≥{share:.0%} of the total is in the slowest 1%", "warn"
                notes.append(
                    f"{label} of {s.label} describes almost none of the time: at least {share:.0%} of the "
                    f"{_fmt(summary.total, '{:,.0f}')} ms in all lies in the slowest 1% of its "
                    f"{_fmt(summary.count)} samples; read p99.9, max and total."
                )
            cells.append(Cell(_fmt(v, metric.fmt), note=note, tone=tone))
        rows.append(Row(label, tuple(cells), indent=metric.label.startswith(" ")))
    # The built-in pipeline's flush counts: an external system has none to show (not zero).
    builtin = not all(
        (s.variant.system is not None and s.variant.system.kind == "external")
        or any(getattr(s.variant, shape, None) is not None for shape in ("recompute", "forward", "windows"))
        for s in series
    )
    rows.extend(_flush_count_rows(series) if builtin else [])
    return Table(
        "table-strategies",
        title,
        ("metric", *(s.label for s in series)),
        tuple(rows),
        caption=" ".join([_ratio_caption(series, bases), *notes, *_scope_captions(series)]),
    )


def _ratio_caption(series: list[_Series], bases: list[int]) -> str:
    groups = sorted(set(bases))
    if len(groups) == 1:
        text = f"The terminal summary's rows; (xN) is the ratio to the first column, {series[0].label}."
    else:
        firsts = ", ".join(f"{series[b].label} for {_comparable(series[b])[0]}" for b in groups)
        text = (
            "The terminal summary's rows; (xN) is the ratio to the first column of the same scenario "
            f"({firsts}). Columns of different scenarios get no ratio: their streams differ, so a ratio would "
            "compare the scenarios, not the strategies."
        )
    for b in groups:
        key = _comparable(series[b])
        digests = {s.run.results.scenario.sha256 for s in series if _comparable(s) == key}
        if len(digests) > 1:
            text += (
                f" The {key[0]} scenario file differs between these runs (same name, other content): check the "
                "ratios compare like with like."
            )
    return text


def _scope_captions(series: list[_Series]) -> list[str]:
    out = []
    for s in series:
        scope = _capacity_scope(s)
        if scope is not None:
            out.append(f"{s.label} (a capacity sweep): {scope[0]}; {scope[1]}.")
    return out


TRUTH_TABLE_ID = "table-truth"
"""An external system's output by truth label (only runs of one have it)."""
TRUTH_COLUMNS = ("truth label", "expected", "sent", "persisted", "rejected", "not persisted", "lost", "reasons")


def _truth_table(series: list[_Series]) -> Table:
    title = "Truth labels: what the external system did with each kind of message"
    judged = [(s, s.variant.truth) for s in series if s.variant.truth is not None]
    if not judged:
        return Table(TRUTH_TABLE_ID, title, TRUTH_COLUMNS, (), missing="no external system", applies=False)
    several = len(judged) > 1
    rows = []
    captions = []
    for s, truth in judged:
        for label, row in truth.classes.items():
            # Stored against its truth, or refused though it should be stored: a finding (warn), not a failure.
            wrong_way = row.persisted if row.expected == "not_persisted" else row.rejected
            reasons = ", ".join(f"{k} {_fmt(n)}" for k, n in sorted((row.reasons or {}).items(), key=lambda kv: -kv[1]))
            cells = (
                Cell("not stored" if row.expected == "not_persisted" else "stored", tone="text"),
                Cell(_fmt(row.sent)),
                Cell(_fmt(row.persisted), tone="warn" if row.expected == "not_persisted" and wrong_way else ""),
                Cell(_fmt(row.rejected), tone="warn" if row.expected == "persisted" and wrong_way else ""),
                Cell(_fmt(row.not_persisted)),
                _count_cell(row.lost, bad_if_nonzero=True),
                Cell(reasons or "-", tone="text"),
            )
            rows.append(Row(f"{s.label}: {label}" if several else label, cells))
        prefix = f"{s.label}: " if several else ""
        kept = "keeps its rejects" if truth.rejects_kept else "keeps no rejects (what it refused is found nowhere)"
        text = f"{prefix}the system {kept}. " + "".join(f"Finding: {f}. " for f in truth.findings)
        captions.append(text.strip())
    caption = (
        " ".join(captions)
        + " Expected 'not stored': the truth labels the built-in validator rejects by default, or the scenario's "
        "system.external.expect_rejected. Such a message missing from the output is not lost; one stored anyway, "
        "or a message to be stored that was rejected, is shown as a finding: the bench cannot know the system's "
        "policy. Lost messages fail the run."
    )
    return Table(TRUTH_TABLE_ID, title, TRUTH_COLUMNS, tuple(rows), caption=caption)


def _validation_table(series: list[_Series]) -> Table:
    title = "Validation: truth against decision per anomaly class"
    header = ("class (truth)", "injected", "expected", "decisions", "mismatches")
    scored = [(s, s.variant.validation) for s in series if s.variant.validation is not None]
    if not scored:
        return Table(
            "table-validation",
            title,
            header,
            (),
            missing="no anomalies injected in these runs (a scenario's anomalies: section scores validation)",
            applies=False,
        )
    several = len(scored) > 1
    rows = []
    captions = []
    for s, score in scored:
        for truth, row in sorted(score.classes.items()):
            expected = ", ".join(f"{k} {_fmt(n)}" for k, n in row.expected.items())
            decided = sorted(row.decisions.items(), key=lambda kv: (-kv[1], kv[0]))
            cells = (
                Cell(_fmt(row.injected)),
                Cell(expected or "-", tone="text"),
                Cell(", ".join(f"{k} {_fmt(n)}" for k, n in decided) or "-", tone="text"),
                _count_cell(row.mismatches, bad_if_nonzero=True),
            )
            rows.append(Row(f"{s.label}: {truth}" if several else truth, cells))
        checks = score.output_checks
        prefix = f"{s.label}: " if several else ""
        text = (
            f"{prefix}{_fmt(score.mismatches)} mismatch(es); read back {_fmt(checks and checks.rows_read_back)} "
            f"rows: NaN/inf {_fmt(checks and checks.non_finite_values)}, files with naive timestamps "
            f"{_fmt(checks and checks.files_with_naive_timestamps)}, beyond the future tolerance "
            f"{_fmt(checks and checks.beyond_future_tolerance)}; quarantine rows {_fmt(score.quarantine_rows)}."
        )
        if score.mismatch_sample:
            text += (
                " Sample of mismatches: "
                + ", ".join(
                    f"seq {_fmt(m.seq, '{}')} {_fmt(m.truth, '{}')} ({_fmt(m.problem, '{}')})"
                    for m in score.mismatch_sample
                )
                + "."
            )
        text += "".join(f" Problem: {p}." for p in score.problems)
        captions.append(text)
    return Table(
        "table-validation",
        title,
        header,
        tuple(rows),
        caption="Each injected message carries its truth label; expected is what the validator's policies say it "
        "should become, decisions what it became, read back from Parquet and the quarantine. A mismatch fails the "
        "run. " + " ".join(captions),
    )


def _environment_table(runs: list[_Run]) -> Table:
    envs = [r.results.environment for r in runs]

    def load(value: list[float] | None) -> str:
        if value:
            return " / ".join(_fmt(v, "{:.2f}") for v in value)
        return _fmt(value, "{}")

    rows = [
        Row("python", tuple(Cell(f"{_fmt(e.python, '{}')} ({_fmt(e.implementation, '{}')})") for e in envs)),
        Row("platform", tuple(Cell(_fmt(e.platform, "{}")) for e in envs)),
        Row("machine", tuple(Cell(_fmt(e.machine, "{}")) for e in envs)),
        Row("cpus", tuple(Cell(_fmt(e.cpus, "{}")) for e in envs)),
        Row("host load before (1/5/15 min)", tuple(Cell(load(e.host_load)) for e in envs)),
        Row("host load after (1/5/15 min)", tuple(Cell(load(e.host_load_after)) for e in envs)),
    ]
    for name in sorted({p for e in envs for p in e.packages}):
        rows.append(Row(name, tuple(Cell(_fmt(e.packages.get(name), "{}")) for e in envs), indent=True))
    header = ("", *(r.label for r in runs))
    return Table("table-environment", "Environment", header, tuple(rows), numeric=False)


_STEP_COLUMNS: tuple[tuple[str, Callable[[CapacityStep], Any], str], ...] = (
    ("offered msg/s", lambda st: st.offered_per_s, "{:,.0f}"),
    ("sent msg/s", lambda st: st.sent_per_s, "{:,.1f}"),
    ("publisher kept up", lambda st: st.publisher_kept_up, "{}"),
    ("persisted msg/s", lambda st: st.persisted_per_s, "{:,.1f}"),
    ("achieved ratio", lambda st: st.achieved_ratio, "{:.3f}"),
    ("backlog slope /s", lambda st: st.backlog_slope_per_s, "{:,.1f}"),
    ("backlog end", lambda st: st.backlog_end, "{:,.0f}"),
    ("backlog growing", lambda st: st.backlog_growing, "{}"),
    ("e2e p50 ms", _step_p50, "{:,.1f}"),
    ("e2e p99 ms", _step_p99, "{:,.1f}"),
    ("flush p99 ms", lambda st: st.flush_ms.p99 if st.flush_ms else None, "{:,.1f}"),
    ("lock wait p99 ms", lambda st: st.lock_wait_ms.p99 if st.lock_wait_ms else None, "{:,.3f}"),
    ("CPU %", lambda st: st.cpu_pct, "{:,.0f}"),
    ("RSS MB", lambda st: st.rss_mb, "{:,.0f}"),
    ("Little L/(λW)", lambda st: st.little.ratio if st.little else None, "{:.2f}"),
)
VERDICT_TONES = {"sustainable": "good", "unsustainable": "bad", "publisher-limited": "dim"}


def _capacity_table(capacity: list[_CapacitySeries]) -> Table:
    title = "Capacity steps"
    header = ("workers", *(name for name, _, _ in _STEP_COLUMNS), "verdict")
    if not capacity:
        return Table("table-capacity", title, header, (), missing=NO_CAPACITY, applies=False)
    rows = []
    for cs in capacity:
        for step in cs.steps:
            cells = []
            for name, get, fmt in _STEP_COLUMNS:
                value = get(step)
                tone = ""
                if name == "publisher kept up":
                    tone = "bad" if value is False else ""
                elif name == "backlog growing":
                    tone = "bad" if value is True else ""
                cells.append(Cell(_fmt(value, fmt), tone=tone))
            # Older files' steps without a verdict get theirs from `sustainable` in the model.
            cells.append(Cell(_fmt(step.verdict, "{}"), tone=VERDICT_TONES.get(str(step.verdict), "")))
            rows.append(Row(cs.label, tuple(cells)))
    return Table(
        "table-capacity",
        title,
        header,
        tuple(rows),
        caption=(
            "One row per step of the sweep. A step is sustainable when persisted reaches the threshold share of "
            "offered and the backlog (sent, not yet durable) is not growing: its slope over the step, the backlog "
            "left at its end and whether it grew are the evidence. publisher-limited: the publishers could not offer "
            "the rate, so the step says nothing about the pipeline. Little L/(λW) near 1: the measured backlog and "
            "latency agree. Latency, flush and lock-wait columns are of that step alone, after its settle time, "
            "flushes of every trigger together: the strategies table's flush rows are per trigger, over all the "
            "sustainable steps."
        ),
    )


def _cpu_text(cpu: CpuAccount | None) -> str:
    """Where a step's CPU went, 100 = one core: the sweep's roles, other processes and the machine's share."""
    if cpu is None:
        return "-"
    roles = (
        ("workers", cpu.workers_pct),
        ("publishers", cpu.publishers_pct),
        ("broker", cpu.broker_pct),
        ("bench", cpu.bench_pct),
        ("other processes", cpu.other_pct),
    )
    text = ", ".join(f"{name} {value:,.0f}%" for name, value in roles if value is not None)
    if cpu.machine_pct is not None:
        text += f"; machine {cpu.machine_pct:,.0f}% of all {cpu.cores or '?'} cores"
    return text or "-"


def _capacity_summary_table(capacity: list[_CapacitySeries]) -> Table:
    rows = []
    notes: list[str] = []
    said: list[str] = []  # the scaling read-out, first in the caption: what the worker counts add up to
    for cs in capacity:
        knee = cs.data.knee
        method = knee.method if knee else None
        if method and f"Knee: {method}." not in notes:
            notes.append(f"Knee: {method}.")
        notes += [f"{cs.label}: {w}." for w in cs.data.warnings or []]
        sweep = cs.run.results.capacity
        scaling = sweep.scaling if sweep is not None else None
        # Older files have no scaling read-out: their new cells show "-".
        row = next((r for r in scaling.rows if r.workers == cs.workers), None) if scaling else None
        for text in (scaling.growth, scaling.statement) if scaling else ():
            if text and f"Scaling: {text}." not in said:
                said.append(f"Scaling: {text}.")
        rows.append(
            Row(
                cs.label,
                (
                    Cell(_fmt(cs.data.sustainable_per_s, "{:,.0f}")),
                    Cell(_fmt(row.vs_one_worker if row else None, "{:.2f}x")),
                    Cell(_fmt(cs.data.peak_per_s, "{:,.0f}")),
                    Cell(_fmt(row.generator_ceiling_per_s if row else None, "{:,.0f}")),
                    Cell(_fmt(knee.offered_per_s if knee else None, "{:,.0f}")),
                    Cell(_fmt(knee.p99_ms if knee else None, "{:,.1f}")),
                    Cell(_fmt(cs.data.limit, "{}"), tone="text"),
                    Cell(_cpu_text(row.cpu if row else None), tone="text"),
                    Cell(_fmt(cs.data.stopped, "{}"), tone="text dim"),
                ),
            )
        )
    if any(r.run.results.capacity and r.run.results.capacity.scaling for r in capacity):
        notes.append(
            "Generator ceiling: the publishers' calibrated combined ceiling (bench capacity --calibration; '-' "
            "without). CPU at the limit: at the first step that was not sustainable, 100% = one core; other "
            "processes = the machine's busy CPU less the sweep's."
        )
    return Table(
        "table-capacity-summary",
        "Sustainable rate and knee per worker count",
        (
            "workers",
            "sustainable msg/s",
            "x 1 worker",
            "peak persisted msg/s",
            "generator ceiling msg/s",
            "knee offered msg/s",
            "knee p99 ms",
            "limit",
            "CPU at the limit",
            "stopped",
        ),
        tuple(rows),
        caption=" ".join(said + notes),
        missing="" if rows else NO_CAPACITY,
        applies=bool(capacity),
    )


def _recommendations_table(runs: list[_Run]) -> Table:
    rows = []
    several = len(runs) > 1
    for run in runs:
        for rec in run.results.capacity.recommendations if run.results.capacity else []:
            cells = (Cell(rec.text), Cell(rec.evidence, tone="dim"))
            rows.append(Row(f"{run.label}: {rec.topic}" if several else rec.topic, cells))
    return Table(
        "table-recommendations",
        "Recommendations",
        ("topic", "recommendation", "evidence"),
        tuple(rows),
        missing=""
        if rows
        else "no recommendations in these runs (a capacity sweep makes them)"
        if any(r.results.capacity is not None for r in runs)
        else NO_CAPACITY,
        numeric=False,
        applies=any(r.results.capacity is not None for r in runs),
    )


def _count_cell(value: Any, bad_if_nonzero: bool = False) -> Cell:
    bad = bad_if_nonzero and isinstance(value, int) and value > 0
    return Cell(_fmt(value, "{:,}"), tone="bad" if bad else "")


def _reconciled_cell(ledger: Ledger) -> Cell:
    if ledger.reconciled is None:
        return Cell("-")
    return Cell("yes", tone="good") if ledger.reconciled else Cell("NO", tone="bad")
