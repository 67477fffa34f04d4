"""``bench load``'s command line: its parser, progress display and summary table.

Building the parser must not import locust, the pipeline and the simulators (a second of start-up that
``bench validate`` would pay): :mod:`bench.load.runner` is imported only when the command runs."""

from __future__ import annotations

import argparse
import math
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.cli.args import broker_url, count, positive_int

if TYPE_CHECKING:
    from bench.harness.progress import LoadProgress
    from bench.load.runner import LoadOptions, LoadOutcome
    from bench.results.model import Results, SystemPart
    from bench.scenario import LoadedScenario


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench load`` to the CLI's subcommands."""
    p = sub.add_parser(
        "load",
        help="run a scenario with locust (master + N worker processes) as the load engine",
        description="Replay a scenario's stream with locust (a local master and N worker processes) into the "
        "pipeline under test (the built-in one, or the scenario's system.kind external), then read back and "
        "reconcile the ledger. Locust's response time is the publish "
        "acknowledgement; end-to-end latency comes from the read-back. See docs/load.md.",
    )
    p.add_argument("scenario", type=Path, help="scenario YAML file (transport mqtt or opcua)")
    p.add_argument(
        "--workers",
        type=count,
        default=2,
        metavar="N",
        help="locust worker processes on this machine (default 2)",
    )
    p.add_argument(
        "--remote-workers",
        type=count,
        default=0,
        metavar="K",
        help="also wait for K workers started by hand on other machines (see docs/load.md)",
    )
    p.add_argument(
        "--master-bind",
        metavar="HOST[:PORT]",
        help="where the locust master listens (default 127.0.0.1 on a free port; 0.0.0.0:5557 with remote workers)",
    )
    p.add_argument(
        "--users",
        type=positive_int,
        metavar="U",
        help="locust users over all workers (default 4 per worker, "
        "at most one per machine); each publishes whole machines",
    )
    p.add_argument("--out", type=Path, help="run folder (default reports/<scenario>-load-<UTC time>/)")
    p.add_argument(
        "--messages",
        type=positive_int,
        metavar="N",
        help="send exactly N messages (rates kept, phases stretched)",
    )
    p.add_argument(
        "--broker",
        type=broker_url,
        metavar="URL",
        help="use this broker instead of the scenario's (e.g. mqtt://127.0.0.1:1883)",
    )
    p.add_argument("--variant", metavar="NAME", help="pipeline settings of this matrix variant (default: the base)")
    p.add_argument("--quiet", action="store_true", help="no progress display, only the summary")


def command(args: argparse.Namespace) -> int:
    """Run ``bench load``; returns the exit code (1: the run failed its checks). Raises BenchError for bad input."""
    from rich.console import Console

    from bench.load.runner import (
        DEFAULT_MASTER_PORT,
        LOCUST_HTML,
        LOCUSTFILE,
        USER_CLASS,
        LoadOptions,
        pick_variant,
        run_load,
    )
    from bench.scenario import load_scenario

    loaded = load_scenario(args.scenario)
    options = LoadOptions(
        workers=args.workers,
        users=getattr(args, "users", None),
        out=args.out,
        messages=args.messages,
        broker=args.broker,
        variant=getattr(args, "variant", None),
        remote_workers=getattr(args, "remote_workers", 0),
        master_bind=getattr(args, "master_bind", None),
    )
    out = Console() if sys.stdout.isatty() else Console(width=200)
    err = Console(stderr=True)
    if options.remote_workers:
        _, sc = pick_variant(loaded, options.variant)
        host, port = options.bind()
        where = socket.gethostname() if host in ("0.0.0.0", "*", "::") else host
        print(
            f"bench load: waiting for {options.remote_workers} remote worker(s); on each load machine run:\n"
            f"  locust -f {LOCUSTFILE} {USER_CLASS.get(sc.transport.kind, '')} --worker "
            f"--master-host {where} --master-port {port or DEFAULT_MASTER_PORT}",
            file=sys.stderr,
        )
    if args.quiet:
        outcome = run_load(loaded, options)
    elif err.is_terminal:
        outcome = _run_with_bar(loaded, options, err)
    else:
        outcome = run_load(loaded, options, on_progress=_line_printer(err))
    from bench.cli.report_step import write_report_or_warn

    report = write_report_or_warn(outcome.run_dir, err)
    out.print(summary_table(outcome.results))
    out.print(f"run folder: {outcome.run_dir}")
    out.print(f"results: {outcome.run_dir / 'results.json'}" + (f"\nreport: {report}" if report else ""))
    out.print(f"locust report: {outcome.run_dir / LOCUST_HTML}")
    if not outcome.ok:
        err.print("bench: FAILED: the load run did not pass its checks", style="bold red")
        for problem in [*outcome.ledger.problems(), *outcome.problems]:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    return 0


def _info(p: LoadProgress) -> str:
    when = f"{p.elapsed_s:6.1f}s" if p.elapsed_s >= 0 else "   -  "
    # An external system's buffer is out of the bench's sight (backlog -1): its output is all there is.
    backlog = f"  not yet durable {p.backlog:,}" if p.backlog >= 0 else ""
    return (
        f"{when} {p.stage:<26} locust requests {p.locust_requests:,}  received {p.received:,}/{p.planned:,}  "
        f"persisted {p.persisted:,}  rejected {p.rejected:,}{backlog}"
    )


def _run_with_bar(loaded: LoadedScenario, options: LoadOptions, console: Any) -> LoadOutcome:
    from bench.cli.display import progress_bar
    from bench.load.runner import run_load

    with progress_bar(console, "received") as bar:

        def update(p: LoadProgress) -> None:
            bar(p.planned, min(p.received, p.planned), _info(p))

        return run_load(loaded, options, on_progress=update)


def _line_printer(console: Any, every_s: float = 5.0) -> Callable[[LoadProgress], None]:
    """Without a terminal (CI logs): a status line every few seconds, and one per stage."""
    last_t, last_stage = [-math.inf], [""]

    def update(p: LoadProgress) -> None:
        now = time.monotonic()
        if p.stage != last_stage[0] or now - last_t[0] >= every_s:
            last_t[0], last_stage[0] = now, p.stage
            console.print(_info(p), markup=False, highlight=False, soft_wrap=True)

    return update


def summary_table(results: Results) -> Any:
    """The end-of-run table: the ledger, the bench's throughput and latency, and locust's own figures."""
    from rich.table import Table

    from bench.results.model import LatencySummary

    v = results.variants[0]
    load, led = v.load, v.ledger
    if load is None:
        raise ValueError(f"results of run {results.run_id} hold no load section: not a `bench load` run")
    loc = load.locust.by_type.get(load.locust.sends or "", load.locust)
    e2e = v.latency_ms.end_to_end or LatencySummary(count=0)
    lag = v.latency_ms.send_lag or LatencySummary(count=0)
    table = Table(title=f"{results.scenario.name}: load run {results.run_id}")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def ms(value: Any) -> str:
        return "-" if value is None else f"{value:,.1f}"

    coverage = load.coverage
    rows = [
        ("ledger", "[green]reconciled[/]" if led.reconciled else "[red]NOT reconciled[/]"),
        ("locust master + workers", f"1 + {load.workers} ({load.users} {load.user_class} users)"),
        ("  of which on other machines", f"{load.remote_workers}"),
        ("  sent", f"{led.sent:,}"),
        ("  persisted", f"{led.persisted:,}"),
        ("  rejected", f"{led.rejected:,}"),
        ("  dropped", f"{led.dropped:,}"),
        *(
            # An external system that drops bad input without a trace: set aside from lost by truth label.
            [
                (
                    "  not persisted, as truth label allows",
                    _by_truth(led.not_persisted_expected, led.not_persisted_by_truth),
                )
            ]
            if led.not_persisted_expected is not None
            else []
        ),
        ("  lost", f"{led.lost:,}"),
        (
            "  not published / failed / twice",
            f"{coverage.not_published} / {coverage.failed} / {coverage.published_twice}",
        ),
        ("offered msg/s", f"{v.throughput.offered_per_s:,.1f}"),
        ("sent msg/s", f"{v.throughput.sent_per_s:,.1f}"),
        ("persisted msg/s", ms(v.throughput.persisted_per_s)),
        (
            "end-to-end p50 / p99 / max ms",
            " / ".join(ms(x) for x in (e2e.p50, e2e.p99, e2e.max)) + _resolution(v.system),
        ),
        *_system_rows(v.system),
        ("send lag p50 / p99 ms", " / ".join(ms(x) for x in (lag.p50, lag.p99))),
        (f"locust {load.locust.sends or 'requests'} (failures)", f"{loc.requests:,} ({loc.failures:,})"),
        ("  locust requests/s (over the whole test)", ms(loc.requests_per_s)),
        (
            "  locust response ms p50 / p95 / p99 / max",
            " / ".join(ms(x) for x in (loc.median_ms, loc.p95_ms, loc.p99_ms, loc.max_ms)),
        ),
    ]
    for label, value in rows:
        table.add_row(label, value)
    table.caption = "locust response time = publish acknowledgement (PUBACK / Write response), not end-to-end"
    return table


def _resolution(system: SystemPart | None) -> str:
    """How an external system's durable times were known: beside the latency, so a watched figure is not read as
    finer than its polling interval."""
    if system is None or system.durable_from is None:
        return ""
    if system.durable_from == "column":
        return " (its durable_at column)"
    return f" (watched every {system.durable_resolution_ms or 0:,.0f} ms)"


def _system_rows(system: SystemPart | None) -> list[tuple[str, str]]:
    """An external system's process tree: starts, CPU and memory (null for one the bench attached to)."""
    if system is None or system.kind != "external":
        return []
    codes = ", ".join("-" if c is None else str(c) for c in system.exit_codes) or "-"
    every = f" (sampled every {system.resources_every_s:g} s)" if system.resources_every_s else ""
    return [
        ("external system starts (exit codes)", f"{system.starts} ({codes})"),
        ("  CPU s / 1k msgs (CPU s)", f"{_fmt(system.cpu_s_per_1k, '{:,.3f}')} ({_fmt(system.cpu_s, '{:,.2f}')})"),
        ("  peak RSS MB", _fmt(system.peak_rss_mb, "{:,.0f}") + every),
    ]


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _by_truth(total: int, by_truth: dict[str, int] | None) -> str:
    """'47 (nan 34, malformed_json 13)': a count and its split by truth label, largest first."""
    parts = sorted((by_truth or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    return f"{total:,}" + (" (" + ", ".join(f"{k} {n:,}" for k, n in parts) + ")" if parts else "")
