"""The terminal's read-out of a capacity sweep's scaling: one row per worker count, the generator's ceiling beside.

``bench capacity`` prints it after the step tables (bench/cli); the HTML report has the same figures in its
capacity summary table (bench/report/render.py).
"""

from __future__ import annotations

from rich.table import Table

from bench.results.model import Capacity, CapacityScaling

LIMIT_WORDS = {
    "pipeline": "pipeline CPU",
    "cores": "cores",
    "generator": "load generator",
    "publishers": "publishers",
    "broker": "broker",
    "unknown": "cannot tell",
}
"""A series' limit, as the table's short cell says it (the step table's caption has the whole line)."""


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def scaling_table(capacity: Capacity | None) -> Table | None:
    """Sustained throughput, its ratio to one worker's, the generator's ceiling and where the CPU went at the
    first failing step, per worker count; None for results without the read-out (older files)."""
    scaling: CapacityScaling | None = capacity.scaling if capacity is not None else None
    if scaling is None or not scaling.rows:
        return None
    table = Table(title=f"capacity by worker count ({scaling.cores or '?'} cores)")
    columns = (
        "workers",
        "sustained msg/s",
        "x 1 worker",
        "peak msg/s",
        "generator ceiling msg/s",
        "first failing msg/s",
        "workers CPU %",
        "publishers CPU %",
        "broker CPU %",
        "bench CPU %",
        "other CPU %",
        "machine % of all cores",
        "limit",
    )
    for c in columns:
        table.add_column(c, justify="left" if c == "limit" else "right")
    for r in scaling.rows:
        cpu = r.cpu
        table.add_row(
            str(r.workers),
            _num(r.sustainable_per_s, "{:,.0f}"),
            _num(r.vs_one_worker, "{:.2f}x"),
            _num(r.peak_per_s, "{:,.0f}"),
            _num(r.generator_ceiling_per_s, "{:,.0f}"),
            _num(r.limit_offered_per_s, "{:,.0f}"),
            _num(cpu.workers_pct if cpu else None, "{:,.0f}"),
            _num(cpu.publishers_pct if cpu else None, "{:,.0f}"),
            _num(cpu.broker_pct if cpu else None, "{:,.0f}"),
            _num(cpu.bench_pct if cpu else None, "{:,.0f}"),
            _num(cpu.other_pct if cpu else None, "{:,.0f}"),
            _num(cpu.machine_pct if cpu else None, "{:,.0f}"),
            "none reached" if r.limit_kind is None else LIMIT_WORDS.get(r.limit_kind, r.limit_kind),
        )
    notes = [
        "CPU % at the first failing step, 100 = one core; other = the machine's busy CPU less the sweep's; broker: "
        + (scaling.broker_process or "not measured (it runs elsewhere)")
    ]
    if scaling.generator_ceiling_per_s is None:
        notes.append("generator ceiling: pass --calibration (bench calibrate) to see it")
    else:
        notes.append("generator ceiling: the publishers' calibrated combined ceiling (bench calibrate)")
    table.caption = "; ".join(notes)
    return table


def scaling_lines(capacity: Capacity | None) -> list[str]:
    """The growth from one worker and why it stops, in words (nothing below two worker counts)."""
    scaling = capacity.scaling if capacity is not None else None
    if scaling is None:
        return []
    return [f"scaling: {text}" for text in (scaling.growth, scaling.statement) if text]
