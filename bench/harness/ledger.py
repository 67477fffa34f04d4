"""The ledger: every message sent is persisted, rejected with a reason, dropped by a named policy, or lost.

An external system that keeps no trace of what it refuses adds one more place a message can be: not persisted,
as its truth label says it should not be (:func:`set_aside_expected`); only a message that should have been
stored and is found nowhere is lost.

``persisted`` and ``rejected`` are read back from the files the sinks wrote,
never taken from the pipeline's counters: a counter can say 1,000 while a
file holds 999.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MISSING_SAMPLE = 20
UNFINALISED = ("*.tmp", "*.arrows.partial")
"""Files a writer had not finished: a naive writer's footer-less Parquet, a crash-safe sink's journal."""
ERROR_CHARS = 160
"""An unreadable file's error, cut to this: enough to tell a torn footer from a missing column."""
# pyarrow's own prefix of an open error; the path is given beside the error already.
_OPEN_PREFIX = "Could not open Parquet input source"


@dataclass(frozen=True)
class ReadBack:
    """What the sinks' files hold."""

    persisted_seqs: list[int]
    persisted_batches: list[int]
    rejected_seqs: list[int | None]
    rejected_reasons: list[str]
    files: int
    unfinalised: list[str]
    dropped_seqs: list[int | None] = field(default_factory=list)
    dropped_reasons: list[str] = field(default_factory=list)
    anonymous_payloads: list[bytes] = field(default_factory=list)
    """Payloads of quarantined rows without a readable seq (malformed JSON, invalid UTF-8, oversize, a seq
    named twice: duplicate_key)."""
    unreadable: list[str] = field(default_factory=list)
    """``path: error`` of each Parquet file pyarrow could not read (a torn footer, not Parquet at all): skipped,
    so its rows are missing, and named so the ledger says why."""


@dataclass(frozen=True)
class Ledger:
    sent: int
    persisted: int
    rejected: int
    dropped: int
    lost: int
    duplicates: int
    unexpected: int
    missing_seq_sample: list[int]
    by_reason: dict[str, int] = field(default_factory=dict)
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    unfinalised_files: list[str] = field(default_factory=list)
    redelivered: int = 0
    """Extra copies the transport delivered (QoS 1) that the validator quarantined as duplicates."""
    quarantine_rows: int = 0
    """Rows in the quarantine files: rejected + redelivered + unexpected ones there."""
    unreadable_files: list[str] = field(default_factory=list)
    """``path: error`` of Parquet files that could not be read. Whatever they held is missing from the counts,
    so the ledger cannot reconcile while there is one, even when the sum happens to add up."""
    not_persisted_expected: int | None = None
    """External systems: sends found nowhere whose truth label says they should not be stored (bad input a
    pipeline may drop without a trace); None for the built-in pipeline, whose decisions are scored instead."""
    not_persisted_by_truth: dict[str, int] | None = None

    @property
    def reconciled(self) -> bool:
        return (
            self.lost == 0
            and self.duplicates == 0
            and self.unexpected == 0
            and not self.unfinalised_files
            and not self.unreadable_files
            and self.sent
            == self.persisted + self.rejected + self.dropped + self.lost + (self.not_persisted_expected or 0)
        )

    def problems(self) -> list[str]:
        out = []
        if self.lost:
            sample = ", ".join(map(str, self.missing_seq_sample))
            out.append(f"{self.lost} message(s) lost; missing seq ids include: {sample}")
        if self.duplicates:
            out.append(f"{self.duplicates} message(s) persisted more than once")
        if self.unexpected:
            out.append(f"{self.unexpected} persisted row(s) with a seq id that was never sent")
        if self.unfinalised_files:
            out.append(f"files left unfinalised: {', '.join(self.unfinalised_files)}")
        if self.unreadable_files:
            out.append(f"Parquet files that could not be read (skipped): {'; '.join(self.unreadable_files)}")
        return out

    def to_json(self) -> dict[str, Any]:
        """results.json's ``ledger``. The unreadable files are left out: results.json keeps them on the variant
        (``unreadable_files``), beside the ledger, since they are about the output rather than the accounting;
        ``reconciled`` still counts them."""
        data = asdict(self)
        del data["unreadable_files"]
        if self.not_persisted_expected is None:  # the built-in pipeline: nothing set aside, nothing to say
            del data["not_persisted_expected"], data["not_persisted_by_truth"]
        data["reconciled"] = self.reconciled
        return data


def set_aside_expected(ledger: Ledger, by_truth: dict[str, int], still_missing: Iterable[int]) -> Ledger:
    """``ledger`` with the sends ``by_truth`` counts (found nowhere, their truth label saying they should not be
    stored) moved from lost to ``not_persisted_expected``; ``still_missing`` are the seqs left lost.

    Never more than was lost: the two counts come from the same read-back, and a disagreement must leave a loss
    showing rather than hide one.
    """
    moved = min(sum(by_truth.values()), ledger.lost)
    return replace(
        ledger,
        lost=ledger.lost - moved,
        not_persisted_expected=moved,
        not_persisted_by_truth={t: n for t, n in sorted(by_truth.items()) if n},
        missing_seq_sample=sorted(still_missing)[:MISSING_SAMPLE],
    )


def payload_key(payload: bytes) -> bytes:
    """How a quarantined payload is matched to what was sent: a digest of its stored prefix."""
    # The quarantine keeps at most 4 KiB of an oversize payload.
    return hashlib.blake2b(payload[:4096], digest_size=12).digest()


@dataclass
class _Files:
    """What one folder's Parquet files hold, and the files that could not be read."""

    values: dict[str, list[Any]]
    files: int = 0
    unfinalised: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    anonymous_payloads: list[bytes] = field(default_factory=list)


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith(_OPEN_PREFIX):
        text = text.partition("': ")[2] or text
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def _read_files(folder: Path, columns: Sequence[str], *, anonymous_payloads: bool = False) -> _Files:
    """Read ``columns`` of every Parquet file under ``folder``; a file pyarrow cannot read is skipped and named.

    With ``anonymous_payloads``, a file's quarantined rows without a seq also give their payloads, read with
    its columns so that a file counts wholly or not at all (the payloads pair with the null seqs in order).
    """
    out = _Files({c: [] for c in columns})
    if not folder.exists():
        return out
    # A crash-safe sink's journal left by a pipeline that never restarted holds durable rows not yet in a
    # Parquet file: unfinalised, not lost.
    out.unfinalised = sorted(str(p) for pattern in UNFINALISED for p in folder.rglob(pattern))
    # rglob: the dataset strategy nests files in machine=/date= folders.
    for path in sorted(folder.rglob("*.parquet")):
        try:
            table: pa.Table = pq.read_table(path, columns=list(columns))
            payloads: list[bytes] = []
            if anonymous_payloads and table.column("seq").null_count:
                quarantined = pq.read_table(path, columns=["seq", "payload"])
                payloads = quarantined.filter(pc.is_null(quarantined.column("seq"))).column("payload").to_pylist()
        except (pa.ArrowException, OSError) as exc:
            # A torn or foreign file must not end the run without results: what it held counts as missing,
            # and the ledger names the file so the loss is not a mystery.
            out.unreadable.append(f"{path}: {_short_error(exc)}")
            continue
        for c in columns:
            out.values[c].extend(table.column(c).to_pylist())
        out.anonymous_payloads.extend(payloads)
        out.files += 1
    return out


def read_back(data_dir: Path, quarantine_dir: Path, dropped_dir: Path | None = None) -> ReadBack:
    data = _read_files(data_dir, ["seq", "batch_id"])
    rej = _read_files(quarantine_dir, ["seq", "reason"], anonymous_payloads=True)
    drops = _Files({"seq": [], "reason": []})
    if dropped_dir is not None:
        drops = _read_files(dropped_dir, ["seq", "reason"])
    return ReadBack(
        dropped_seqs=drops.values["seq"],
        dropped_reasons=drops.values["reason"],
        persisted_seqs=data.values["seq"],
        persisted_batches=data.values["batch_id"],
        rejected_seqs=rej.values["seq"],
        rejected_reasons=rej.values["reason"],
        files=data.files + rej.files,
        unfinalised=data.unfinalised + rej.unfinalised,
        anonymous_payloads=rej.anonymous_payloads,
        unreadable=data.unreadable + rej.unreadable + drops.unreadable,
    )


def durable_rows(back: ReadBack, flushes: Iterable[Any]) -> Iterator[tuple[int, int]]:
    """(seq, durable_ns) per persisted row: the time the Parquet flush that wrote its batch became durable.

    ``flushes`` are the run's :class:`pipeline.model.FlushStat` records; rows of a batch without a record
    (none expected) are left out. A seq persisted twice yields twice, as it was read back.
    """
    durable_by_batch = {f.batch_id: f.durable_ns for f in flushes if f.sink == "parquet"}
    for seq, batch in zip(back.persisted_seqs, back.persisted_batches, strict=True):
        if batch in durable_by_batch:
            yield seq, durable_by_batch[batch]


def resolve_anonymous(back: ReadBack, sent_payloads: dict[bytes, int]) -> list[int | None]:
    """The quarantine's seq column with anonymous rows matched to what was sent, where the payload says."""
    payloads = iter(back.anonymous_payloads)
    out: list[int | None] = []
    for seq in back.rejected_seqs:
        if seq is None:
            out.append(sent_payloads.get(payload_key(next(payloads))))
        else:
            out.append(seq)
    return out


def reconcile(
    sent_seqs: Iterable[int],
    back: ReadBack,
    dropped: dict[int, str] | None = None,
    *,
    copies: Counter[int] | None = None,
    sent_payloads: dict[bytes, int] | None = None,
) -> Ledger:
    """Account for every send.

    A seq is sent once, plus ``copies`` (a scenario's ``duplicate`` anomaly
    sends a message twice on purpose). Per seq, persisted, rejected and dropped
    rows are counted up to the number of sends; what is missing is lost, a
    persisted row beyond the sends is a duplicate (a problem), and a rejected
    row beyond them is a redelivery the validator caught. Quarantined rows with
    no readable seq are matched by payload (``sent_payloads``); any left
    unmatched still count as rejected, so ``lost`` is right in total.
    """
    if dropped is None:
        dropped = {s: r for s, r in zip(back.dropped_seqs, back.dropped_reasons, strict=True) if s is not None}
    copies = copies or Counter()
    sends = Counter(sent_seqs)
    sends.update({s: c for s, c in copies.items() if s in sends})
    persisted_counts = Counter(back.persisted_seqs)
    rejected_seqs = resolve_anonymous(back, sent_payloads) if sent_payloads else back.rejected_seqs
    rejected_counts = Counter(s for s in rejected_seqs if s is not None)
    unmatched_anonymous = sum(1 for s in rejected_seqs if s is None)
    persisted = rejected = dropped_n = duplicates = redelivered = 0
    dropped_reasons: Counter[str] = Counter()
    missing: list[int] = []
    for seq, n in sends.items():
        p = min(persisted_counts.get(seq, 0), n)
        r = min(rejected_counts.get(seq, 0), n - p)
        d = 1 if seq in dropped and p + r < n else 0
        persisted, rejected, dropped_n = persisted + p, rejected + r, dropped_n + d
        if d:
            dropped_reasons[dropped[seq]] += 1
        duplicates += max(0, persisted_counts.get(seq, 0) - n)
        redelivered += max(0, rejected_counts.get(seq, 0) - r)
        if p + r + d < n:
            missing.append(seq)
    unexpected = sum(1 for s in persisted_counts if s not in sends) + sum(1 for s in rejected_counts if s not in sends)
    # More anonymous rows than missing sends: foreign or corrupt traffic nobody can vouch for.
    unexpected += max(0, unmatched_anonymous - (total_sends := sum(sends.values())) + persisted + rejected + dropped_n)
    total = total_sends
    lost_by_seq = total - persisted - rejected - dropped_n
    # Anonymous rows no payload matched: rejected for sure, but which seq is unknown.
    anonymous = min(unmatched_anonymous, lost_by_seq)
    return Ledger(
        sent=total,
        persisted=persisted,
        rejected=rejected + anonymous,
        dropped=dropped_n,
        lost=lost_by_seq - anonymous,
        duplicates=duplicates,
        unexpected=unexpected,
        # Ids found nowhere, including those anonymous rejections may stand for.
        missing_seq_sample=sorted(missing)[:MISSING_SAMPLE],
        by_reason=dict(Counter(back.rejected_reasons)),
        dropped_by_reason=dict(dropped_reasons),
        unfinalised_files=back.unfinalised,
        redelivered=redelivered,
        quarantine_rows=len(back.rejected_seqs),
        unreadable_files=back.unreadable,
    )


def attribute_queue_overflow(
    sent_seqs: Iterable[int], back: ReadBack, machine_of: Callable[[int], str]
) -> dict[int, str]:
    """Missing ids that an OPC UA server's discard-oldest queue dropped, as {seq: reason}.

    The server keeps a bounded FIFO queue per monitored item and, when full,
    discards the oldest value (asyncua does so without setting the overflow
    bit). The evidence is in the data: a value of a machine is missing while a
    *later* value of the same machine arrived. Such ids are dropped by that named
    policy; ids missing with nothing later from their machine stay unexplained
    (lost).
    """
    received = set(back.persisted_seqs) | {s for s in back.rejected_seqs if s is not None}
    latest: dict[str, int] = {}
    for seq in received:
        machine = machine_of(seq)
        if seq > latest.get(machine, -1):
            latest[machine] = seq
    return {
        seq: "opcua_queue_overflow"
        for seq in sent_seqs
        if seq not in received and seq < latest.get(machine_of(seq), -1)
    }


def attribute_outage(
    sent_seqs: Iterable[int],
    back: ReadBack,
    *,
    intended_ns: Sequence[int],
    stopped_at_ns: Sequence[int],
    resumed_at_ns: Sequence[int],
    publishing_s: float,
) -> dict[int, str]:
    """Missing ids sent while the OPC UA server was down or the subscription not yet back.

    The window of each outage runs from two publishing intervals before the
    server stopped (values queued but not yet published die with it) to the
    first notification after the client reconnected (or the run's end).
    """
    received = set(back.persisted_seqs) | {s for s in back.rejected_seqs if s is not None}
    margin = int(2 * publishing_s * 1e9)
    windows = []
    for start in stopped_at_ns:
        end = next((r for r in resumed_at_ns if r > start), None)
        windows.append((start - margin, end if end is not None else 2**63 - 1))
    return {
        seq: "server_outage"
        for seq in sent_seqs
        if seq not in received and any(a <= intended_ns[seq] <= b for a, b in windows)
    }
