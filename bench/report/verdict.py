"""The conclusion of a run, as its report and the terminal give it: PASSED, FAILED or INCONCLUSIVE, and why.

Apart from :mod:`bench.report.render` so that a command printing its verdict (``bench run``, every gate
replicate) does not import matplotlib and jinja2 for one line of text: that import was about 0.4 s of each
replicate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.results.model import Capacity, FaultEvent, Ledger, Results, Variant

GATE_NAME = "gate.json"


@dataclass(frozen=True)
class _Run:
    folder: Path
    file: Path
    label: str
    results: Results


@dataclass(frozen=True)
class Verdict:
    """One run's conclusion, the first line of the report: PASSED, FAILED or INCONCLUSIVE, and why."""

    label: str  # the run folder's label; empty when the report has one run
    status: str
    tone: str  # "good", "bad" or "warn"
    parts: tuple[str, ...]


def verdict(results: Results | Mapping[str, Any], folder: Path) -> Verdict:
    """The verdict line of a run's report, for a command that prints its conclusion first (the terminal)."""
    model = results if isinstance(results, Results) else Results.model_validate(results)
    return _verdict(_Run(folder, folder / "results.json", folder.name, model), several=False)


def _verdict(run: _Run, several: bool) -> Verdict:
    """What the run's own command would have concluded (its exit status), and the figures it rests on."""
    # A variant that did not run comes first: the rest of the line is about a smaller matrix than was asked for.
    parts: list[tuple[str, bool]] = [(f"{f.variant}: did not run: {f.error}", True) for f in run.results.failures]
    variants = run.results.variants
    ledger = _ledger_verdict(variants)
    if ledger is not None:
        parts.append(ledger)
    parts += _unreadable_verdict(variants)
    parts += _fault_verdict(variants)
    parts += _validation_verdict(variants)
    parts += _truth_verdict(variants)
    parts += _error_verdict(variants)
    if run.results.capacity is not None:
        parts += _capacity_verdict(run.results.capacity)
    gate_part, inconclusive = _gate_verdict(run)
    if gate_part is not None:
        parts.append(gate_part)
    if not parts:
        parts.append(("no variants and no capacity sweep: nothing to judge", True))
    failed = any(bad for _, bad in parts)
    status, tone = ("FAILED", "bad") if failed else ("INCONCLUSIVE", "warn") if inconclusive else ("PASSED", "good")
    return Verdict(run.label if several else "", status, tone, tuple(text for text, _ in parts))


def _outcome(lg: Ledger) -> tuple[tuple[str, int], ...]:
    return (("persisted", lg.persisted), ("rejected", lg.rejected), ("dropped", lg.dropped))


def _ledger_verdict(variants: list[Variant]) -> tuple[str, bool] | None:
    ledgers = [(v.name, v.ledger) for v in variants]
    if not ledgers:
        return None
    bad = [(name, lg) for name, lg in ledgers if lg.reconciled is not True]
    several = len(ledgers) > 1
    if bad:
        texts = []
        unreadable = {v.name: len(v.unreadable_files) for v in variants}
        for name, lg in bad:
            counts = (("lost", lg.lost), ("duplicates", lg.duplicates), ("unexpected", lg.unexpected))
            files = (
                ("unfinalised file(s)", len(lg.unfinalised_files or [])),
                ("unreadable file(s)", unreadable.get(name, 0)),
            )
            messages = ", ".join(f"{_fmt(n)} {k}" for k, n in counts if n)
            left = ", ".join(f"{_fmt(n)} {k}" for k, n in files if n)
            count = _fmt(lg.sent)
            if messages:
                what = f"{messages} of {count} sent" + (f", {left}" if left else "")
            elif left:
                what = f"{left}, {count} sent"
            else:
                what = f"does not add up ({count} sent)"
            texts.append(f"{name + ': ' if several else ''}{what}")
        return "ledger NOT reconciled (" + "; ".join(texts) + ")", True
    # Capacity variants count only the steps the verdict rests on: say so, or the sum reads as the whole sweep.
    scope = ""
    steps = [lg.steps for _, lg in ledgers]
    if all(isinstance(n, int) for n in steps):
        scope = " over the sustainable steps" if len(ledgers) > 1 else f" over {steps[0]} sustainable step(s)"
    sent = {lg.sent for _, lg in ledgers}
    if len(sent) == 1:
        lg = ledgers[0][1]
        where = f" in each of {len(ledgers)} variants" if several else ""
        outcome = ", ".join(f"{_fmt(n)} {k}" for k, n in _outcome(lg) if n or k == "persisted")
        same = all(_outcome(other) == _outcome(lg) for _, other in ledgers)
        detail = f"{_fmt(lg.sent)} sent{where}" + (f" ({outcome}, 0 lost)" if same else ", 0 lost")
    else:
        detail = ", ".join(f"{name} {_fmt(lg.sent)} sent" for name, lg in ledgers) + ", 0 lost"
    return f"ledger reconciled{scope}: {detail}", False


def _unreadable_verdict(variants: list[Variant]) -> list[tuple[str, bool]]:
    """Files the read-back skipped: whatever they held is missing from the ledger, and the run fails for it."""
    out = []
    for v in variants:
        if v.unreadable_files:
            first = v.unreadable_files[0]
            more = f" (and {len(v.unreadable_files) - 1} more)" if len(v.unreadable_files) > 1 else ""
            # The ledger still reconciles when the damage is named by faults the configuration never promised to
            # survive (the runner then annotates each file): a finding, not a failure.
            named = v.ledger.reconciled
            what = "broken by faults it never promised to survive" if named else "could not be read"
            out.append((f"{v.name}: Parquet file(s) {what}, their rows are missing: {first}{more}", not named))
    return out


FAULTS_NAMED_IN_WORDS = 3
"""Faults listed by name in a verdict's words; the rest are counted (the faults table lists every one)."""


def _fault_at(e: FaultEvent) -> str:
    return f"{e.kind} at {e.at_s:,.1f} s"


def _fault_verdict(variants: list[Variant]) -> list[tuple[str, bool]]:
    """In words, per variant: unexplained losses in faults (they fail the run, like any loss), what the faults
    the configuration was not expected to survive named, and a fault the system never came back from."""
    out: list[tuple[str, bool]] = []
    several = len(variants) > 1
    for v in variants:
        events = v.fault_events or []
        if not events:
            continue
        prefix = f"{v.name}: " if several else ""
        losing = [e for e in events if e.lost]
        if losing:
            lost = sum(e.lost or 0 for e in losing)
            listed = ", ".join(f"{_fmt(e.lost)} in {_fault_at(e)}" for e in losing[:FAULTS_NAMED_IN_WORDS])
            rest = len(losing) - FAULTS_NAMED_IN_WORDS
            more = (
                f" and {_fmt(sum(e.lost or 0 for e in losing[FAULTS_NAMED_IN_WORDS:]))} in {rest} more fault(s)"
                if rest > 0
                else ""
            )
            promised = all(not e.expected_loss for e in losing)
            external = v.system is not None and v.system.kind == "external"
            # What a user's own pipeline promised is unknown to the bench: all its losses count.
            why = (
                " (a pipeline of your own: every loss in a fault counts)"
                if external
                else " (faults the configuration promised to survive)"
                if promised
                else ""
            )
            out.append((f"{prefix}{_fmt(lost)} message(s) lost unexplained during faults: {listed}{more}{why}", True))
        named = _named_by_kind(v, [e for e in events if e.expected_loss])
        if sum(named.values()):
            kinds = ", ".join(f"{kind} {_fmt(n)}" for kind, n in named.items() if n)
            count = sum(1 for e in events if e.expected_loss)
            out.append(
                (
                    f"{prefix}{_fmt(sum(named.values()))} loss(es) named by {count} fault(s) the configuration was "
                    f"not expected to survive ({kinds})",
                    False,
                )
            )
        out += [(f"{prefix}{_fault_at(e)}: not back: {e.error}", True) for e in events if e.error]
    return out


def _named_by_kind(v: Variant, events: list[FaultEvent]) -> dict[str, int]:
    """Per kind, what its faults named: their own counts, or the ledger's where one of them was not counted (an
    older file whose ledger named a kind's losses without saying which of its faults did)."""
    out: dict[str, int] = {}
    for kind in dict.fromkeys(e.kind for e in events):
        of_kind = [e for e in events if e.kind == kind]
        if all(e.named is not None for e in of_kind):
            out[kind] = sum(e.named or 0 for e in of_kind)
        else:
            out[kind] = (v.ledger.dropped_by_reason or {}).get(kind, 0)
    return out


def _validation_verdict(variants: list[Variant]) -> list[tuple[str, bool]]:
    out = []
    scored = [(v.name, v.validation) for v in variants if v.validation is not None]
    for name, score in scored:
        prefix = f"{name}: " if len(scored) > 1 else ""
        classes = score.classes
        mismatches = score.mismatches or 0
        injected = sum(row.injected for row in classes.values())
        problems = list(score.problems)
        if mismatches:
            worst = sorted(((truth, row.mismatches) for truth, row in classes.items()), key=lambda kv: (-kv[1], kv[0]))
            named = ", ".join(f"{truth} {n:,}" for truth, n in worst if n)
            out.append((f"{prefix}validation: {mismatches:,} mismatch(es) between truth and decision ({named})", True))
            # The run lists the mismatches as its first problem: the rest are checks of what was persisted.
            problems = problems[1:]
        elif not problems:
            out.append(
                (
                    f"{prefix}validation: 0 mismatches between truth and decision over {injected:,} messages in "
                    f"{len(classes)} classes",
                    False,
                )
            )
        out += [(f"{prefix}validation: {problem}", True) for problem in problems]
    return out


def _truth_verdict(variants: list[Variant]) -> list[tuple[str, bool]]:
    """An external system judged by truth label: bad input left out (not lost), and the findings (bad input
    stored, good input refused), which fail nothing: the bench cannot know the system's policy."""
    out = []
    judged = [v for v in variants if v.truth is not None]
    for v in judged:
        prefix = f"{v.name}: " if len(judged) > 1 else ""
        left_out = v.ledger.not_persisted_expected or 0
        if left_out:
            out.append((f"{prefix}{_fmt(left_out)} not persisted as their truth label allows (not lost)", False))
        out += [(f"{prefix}{finding}", False) for finding in v.truth.findings] if v.truth is not None else []
    return out


def _error_verdict(variants: list[Variant]) -> list[tuple[str, bool]]:
    """Pipeline errors other than validation's (those are in its own part) fail the run as the command does."""
    out = []
    for v in variants:
        errors = [e for e in (v.pipeline.errors if v.pipeline else []) if not e.startswith("validation: ")]
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            out.append((f"{v.name}: pipeline error: {errors[0]}{more}", True))
    return out


def _capacity_verdict(capacity: Capacity) -> list[tuple[str, bool]]:
    """Per worker count: sustainable rate and knee; fails as `bench capacity` does (no sustainable step at the
    first worker count, a loss or an error in a step the verdict rests on)."""
    out = []
    for i, sr in enumerate(capacity.series):
        who = _workers_text(sr.workers)
        sus = _number(sr.sustainable_per_s)
        kx, ky = (_number(sr.knee.offered_per_s), _number(sr.knee.p99_ms)) if sr.knee else (None, None)
        knee_text = (
            f"knee at {kx:,.0f} msg/s (p99 {ky:,.0f} ms)" if kx is not None and ky is not None else "no knee found"
        )
        if sus is None:
            out.append((f"{who}: no sustainable step, {knee_text}", i == 0))
        else:
            out.append((f"{who}: sustainable {sus:,.0f} msg/s, {knee_text}", False))
        lost = sum(st.lost or 0 for st in sr.steps if st.sustainable)
        if lost:
            out.append((f"{who}: {lost:,} message(s) lost in sustainable steps", True))
        errors = [e for st in sr.steps for e in st.errors]
        if errors:
            out.append((f"{who}: step error: {errors[0]}", True))
    return out


def _workers_text(workers: int) -> str:
    return f"{workers} worker{'' if workers == 1 else 's'}"


def _gate_verdict(run: _Run) -> tuple[tuple[str, bool] | None, bool]:
    """The gate's outcome when the run is one of a gate's replicates (gate.json beside it or one folder up)."""
    for folder in (run.folder, run.folder.parent):
        path = folder / GATE_NAME
        if not path.is_file():
            continue
        try:
            gate = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return (f"{path} is unreadable: gate outcome unknown", True), False
        if not isinstance(gate, dict):
            return (f"{path} is not a gate result: gate outcome unknown", True), False
        # As bench.gate.runner.outcome_label reads it (results from before "inconclusive" know only failed).
        outcome = gate.get("outcome") or ("failed" if gate.get("failed") else "passed")
        where = "" if folder == run.folder else f" ({path})"
        if outcome == "failed":
            reasons = [str(r) for r in gate.get("reasons") or []]
            return (f"gate FAILED{where}" + (f": {reasons[0]}" if reasons else ""), True), False
        if outcome == "inconclusive":
            why = [str(r) for r in gate.get("inconclusive") or []]
            return (f"gate INCONCLUSIVE{where}" + (f": {why[0]}" if why else ""), False), True
        return (f"gate passed{where}", False), False
    return None, False


def _fmt(value: Any, fmt: str = "{:,}") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
