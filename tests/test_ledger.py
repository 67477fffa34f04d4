"""Tests for bench/harness/ledger.py: every sent seq is persisted, rejected, dropped or lost."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

from bench.harness.ledger import MISSING_SAMPLE, ReadBack, payload_key, read_back, reconcile
from pipeline.model import Reading, Rejection
from pipeline.parquet_sink import ParquetSink, QuarantineSink

BASE_NS = 1_699_999_980 * 10**9  # start of a 60 s window


def back(
    persisted: list[int],
    rejected: list[int | None] | None = None,
    reasons: list[str] | None = None,
    unfinalised: list[str] | None = None,
) -> ReadBack:
    rejected = rejected or []
    return ReadBack(
        persisted_seqs=persisted,
        persisted_batches=[1] * len(persisted),
        rejected_seqs=rejected,
        rejected_reasons=reasons if reasons is not None else ["wrong_type"] * len(rejected),
        files=1,
        unfinalised=unfinalised or [],
    )


# --- reconcile on constructed read-backs -------------------------------------


def test_all_persisted_reconciles() -> None:
    ledger = reconcile(range(100), back(list(range(100))))
    assert (ledger.sent, ledger.persisted, ledger.rejected, ledger.dropped, ledger.lost) == (100, 100, 0, 0, 0)
    assert (ledger.duplicates, ledger.unexpected, ledger.missing_seq_sample) == (0, 0, [])
    assert ledger.reconciled
    assert ledger.problems() == []
    assert ledger.to_json()["reconciled"] is True


def test_missing_ids_are_lost_with_sorted_capped_sample() -> None:
    rng = random.Random(3)
    missing = set(rng.sample(range(1000), 35))
    kept = [s for s in range(1000) if s not in missing]
    rng.shuffle(kept)  # file order must not matter
    ledger = reconcile(range(1000), back(kept))
    assert ledger.lost == 35
    assert ledger.persisted == 965
    assert len(ledger.missing_seq_sample) == MISSING_SAMPLE
    assert ledger.missing_seq_sample == sorted(missing)[:MISSING_SAMPLE]
    assert not ledger.reconciled
    assert ledger.problems()[0].startswith("35 message(s) lost")
    assert ledger.to_json()["reconciled"] is False


def test_few_missing_ids_listed_completely() -> None:
    ledger = reconcile(range(10), back([0, 1, 2, 4, 5, 6, 8, 9]))
    assert (ledger.lost, ledger.missing_seq_sample) == (2, [3, 7])


def test_duplicates_counted_and_not_reconciled() -> None:
    persisted = [*range(10), 5, 5, 6]  # seq 5 three times, 6 twice
    ledger = reconcile(range(10), back(persisted))
    assert ledger.duplicates == 3
    assert (ledger.persisted, ledger.lost) == (10, 0)  # a seq counts as persisted once
    assert not ledger.reconciled
    assert any("more than once" in p for p in ledger.problems())


def test_a_second_rejection_of_one_send_is_a_redelivery() -> None:
    """The transport delivered seq 9 twice (QoS 1) and both copies were quarantined: counted, not lost, not a dup."""
    ledger = reconcile(range(10), back(list(range(8)), rejected=[8, 9, 9]))
    assert (ledger.rejected, ledger.redelivered, ledger.duplicates, ledger.quarantine_rows) == (2, 1, 0, 3)
    assert ledger.reconciled


def test_intended_copies_are_sends_of_their_own() -> None:
    """A duplicate sent on purpose: one copy persisted and one quarantined account for both sends."""
    ledger = reconcile(range(3), back([0, 1, 2], rejected=[1], reasons=["duplicate"]), copies=Counter({1: 1}))
    assert (ledger.sent, ledger.persisted, ledger.rejected, ledger.lost) == (4, 3, 1, 0)
    assert ledger.reconciled
    missing = reconcile(range(3), back([0, 1, 2]), copies=Counter({1: 1}))
    assert (missing.lost, missing.missing_seq_sample) == (1, [1])


def test_anonymous_rejections_are_matched_by_payload() -> None:
    sent = {payload_key(b"{broken 7"): 7}
    data = back(list(range(7)), rejected=[None], reasons=["malformed_json"])
    data = replace(data, anonymous_payloads=[b"{broken 7"])
    ledger = reconcile(range(8), data, sent_payloads=sent)
    assert (ledger.rejected, ledger.lost, ledger.missing_seq_sample) == (1, 0, [])


def test_unexpected_seqs() -> None:
    ledger = reconcile(range(10), back([*range(10), 1000, 1001]))
    assert ledger.unexpected == 2
    assert ledger.persisted == 10  # the strays are not counted as persisted
    assert not ledger.reconciled
    assert any("never sent" in p for p in ledger.problems())


def test_quarantined_seq_that_was_never_sent_is_unexpected() -> None:
    """Foreign traffic on a shared topic shows up even when the pipeline rejected it."""
    ledger = reconcile(range(3), back([0, 1, 2], rejected=[99], reasons=["wrong_type"]))
    assert ledger.unexpected == 1
    assert not ledger.reconciled


def test_rejected_with_seq() -> None:
    ledger = reconcile(
        range(10), back(list(range(7)), rejected=[7, 8, 9], reasons=["wrong_type", "wrong_type", "bad_timestamp"])
    )
    assert (ledger.persisted, ledger.rejected, ledger.lost) == (7, 3, 0)
    assert ledger.by_reason == {"wrong_type": 2, "bad_timestamp": 1}
    assert ledger.reconciled


def test_rejected_without_seq_still_accounts() -> None:
    """An unreadable message cannot name its seq, but it is counted: lost comes from counts."""
    ledger = reconcile(range(10), back(list(range(8)), rejected=[None, None], reasons=["malformed_json"] * 2))
    assert (ledger.rejected, ledger.lost) == (2, 0)
    assert ledger.by_reason == {"malformed_json": 2}
    assert ledger.reconciled
    # The sample lists ids found nowhere, which includes those the anonymous rejections stand for.
    assert ledger.missing_seq_sample == [8, 9]


def test_more_anonymous_rejections_than_gaps_is_not_reconciled() -> None:
    ledger = reconcile(range(10), back(list(range(10)), rejected=[None]))
    assert ledger.lost == 0  # clamped, not negative
    assert ledger.unexpected == 1  # an unreadable row nothing sent can explain
    assert not ledger.reconciled


def test_persisted_wins_over_rejected_for_the_same_seq() -> None:
    ledger = reconcile(range(5), back(list(range(5)), rejected=[4]))
    assert (ledger.persisted, ledger.rejected) == (5, 0)
    assert ledger.reconciled


def test_dropped_by_named_policy() -> None:
    dropped = {8: "overflow", 9: "overflow", 7: "stale", 0: "overflow", 500: "overflow"}
    ledger = reconcile(range(10), back(list(range(7))), dropped=dropped)
    # 0 was persisted after all, 500 was never sent: neither counts as dropped.
    assert (ledger.persisted, ledger.dropped, ledger.lost) == (7, 3, 0)
    assert ledger.dropped_by_reason == {"overflow": 2, "stale": 1}
    assert ledger.reconciled


def test_dropped_does_not_cover_a_missing_id() -> None:
    ledger = reconcile(range(10), back(list(range(8))), dropped={8: "overflow"})
    assert (ledger.dropped, ledger.lost, ledger.missing_seq_sample) == (1, 1, [9])
    assert not ledger.reconciled


def test_unfinalised_files_not_reconciled() -> None:
    ledger = reconcile(range(3), back([0, 1, 2], unfinalised=["/out/readings-x-000.parquet.tmp"]))
    assert ledger.lost == 0
    assert ledger.unfinalised_files == ["/out/readings-x-000.parquet.tmp"]
    assert not ledger.reconciled
    assert ledger.problems() == ["files left unfinalised: /out/readings-x-000.parquet.tmp"]


# --- read_back on real files -------------------------------------------------


def reading(seq: int) -> Reading:
    return Reading("m-1", BASE_NS + seq * 10**9, 1.0, 2.0, seq, BASE_NS + seq * 10**9)


def rejection(seq: int | None, reason: str) -> Rejection:
    return Rejection(reason, "detail", b"{}", "t", BASE_NS + 10**9, seq, None)


def write_run(data: Path, quarantine: Path, *, close: bool) -> tuple[ParquetSink, QuarantineSink]:
    readings = ParquetSink(data, rotate_s=60.0, compression="snappy", fsync=False)
    readings.write_batch([reading(s) for s in range(10)], 1)
    readings.write_batch([reading(s) for s in range(10, 15)], 2)
    rejected = QuarantineSink(quarantine, rotate_s=60.0, fsync=False)
    rejected.write_batch([rejection(15, "wrong_type"), rejection(None, "malformed_json")], 1)
    if close:
        readings.close()
        rejected.close()
    return readings, rejected


def test_read_back_real_files(tmp_path: Path) -> None:
    data, quarantine = tmp_path / "data", tmp_path / "quarantine"
    write_run(data, quarantine, close=True)
    got = read_back(data, quarantine)
    assert sorted(got.persisted_seqs) == list(range(15))
    assert sorted(zip(got.persisted_seqs, got.persisted_batches, strict=True)) == [
        (s, 1 if s < 10 else 2) for s in range(15)
    ]
    assert got.rejected_seqs == [15, None]
    assert got.rejected_reasons == ["wrong_type", "malformed_json"]
    assert got.files == 2
    assert got.unfinalised == []

    ledger = reconcile(range(17), got)  # 16 is the message whose seq was unreadable
    assert (ledger.persisted, ledger.rejected, ledger.lost) == (15, 2, 0)
    assert ledger.reconciled


def test_read_back_sees_unfinalised_files(tmp_path: Path) -> None:
    data, quarantine = tmp_path / "data", tmp_path / "quarantine"
    readings, rejected = write_run(data, quarantine, close=False)
    got = read_back(data, quarantine)
    assert got.files == 0
    assert got.persisted_seqs == []  # .tmp files are never read as data
    assert len(got.unfinalised) == 2
    assert all(name.endswith(".parquet.tmp") for name in got.unfinalised)
    ledger = reconcile(range(17), got)
    assert ledger.lost == 17
    assert not ledger.reconciled
    readings.close()
    rejected.close()
    assert read_back(data, quarantine).unfinalised == []


def test_read_back_missing_folders(tmp_path: Path) -> None:
    got = read_back(tmp_path / "nope", tmp_path / "nothing")
    assert (got.persisted_seqs, got.rejected_seqs, got.files, got.unfinalised) == ([], [], 0, [])
    assert reconcile([], got).reconciled
