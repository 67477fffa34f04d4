"""The ``bench`` command: run, load, capacity, calibrate, gate, compare, report, validate, schema.

Exit codes: 0 success; 1 the run failed its checks (e.g. the ledger does not
reconcile) or a service could not be reached; 2 bad input (scenario file or
command-line value); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bench.cli.args import broker_url, int_list, positive_int, positive_seconds, rate_list
from bench.cli.display import progress_bar
from bench.cli.load import register as register_load
from bench.errors import BenchError, UsageError
from bench.results.metrics import GATE_METRICS, METRIC_ROWS, parquet_flush_triggers
from bench.scenario import json_schema, load_scenario

if TYPE_CHECKING:
    from bench.harness import runner
    from bench.harness.progress import Progress as RunProgress
    from bench.results.model import LatencySummary, Results


def _fraction(text: str) -> float:
    try:
        value = float(text.removesuffix("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.2 or 20%, got {text!r}") from None
    if not 0 < value < 10:
        raise argparse.ArgumentTypeError(f"expected a positive fraction such as 0.2 or 20%, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="Test bench for industrial-IoT ingestion pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a scenario end to end and reconcile its ledger")
    p_run.add_argument("scenario", type=Path, help="scenario YAML file")
    p_run.add_argument("--out", type=Path, help="run folder (default reports/<scenario>-<UTC time>/)")
    p_run.add_argument(
        "--messages",
        type=positive_int,
        metavar="N",
        help="send exactly N messages (rates kept, phases stretched)",
    )
    p_run.add_argument("--duration", type=positive_seconds, metavar="S", help="stretch the phases to S seconds in all")
    p_run.add_argument(
        "--broker",
        type=broker_url,
        metavar="URL",
        help="use this broker instead of the scenario's (e.g. mqtt://127.0.0.1:1883)",
    )
    p_run.add_argument(
        "--sql-url", metavar="URL", help="SQL sink URL for every variant, e.g. '${BENCH_SQL_URL}' (no passwords here)"
    )
    p_run.add_argument("--quiet", action="store_true", help="no progress display, only the summary")
    p_run.add_argument("--json", action="store_true", help="print results.json to stdout instead of the table")
    p_cap = sub.add_parser(
        "capacity", help="step the offered rate until the pipeline cannot keep up: sustainable throughput, knee, USL"
    )
    p_cap.add_argument("scenario", type=Path, help="scenario YAML file with a capacity: section")
    p_cap.add_argument("--out", type=Path, help="run folder (default reports/<scenario>-capacity-<UTC time>/)")
    p_cap.add_argument(
        "--broker", type=broker_url, metavar="URL", help="broker instead of the scenario's, e.g. mqtt://127.0.0.1:1883"
    )
    p_cap.add_argument("--workers", type=int_list, metavar="N[,N...]", help="pipeline worker counts, e.g. 1,2")
    p_cap.add_argument("--rates", type=rate_list, metavar="R[,R...]", help="offered rates of the steps (msg/s)")
    p_cap.add_argument("--step", type=positive_seconds, metavar="S", help="duration of each step, e.g. 10s")
    p_cap.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help="a bench calibrate result (calibration.json or its folder): the publishers' ceiling, to plan "
        "publisher processes and flag generator-limited steps (default: none, send lag only)",
    )
    p_cap.add_argument("--quiet", action="store_true", help="no progress display, only the summary")
    p_cap.add_argument("--json", action="store_true", help="print results.json to stdout instead of the tables")
    p_rep = sub.add_parser("report", help="write report.html (self-contained) and summary.md from run folders")
    p_rep.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders (or their results.json)")
    p_rep.add_argument(
        "--out",
        type=Path,
        help="folder for report.html and summary.md (default: the run's own folder for one run; "
        "a new reports/compare-<UTC time>/ for several)",
    )
    p_rep.add_argument(
        "--markdown", action="store_true", help="print summary.md to stdout (e.g. >> $GITHUB_STEP_SUMMARY)"
    )
    p_gate = sub.add_parser(
        "gate", help="fail on a significant slowdown beyond tolerance, lost data or a broken service level"
    )
    p_gate.add_argument("scenario", type=Path, help="scenario YAML file (its gates: section says what is judged)")
    p_gate.add_argument(
        "--baseline",
        metavar="REF",
        help="self (A/A), a git revision (e.g. main), python:/path/to/python (another install), "
        "or a folder written by --save-baseline; for system.kind external a revision (or git:REV) is one of "
        "the repository holding system.external.cwd",
    )
    p_gate.add_argument(
        "--baseline-command",
        metavar="CMD",
        help="system.kind external: the baseline runs this command instead of system.external.command "
        "(split like the scenario's command string; with --baseline REV, inside that revision)",
    )
    p_gate.add_argument("--replicates", type=positive_int, metavar="N", help="A/B pairs (default: the scenario's)")
    p_gate.add_argument(
        "--inject-slowdown",
        type=_fraction,
        metavar="F",
        help="make the candidate's storage F slower in wall time (0.2 = 20%%): seen by flush_mean_ms, not by the "
        "CPU-time metrics; for a slower code change use --candidate-patch",
    )
    p_gate.add_argument(
        "--candidate-patch",
        type=Path,
        metavar="FILE",
        help="judge --baseline REV with FILE applied (in a temporary worktree) as the candidate, as CI would",
    )
    p_gate.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the bootstrap intervals")
    p_gate.add_argument("--confidence", type=_fraction, metavar="C", help="override gates.confidence, e.g. 0.999")
    p_gate.add_argument("--save-baseline", type=Path, metavar="DIR", help="keep the candidate's runs as a baseline")
    p_gate.add_argument("--out", type=Path, help="gate folder (default reports/<scenario>-gate-<UTC time>/)")
    p_gate.add_argument("--markdown", action="store_true", help="print the Markdown summary instead of the table")
    p_gate.add_argument("--json", action="store_true", help="print gate.json instead of the table")
    p_exp = sub.add_parser(
        "gate-experiment", help="measure the gate itself: false alarms (A/A) and detection of real slower patches"
    )
    p_exp.add_argument("scenario", type=Path, help="scenario YAML file with a gates: section, e.g. scenarios/gate.yaml")
    p_exp.add_argument("--trials", type=positive_int, default=10, metavar="N", help="gates per condition (default 10)")
    p_exp.add_argument(
        "--patches",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="candidate patches, one condition each; aa-* ones measure false alarms "
        "(default: scenarios/gate-patches/aa-comment, sink-cpu-10, validator-cpu-10)",
    )
    p_exp.add_argument("--base", default="HEAD", metavar="REV", help="revision the patches apply to (default HEAD)")
    p_exp.add_argument("--replicates", type=positive_int, metavar="N", help="A/B pairs per gate (default: scenario's)")
    p_exp.add_argument("--out", type=Path, help="folder (default reports/<scenario>-gate-experiment-<UTC time>/)")
    p_cmp = sub.add_parser("compare", help="per metric: change with a confidence interval and a verdict")
    p_cmp.add_argument("a", type=Path, help="baseline: a run folder, results.json, or a folder of run folders")
    p_cmp.add_argument("b", type=Path, help="candidate: the same kinds")
    p_cmp.add_argument("--confidence", type=_fraction, default=0.90, metavar="C", help="default 0.90")
    p_cmp.add_argument("--tolerance", type=_fraction, default=0.05, metavar="T", help="default 0.05 (5%%)")
    p_cmp.add_argument("--markdown", action="store_true", help="print Markdown (for a PR comment or job summary)")
    p_cmp.add_argument("--json", action="store_true", help="print JSON")
    p_cmp.add_argument(
        "--allow-different-scenarios", action="store_true", help="compare runs of different scenarios anyway"
    )
    p_val = sub.add_parser("validate", help="check a scenario file without running it")
    p_val.add_argument("scenario", type=Path, nargs="+")
    p_schema = sub.add_parser("schema", help="print the scenario JSON Schema (for editor completion)")
    p_schema.add_argument(
        "--results", action="store_true", help="print the JSON Schema of results.json instead (for other tools)"
    )
    register_load(sub)
    p_cal = sub.add_parser(
        "calibrate",
        help="the bench's own publisher and pipeline process against bare paho loops: the generator's ceiling",
        description="Measure, side by side and interleaved (A B A B), the bench's publisher process against a bare "
        "paho publish loop (QoS 0 and 1), the pipeline worker process against a bare subscriber, and the "
        "pipeline's chain in process against json.loads; writes calibration.json (the generator's ceiling per "
        "process, for bench capacity --calibration). See docs/calibrate.md.",
    )
    p_cal.add_argument(
        "--broker",
        type=broker_url,
        metavar="URL",
        help="broker to measure through (default: a Mosquitto the bench starts on a free port; without "
        "mosquitto installed, the embedded broker)",
    )
    p_cal.add_argument(
        "--messages", type=positive_int, metavar="N", help="messages per measurement (default 20,000; --quick 5,000)"
    )
    p_cal.add_argument(
        "--repeats", type=positive_int, metavar="N", help="A B repetitions per row (default 3; --quick 1)"
    )
    p_cal.add_argument("--out", type=Path, help="run folder (default reports/calibrate-<UTC time>/)")
    p_cal.add_argument("--quick", action="store_true", help="5,000 messages, 1 repetition: a rough look in seconds")
    p_cal.add_argument("--json", action="store_true", help="print calibration.json instead of the table")
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("gate", "gate-experiment") and threading.current_thread() is threading.main_thread():
        # A CI job cancelled with SIGTERM: unwind like Ctrl-C, so the git worktrees and worker processes of the
        # gate are removed instead of left behind.
        signal.signal(signal.SIGTERM, _interrupt)
    # Without a terminal rich assumes 80 columns and wraps the side-by-side table; logs can be wider.
    out = Console() if sys.stdout.isatty() else Console(width=200)
    err = Console(stderr=True)
    try:
        if args.command == "schema":
            if args.results:
                from bench.results.model import results_json_schema

                return _print_schema(results_json_schema())
            return _print_schema(json_schema())
        if args.command == "validate":
            for path in args.scenario:
                loaded = load_scenario(path)
                out.print(f"{path}: ok ({loaded.scenario.name}, {len(loaded.scenario.phases)} phases)")
            return 0
        if args.command == "load":
            from bench.cli import load

            return load.command(args)
        if args.command == "gate":
            return _gate(args, out, err)
        if args.command == "gate-experiment":
            return _experiment(args, err)
        if args.command == "compare":
            return _compare(args, out, err)
        if args.command == "capacity":
            return _capacity(args, out, err)
        if args.command == "calibrate":
            return _calibrate(args, out, err)
        if args.command == "report":
            from bench.report.render import write_report

            paths = write_report(args.runs, args.out)
            if args.markdown:
                print(paths.markdown.read_text(encoding="utf-8"), end="")
            else:
                out.print(f"report: {paths.html}\nsummary: {paths.markdown}")
            return 0
        return _run(args, out, err)
    except BenchError as exc:
        # Plain print: rich would wrap a long path across lines.
        print(f"bench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("bench: interrupted")
        return 130


def _print_schema(schema: dict[str, Any]) -> int:
    """Print a JSON Schema; a reader that stops early (``bench schema | head``) is not an error."""
    try:
        print(json.dumps(schema, indent=2), flush=True)
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit: point stdout at nothing first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _run(args: argparse.Namespace, out: Console, err: Console) -> int:
    from bench.harness import runner  # the pipeline, pyarrow, the simulators: only for commands that run

    loaded = load_scenario(args.scenario)
    if args.broker is not None and not args.broker.startswith(("mqtt://", "tcp://")):
        raise UsageError(f"--broker: expected a URL like mqtt://127.0.0.1:1883, got {args.broker!r}")
    options = runner.RunOptions(
        out=args.out,
        messages=args.messages,
        duration_s=args.duration,
        broker=args.broker,
        sql_url=args.sql_url,
        # Gate replicates skip the probe-overhead calibration: it is the same every replicate and costs a second.
        calibrate=os.environ.get("BENCH_NO_CALIBRATE") != "1",
    )
    show = not args.quiet and not args.json
    if show and err.is_terminal:
        outcome = _run_with_bar(loaded, options, err)
    else:
        outcome = runner.run(loaded, options, on_progress=_line_printer(err) if show else None)
    report = _auto_report(outcome.run_dir, err)
    if args.json:
        print(json.dumps(outcome.results.to_json(), indent=2))
    else:
        out.print(_verdict_line(outcome.results, outcome.run_dir))
        out.print(summary_table(outcome.results))
        for line in shape_lines(outcome.results):
            out.print(line, highlight=False, soft_wrap=True)
        scored = validation_table(outcome.results)
        if scored is not None:
            out.print(scored)
        out.print(f"results: {outcome.run_dir / 'results.json'}" + (f"\nreport: {report}" if report else ""))
    first = outcome.results.variants[0] if outcome.results.variants else None
    # The probes' cost inside the built-in pipeline: nothing to say about a system of the user's own.
    external = first is not None and first.system is not None and first.system.kind == "external"
    overhead = first.probes.overhead if first is not None and not external else None
    if overhead is not None and not args.json:
        out.print(
            f"probe overhead: {overhead.ns_per_put_on - overhead.ns_per_put_off:,.0f} ns per put, "
            f"{overhead.overhead_pct_of_message}% of a message's decode + validate + put "
            f"({overhead.overhead_pct}% of the put alone); measured in this run, probes on vs off"
        )
    if not outcome.ok:
        err.print("bench: FAILED: the run did not pass its checks", style="bold red")
        for problem in outcome.problems():
            print(f"  - {problem}", file=sys.stderr)
        return 1
    return 0


def _gate(args: argparse.Namespace, out: Console, err: Console) -> int:
    from bench.gate import runner as gate
    from bench.harness import runner

    loaded = load_scenario(args.scenario)
    if args.baseline is None and args.baseline_command is not None:
        args.baseline = "self"  # the candidate's pipeline at its own revision, with the other command
    if args.baseline is None:
        if args.save_baseline is None:
            raise UsageError("bench gate: expected --baseline REF (self, a git revision, python:PATH or a folder)")
        path = gate.baseline_only(loaded, args.save_baseline, args.replicates)
        out.print(f"baseline saved: {path}")
        return 0
    if args.confidence is not None and not 0.5 < args.confidence < 1:
        raise UsageError(f"--confidence: expected a level between 0.5 and 1, e.g. 0.9, got {args.confidence}")
    quiet = args.json or args.markdown
    if args.candidate_patch is not None:
        if loaded.scenario.system.kind == "external":
            raise UsageError(
                "--candidate-patch: patches the bench's own repository; for system.kind external gate your "
                "pipeline's working tree against --baseline REV, or a command against --baseline-command"
            )
        if args.inject_slowdown is not None or args.save_baseline is not None:
            raise UsageError("--candidate-patch: cannot be combined with --inject-slowdown or --save-baseline")
        folder = args.out or runner.make_run_dir(f"{loaded.scenario.name}-patch-gate", None, Path("reports"))
        if not quiet:
            err.print(f"gating {args.candidate_patch} on {args.baseline} against {args.baseline}, from a worktree")
        outcome = gate.run_patched_gate(
            loaded.path,
            args.candidate_patch,
            base=args.baseline,
            out=folder,
            replicates=args.replicates,
            confidence=args.confidence,
            seed=args.seed,
        )
    else:
        options = gate.GateOptions(
            baseline=args.baseline,
            out=args.out,
            replicates=args.replicates,
            inject_slowdown=args.inject_slowdown,
            confidence=args.confidence,
            save_baseline=args.save_baseline,
            seed=args.seed,
            baseline_command=args.baseline_command,
        )

        def progress(rep: gate.Replicate, total: int) -> None:
            if not quiet and rep.variant.system is not None and rep.variant.system.kind == "external":
                cpu = GATE_METRICS["system_cpu_s_per_1k"].value(rep.variant)
                p99 = GATE_METRICS["e2e_p99_ms"].value(rep.variant)
                err.print(
                    f"replicate {rep.side}{rep.index + 1:02d} ({rep.seconds:.1f} s): system CPU "
                    + ("-" if cpu is None else f"{cpu:.3f} s/1k msgs")
                    + ", e2e p99 "
                    + ("-" if p99 is None else f"{p99:,.1f} ms")
                    + ("" if rep.exit_code == 0 else f" [red]exit {rep.exit_code}[/]"),
                    highlight=False,
                    soft_wrap=True,
                )
            elif not quiet:
                hot = GATE_METRICS["hot_path_cpu_us"].value(rep.variant)
                sink = GATE_METRICS["sink_cpu_us_per_row"].value(rep.variant)
                err.print(
                    f"replicate {rep.side}{rep.index + 1:02d} ({rep.seconds:.1f} s): hot path "
                    + ("-" if hot is None else f"{hot:.2f} us/msg")
                    + ", sink "
                    + ("-" if sink is None else f"{sink:.2f} us/row")
                    + (f", reference {rep.reference_ms:.1f} ms" if rep.reference_ms else "")
                    + ("" if rep.exit_code == 0 else f" [red]exit {rep.exit_code}[/]"),
                    highlight=False,
                    soft_wrap=True,
                )

        outcome = gate.run_gate(loaded, options, on_replicate=progress)
    return _verdict(outcome.result, outcome.gate_dir, args, out, err)


def _verdict(result: dict[str, Any], folder: Path | None, args: argparse.Namespace, out: Console, err: Console) -> int:
    """Print a gate's or a comparison's verdict; exit 0 passed, 1 failed, 3 inconclusive (docs/gates.md)."""
    from bench.gate import runner as gate

    quiet = args.json or args.markdown
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.markdown:
        print(gate.markdown(result), end="")
    else:
        out.print(gate_table(result))
        if folder is not None:
            out.print(f"gate: {folder / 'gate.json'}\nsummary: {folder / 'summary.md'}")
    label = gate.outcome_label(result)
    for warning in result.get("warnings", []):
        err.print(f"bench: warning: {warning}", style="yellow")
    if label == "FAILED":
        err.print(f"bench: {result['kind']} FAILED", style="bold red")
        for reason in result["reasons"]:
            print(f"  - {reason}", file=sys.stderr)
        return gate.EXIT_CODES["failed"]
    if label == "INCONCLUSIVE":
        err.print(f"bench: {result['kind']} INCONCLUSIVE: neither passed nor failed", style="bold yellow")
        for reason in result.get("inconclusive", []):
            print(f"  - {reason}", file=sys.stderr)
        return gate.EXIT_CODES["inconclusive"]
    if not quiet:
        err.print(f"bench: {result['kind']} passed", style="bold green")
    return 0


def _experiment(args: argparse.Namespace, err: Console) -> int:
    from bench.gate import runner as gate

    loaded = load_scenario(args.scenario)
    patches = args.patches or [gate.PATCH_FOLDER / name for name in gate.DEFAULT_PATCHES]
    for patch in patches:
        if not Path(patch).is_file():
            raise UsageError(f"--patches: {patch}: no such file (run from the repository root, or give paths)")

    def progress(condition: str, trial: int, outcome: Any) -> None:
        colour = {"failed": "red", "inconclusive": "yellow"}.get(outcome.outcome, "green")
        err.print(f"trial {trial + 1}/{args.trials} {condition}: [{colour}]{outcome.outcome}[/]", highlight=False)

    folder = gate.run_experiment(
        loaded,
        trials=args.trials,
        patches=[Path(p) for p in patches],
        base=args.base,
        replicates=args.replicates,
        out=args.out,
        on_gate=progress,
    )
    print((folder / "experiment.md").read_text(encoding="utf-8"), end="")
    print(f"experiment: {folder / 'experiment.json'}")
    return 0


def _compare(args: argparse.Namespace, out: Console, err: Console) -> int:
    from bench.gate import runner as gate

    result = gate.compare(
        args.a,
        args.b,
        confidence=args.confidence,
        tolerance=args.tolerance,
        allow_different_scenarios=args.allow_different_scenarios,
    )
    return _verdict(result, None, args, out, err)


def gate_table(result: dict[str, Any]) -> Table:
    """Per metric: medians, change with its interval, Holm p, tolerance, verdict; counters below."""
    from bench.gate.runner import outcome_label

    head = outcome_label(result)
    title = f"{result['kind']} {result['scenario']['name']}: {result['design']} — {head}"
    table = Table(title=title, caption=result["multiple_comparisons"])
    for name in ("metric", "A median", "B median", "change", "CI", "p (Holm)", "tol.", "verdict"):
        table.add_column(name, justify="left" if name in ("metric", "verdict", "CI") else "right")
    for row in result["metrics"]:
        if "change" not in row:
            table.add_row(row["metric"], "-", "-", "-", "-", "-", "-", row["verdict"])
            continue
        p = row.get("p_holm")
        colour = {"worse": "red", "better": "green"}.get(row["verdict"].split(" ")[0], "")
        verdict = f"[{colour}]{row['verdict']}[/]" if colour else row["verdict"]
        table.add_row(
            row["metric"] + ("" if row["gated"] else " (not gated)"),
            f"{row['a_median']:,.3f}",
            f"{row['b_median']:,.3f}",
            f"{row['change']:+.1%}" if row["change"] == row["change"] else "-",
            "-" if row["ci"][0] != row["ci"][0] else f"{row['ci'][0]:+.1%} .. {row['ci'][1]:+.1%}",
            "-" if p is None else f"{p:.4f}",
            f"{row['tolerance']:.0%}",
            verdict,
        )
    for c in result["counters"]:
        check = {True: "[green]ok[/]", False: "[red]FAILED[/]", None: "-"}[c["ok"]]
        if c.get("applicable") is False:
            check = "not applicable"
        known_a = [v for v in c["a"] if v is not None]
        known_b = [v for v in c["b"] if v is not None]
        table.add_row(
            f"counter {c['counter']}",
            f"{statistics.median(known_a):,.0f}" if known_a else "-",
            f"{statistics.median(known_b):,.0f}" if known_b else "-",
            "",
            "",
            "",
            "exact" if c["tolerance"] == 0 else ("-" if c["tolerance"] is None else f"{c['tolerance']:.0%}"),
            check,
        )
    for bnd in result.get("bounds", []):
        table.add_row(
            f"bound {bnd['metric']}",
            "",
            f"{bnd['worst']:,.1f}" if bnd["worst"] is not None else "-",
            "",
            "",
            "",
            f"<= {bnd['bound']:g}",
            "[green]ok[/]" if bnd["ok"] else "[red]FAILED[/]",
        )
    return table


def _verdict_line(results: Results, run_dir: Path) -> Text:
    """The run's conclusion, first, as its report gives it: PASSED / FAILED / INCONCLUSIVE and the figures."""
    from bench.report.verdict import verdict

    v = verdict(results, run_dir)
    style = {"good": "bold green", "bad": "bold red"}.get(v.tone, "bold yellow")
    return Text.assemble((v.status, style), ": ", "; ".join(v.parts))


def _auto_report(run_dir: Path, err: Console) -> Path | None:
    """The report a run writes into its folder, unless BENCH_NO_REPORT=1 (gate replicates: hundreds of runs,
    nobody reads their reports; an env var, so older versions that lack it simply ignore it)."""
    if os.environ.get("BENCH_NO_REPORT") == "1":
        return None
    from bench.cli.report_step import write_report_or_warn

    return write_report_or_warn(run_dir, err)


def _capacity(args: argparse.Namespace, out: Console, err: Console) -> int:
    from bench.capacity import sweep as capacity

    loaded = load_scenario(args.scenario)
    options = capacity.CapacityOptions(
        out=args.out,
        broker=args.broker,
        workers=args.workers,
        rates=args.rates,
        step_s=args.step,
        calibration=args.calibration,
    )
    plan = capacity.generator_plan(loaded, options)
    if plan is not None and plan["warning"]:
        err.print(f"bench: warning: {plan['warning']}", style="yellow", highlight=False, soft_wrap=True)
    show = not args.quiet and not args.json
    outcome = capacity.run_capacity(loaded, options, on_progress=_capacity_printer(err) if show else None)
    report = _auto_report(outcome.run_dir, err)
    if args.json:
        print(json.dumps(outcome.results.to_json(), indent=2))
    else:
        for table in capacity_tables(outcome.results):
            out.print(table)
        for line in capacity_lines(outcome.results):
            out.print(line)
        out.print(f"results: {outcome.run_dir / 'results.json'}" + (f"\nreport: {report}" if report else ""))
    if not outcome.ok:
        err.print("bench: FAILED: the capacity run did not pass its checks", style="bold red")
        for problem in outcome.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    return 0


def _calibrate(args: argparse.Namespace, out: Console, err: Console) -> int:
    from bench.calibrate import runner as calibrate

    options = calibrate.CalibrateOptions(
        broker=args.broker, messages=args.messages, repeats=args.repeats, out=args.out, quick=args.quick
    )

    def progress(p: calibrate.Progress) -> None:
        if not args.json:
            err.print(f"[{p.index}/{p.total}] {p.what}: {p.text}", markup=False, highlight=False, soft_wrap=True)

    def warning(text: str) -> None:
        err.print(f"bench: warning: {text}", style="yellow", soft_wrap=True)

    outcome = calibrate.run_calibrate(options, on_progress=progress, on_warning=warning)
    if args.json:
        print(outcome.calibration.model_dump_json(indent=2))
        return 0
    out.print(calibration_table(outcome.calibration))
    ceiling = outcome.calibration.generator_ceiling_per_s
    if ceiling:
        out.print(
            "generator ceiling per publisher process: "
            + ", ".join(f"QoS {q} {v:,.0f} msg/s" for q, v in sorted(ceiling.items()))
            + " (bench capacity --calibration uses it)"
        )
    out.print(f"calibration: {outcome.run_dir / 'calibration.json'}")
    return 0


def calibration_table(cal: Any) -> Table:
    """``bench calibrate``'s table: per row the bench's median, the bare floor's, their ratio and the spreads."""
    m = cal.machine
    table = Table(
        title=f"bench calibrate: {cal.messages:,} msgs x {cal.repeats} (A B interleaved, medians), broker {cal.broker}"
    )
    table.caption = (
        f"{m.cores} cores, Python {m.python}, paho {m.paho}, payload {cal.payload_bytes_mean:g} B; load "
        + ("-" if not m.load_before else f"{m.load_before[0]:.2f}")
        + " before, "
        + ("-" if not m.load_after else f"{m.load_after[0]:.2f}")
        + " after"
    )
    for name in ("row", "unit", "bench", "bare", "ratio", "spread bench (min-max)", "spread bare (min-max)"):
        table.add_column(name, justify="left" if name in ("row", "unit") else "right")
    for r in cal.rows:
        fmt = "{:,.0f}" if r.unit == "msg/s" else "{:,.2f}" if r.unit == "us/msg" else "{:,.1f}"
        table.add_row(
            r.label,
            r.unit,
            fmt.format(r.bench.median),
            fmt.format(r.bare.median),
            f"{r.ratio:.2f}x",
            f"{fmt.format(r.bench.min)}-{fmt.format(r.bench.max)}",
            f"{fmt.format(r.bare.min)}-{fmt.format(r.bare.max)}",
        )
    return table


def _capacity_printer(console: Console, every_s: float = 2.0) -> Any:
    """A status line every few seconds and one per finished step (works in a terminal and in CI logs)."""
    last = [-every_s]

    def update(p: Any) -> None:
        done = p.phase not in ("send", "drain")
        if not done and p.elapsed_s - last[0] < every_s and p.elapsed_s >= last[0]:
            return
        last[0] = -every_s if done else p.elapsed_s
        where = f"workers={p.workers} step {p.step + 1}/{p.steps} offered {p.offered_per_s:,.0f} msg/s"
        if done:
            console.print(f"{where}: [bold]{p.phase}[/]", highlight=False, soft_wrap=True)
        else:
            console.print(
                f"{where} {p.phase} {p.elapsed_s:5.1f}/{p.step_s:g}s sent {p.sent:,} durable {p.durable:,} "
                f"backlog {max(0, p.sent - p.durable):,}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    return update


def _num(value: float | None, fmt: str) -> str:
    """A figure of a capacity step, or "-" where the step lacks it."""
    return "-" if value is None else fmt.format(value)


def _p50(summary: LatencySummary | None) -> float:
    """A step's p50; 0 where it has none (no samples in the window)."""
    return 0 if summary is None or summary.p50 is None else summary.p50


def _p99(summary: LatencySummary | None) -> float:
    """A step's p99; 0 where it has none (no samples in the window)."""
    return 0 if summary is None or summary.p99 is None else summary.p99


def capacity_tables(results: Results) -> list[Table]:
    """One table per worker count: the steps side by side with the evidence behind each verdict."""
    tables = []
    systems = {v.config.workers: v.system for v in results.variants}
    for sr in results.capacity.series if results.capacity is not None else []:
        system = systems.get(sr.workers)
        external = system is not None and system.kind == "external"
        who = "the external system" if external else f"{sr.workers} pipeline worker(s)"
        table = Table(title=f"capacity, {who}: {sr.stopped}")
        notes = [f"limit: {sr.limit}"] if sr.limit else []
        if external and system is not None:
            # A watched latency is no finer than the polling: say so beside the figures.
            notes.append(
                "end-to-end to its durable-time column"
                if system.durable_from == "column"
                else f"end-to-end by watching its output every {system.durable_resolution_ms or 0:g} ms"
            )
        if any(s.generator_limited for s in sr.steps) and results.capacity is not None:
            gen = results.capacity.generator
            ceiling = f" {gen.combined_ceiling_per_s:,.0f} msg/s" if gen is not None else ""
            notes.append(f"[yellow]*[/] generator-limited: offered past the publishers' calibrated ceiling{ceiling}")
        if notes:
            table.caption = "; ".join(notes)
        cols = [
            "offered/s",
            "sent/s",
            "send lag p99 ms",
            "persisted/s",
            "achieved",
            "backlog slope/s",
            "backlog end",
            "e2e p50 ms",
            "e2e p99 ms",
            "flush p99 ms",
            "lock wait p99 ms",
            "CPU %",
            "RSS MB",
            "lost",
            "verdict",
        ]
        for c in cols:
            table.add_column(c, justify="left" if c == "verdict" else "right")
        for s in sr.steps:
            e2e = s.latency_ms.end_to_end if s.latency_ms is not None else None
            colour = {"sustainable": "green", "unsustainable": "red"}.get(s.verdict or "", "yellow")
            # A mark on the offered rate, said in the caption: the table already fills a log 200 columns wide.
            flag = " [yellow]*[/]" if s.generator_limited else ""
            table.add_row(
                f"{s.offered_per_s:,.0f}{flag}",
                _num(s.sent_per_s, "{:,.0f}"),
                _num(s.send_lag_p99_ms, "{:,.0f}"),
                _num(s.persisted_per_s, "{:,.0f}"),
                _num(s.achieved_ratio, "{:.3f}"),
                _num(s.backlog_slope_per_s, "{:,.1f}"),
                _num(s.backlog_end, "{:,}"),
                f"{_p50(e2e):,.1f}",
                f"{_p99(e2e):,.1f}",
                "-" if s.flush_ms is None else f"{_p99(s.flush_ms):,.1f}",
                "-" if s.lock_wait_ms is None else f"{_p99(s.lock_wait_ms):,.3f}",
                _num(s.cpu_pct, "{:,.0f}"),
                _num(s.rss_mb, "{:,.0f}"),
                _num(s.lost, "{:,}"),
                f"[{colour}]{s.verdict}[/]",
            )
        tables.append(table)
    from bench.capacity.display import scaling_table

    summary = scaling_table(results.capacity)
    return tables + ([summary] if summary is not None else [])


def capacity_lines(results: Results) -> list[str]:
    cap = results.capacity
    if cap is None:
        return []
    lines = []
    for sr in cap.series:
        sus = sr.sustainable_per_s
        knee = sr.knee
        lines.append(
            f"workers={sr.workers}: sustainable throughput "
            + (f"[bold]{sus:,.0f} msg/s[/]" if sus else "[red]none found[/]")
            + f" (achieved >= {_num(cap.threshold, '{:.0%}')} of offered, backlog not growing); peak achieved "
            + f"{sr.peak_per_s or 0:,.0f} msg/s; knee "
            + (f"at {knee.offered_per_s:,.0f} msg/s (p99 {knee.p99_ms:,.0f} ms)" if knee else "not reached")
        )
    fit = cap.usl
    if fit:
        peak = f"{fit.peak_per_s:,.0f} msg/s" if fit.peak_per_s else "none"
        lines.append(
            f"USL fit: lambda {fit.lambda_:,.0f} msg/s, sigma {fit.sigma:.4f}, kappa {fit.kappa:.5f}; "
            f"predicted peak ({fit.peak_kind}) {peak}" + (f" [dim]({fit.note})[/]" if fit.note else "")
        )
    from bench.capacity.display import scaling_lines

    lines += scaling_lines(cap)
    for r in cap.recommendations:
        lines.append(f"advice ({r.topic}): {r.text} [dim]— {r.evidence}[/]")
    gen = cap.generator
    if gen is not None:
        flagged = [f"{s.offered_per_s:,.0f}" for sr in cap.series for s in sr.steps if s.generator_limited]
        lines.append(
            f"generator: {gen.publishers} publisher process(es) x {gen.ceiling_per_process_per_s:,.0f} msg/s "
            f"(calibrated, QoS {gen.qos}) = {gen.combined_ceiling_per_s:,.0f} msg/s; the highest offered rate "
            f"{gen.highest_offered_per_s:,.0f} msg/s needs {gen.needed_publishers or '-'} at "
            f"{gen.headroom:.0%} of the ceiling"
            + (f"; [yellow]generator-limited steps: {', '.join(flagged)} msg/s[/]" if flagged else "")
            + (f" [yellow]({gen.warning})[/]" if gen.warning else "")
        )
    return lines


def _info(p: RunProgress) -> str:
    which = f"{p.variant} ({p.variant_index + 1}/{p.variants}) " if p.variants > 1 else ""
    return (
        f"{which}{p.phase:<6} persisted {p.persisted:,}  rejected {p.rejected:,}  "
        f"{p.send_rate:,.0f} msg/s  not yet durable {p.backlog:,}  publisher lag {p.lag_s * 1000:,.0f} ms"
    )


def _run_with_bar(loaded: Any, options: runner.RunOptions, console: Console) -> runner.RunOutcome:
    from bench.harness import runner

    with progress_bar(console, "sent") as bar:

        def update(p: RunProgress) -> None:
            bar(p.planned * p.variants, p.planned * p.variant_index + p.sent, _info(p))

        return runner.run(loaded, options, on_progress=update)


def _line_printer(console: Console, every_s: float = 5.0) -> Any:
    """Without a terminal (CI logs), a plain status line every few seconds."""
    last = [-every_s, -1.0]

    def update(p: RunProgress) -> None:
        if p.variant_index != last[1]:
            last[:] = [-every_s, p.variant_index]
        if p.elapsed_s - last[0] >= every_s:
            last[0] = p.elapsed_s
            console.print(
                f"{p.elapsed_s:6.1f}s sent {p.sent:,}/{p.planned:,} {_info(p)}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    return update


def _cell(value: Any, fmt: str, base: Any, ratio: bool) -> str:
    if value is None:
        return "-"
    text = fmt.format(value)
    if ratio and isinstance(base, int | float) and base and isinstance(value, int | float):
        r = value / base
        # Below 0.1 a ratio reads better as "1/N" than as x0.00.
        text += f" [dim](x{r:,.2f})[/]" if r >= 0.1 or r == 0 else f" [dim](1/{1 / r:,.0f})[/]"
    return text


def summary_table(results: Results) -> Table:
    """The end-of-run table, one column per variant; ratios are to the first variant."""
    variants = results.variants
    table = Table(title=f"{results.scenario.name}: run {results.run_id}")
    table.add_column("metric")
    for variant in variants:
        table.add_column(variant.name, justify="right")
    table.add_row(
        "ledger",
        *["[green]reconciled[/]" if v.ledger.reconciled else "[red]NOT reconciled[/]" for v in variants],
    )
    for row in METRIC_ROWS:
        values = [row.value(v) for v in variants]
        if all(v is None for v in values):
            continue
        base = values[0]
        table.add_row(row.label, *[_cell(val, row.fmt, base, row.ratio and i > 0) for i, val in enumerate(values)])
    if all((v.system is not None and v.system.kind == "external") or _shape_of(v) for v in variants):
        return table  # the built-in pipeline's flush counts: an external system or another shape has none (not 0)
    flush_counts = [
        "/".join(str(stats.count if stats is not None else 0) for stats in parquet_flush_triggers(v)) for v in variants
    ]
    table.add_row("flushes size/timeout/shutdown", *flush_counts)
    coalesced = [
        str(sum(stats.coalesced or 0 for stats in parquet_flush_triggers(v) if stats is not None)) for v in variants
    ]
    table.add_row("coalesced triggers", *coalesced)
    return table


def _shape_of(v: Any) -> str | None:
    """Which other pipeline shape (bench/shapes/) a variant ran, if any."""
    return next((name for name in ("recompute", "forward", "windows") if getattr(v, name, None) is not None), None)


def shape_lines(results: Results) -> list[str]:
    """Each other shape's own figures, in words (its module says them)."""
    import importlib

    lines: list[str] = []
    for name in dict.fromkeys(n for v in results.variants if (n := _shape_of(v))):
        module = importlib.import_module(f"bench.shapes.{name}")
        say = getattr(module, "summary_lines", None)
        if say is not None:
            lines.extend(say(results.variants))
    return lines


def validation_table(results: Results) -> Table | None:
    """Truth against decision per anomaly class (first variant with a score), or None without anomalies."""
    variant = next((v for v in results.variants if v.validation is not None), None)
    if variant is None or variant.validation is None:
        return None
    score = variant.validation
    title = f"validation ({variant.name}): {score.mismatches:,} mismatch(es) between truth and decision"
    table = Table(title=title)
    for name, justify in (("class (truth)", "left"), ("injected", "right"), ("expected", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("decisions", justify="left")
    table.add_column("mismatches", justify="right")
    for truth, row in score.classes.items():
        expected = ", ".join(f"{k} {n:,}" for k, n in row.expected.items())
        decided = ", ".join(f"{k} {n:,}" for k, n in sorted(row.decisions.items(), key=lambda kv: -kv[1]))
        bad = row.mismatches
        table.add_row(truth, f"{row.injected:,}", expected, decided, f"[red]{bad:,}[/]" if bad else "0")
    checks = score.output_checks
    read_back = (
        ""
        if checks is None
        else f"read back: {checks.rows_read_back:,} rows; NaN/inf {checks.non_finite_values}, "
        f"files with naive timestamps {checks.files_with_naive_timestamps}, "
        f"beyond the future tolerance {checks.beyond_future_tolerance}; "
    )
    table.caption = read_back + f"quarantine rows {score.quarantine_rows or 0:,}"
    return table


if __name__ == "__main__":
    sys.exit(main())
