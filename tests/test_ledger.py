"""Tests for bench/harness/ledger.py: every sent seq is persisted, rejected, dropped or lost."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

from bench.harness.ledger import ERROR_CHARS, MISSING_SAMPLE, ReadBack, payload_key, read_back, reconcile
from pipeline.model import Reading, Rejection
from pipeline.parquet_sink import ParquetSink, QuarantineSink

BASE_NS = 1_699_999_980 * 10**9  # start of a 60 s window


def back(
    persisted: list[int],
    rejected: list[int | None] | None = None,
    reasons: list[str] | None = None,
    unfinalised: list[str] | None = None,
    unreadable: list[str] | None = None,
) -> ReadBack:
    rejected = rejected or []
    return ReadBack(
        persisted_seqs=persisted,
        persisted_batches=[1] * len(persisted),
        rejected_seqs=rejected,
        rejected_reasons=reasons if reasons is not None else ["wrong_type"] * len(rejected),
        files=1,
        unfinalised=unfinalised or [],
        unreadable=unreadable or [],
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


def test_unreadable_files_not_reconciled_even_when_the_sum_adds_up() -> None:
    """The rows of an unreadable file are unknown: a ledger that adds up without them is no proof."""
    broken = "/out/data/readings-x-001.parquet: Parquet magic bytes not found in footer"
    ledger = reconcile(range(3), back([0, 1, 2], unreadable=[broken]))
    assert (ledger.lost, ledger.unreadable_files) == (0, [broken])
    assert not ledger.reconciled
    assert ledger.problems() == [f"Parquet files that could not be read (skipped): {broken}"]
    data = ledger.to_json()
    assert data["reconciled"] is False
    assert "unreadable_files" not in data, "results.json keeps them on the variant, beside the ledger"


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


def only_file(folder: Path) -> Path:
    (path,) = sorted(folder.rglob("*.parquet"))
    return path


def test_read_back_skips_and_names_a_truncated_and_a_random_bytes_file(tmp_path: Path) -> None:
    """A torn Parquet file (cut in half: no footer) and a file of random bytes named .parquet, beside good ones:
    read_back reads what it can and names the rest instead of raising (which ended the run without results)."""
    data, quarantine = tmp_path / "data", tmp_path / "quarantine"
    write_run(data, quarantine, close=True)
    whole = only_file(data).read_bytes()
    truncated = data / "readings-torn.parquet"
    truncated.write_bytes(whole[: len(whole) // 2])
    (quarantine / "nested").mkdir()
    noise = quarantine / "nested" / "rejections-noise.parquet"
    noise.write_bytes(random.Random(7).randbytes(4096))

    got = read_back(data, quarantine)
    assert sorted(got.persisted_seqs) == list(range(15)), "the good files are still read"
    assert got.rejected_seqs == [15, None]
    assert got.files == 2, "only files that were read count"
    assert [u.split(": ", 1)[0] for u in got.unreadable] == [str(truncated), str(noise)]
    for entry in got.unreadable:
        error = entry.split(": ", 1)[1]
        assert "magic bytes" in error and len(error) <= ERROR_CHARS
        assert "Could not open Parquet input source" not in error, "the path is given once, beside the error"

    ledger = reconcile(range(17), got)
    assert (ledger.persisted, ledger.rejected, ledger.lost) == (15, 2, 0)
    assert ledger.unreadable_files == got.unreadable
    assert not ledger.reconciled
    (problem,) = ledger.problems()
    assert str(truncated) in problem and str(noise) in problem
    json.dumps(ledger.to_json())


def test_the_rows_of_an_unreadable_file_are_lost_and_the_file_says_why(tmp_path: Path) -> None:
    data, quarantine = tmp_path / "data", tmp_path / "quarantine"
    write_run(data, quarantine, close=True)
    path = only_file(data)
    whole = path.read_bytes()
    path.write_bytes(whole[:-100])  # the footer torn off, as a crash in the middle of writing it leaves
    got = read_back(data, quarantine, tmp_path / "dropped")
    assert got.persisted_seqs == [] and len(got.unreadable) == 1
    ledger = reconcile(range(17), got)
    assert ledger.lost == 15
    problems = ledger.problems()
    assert problems[0].startswith("15 message(s) lost") and str(path) in problems[1]


def test_an_unreadable_quarantine_file_takes_its_anonymous_payloads_with_it(tmp_path: Path) -> None:
    """Payloads of rows without a seq pair with the null seqs in order: a file counts wholly or not at all."""
    data, quarantine = tmp_path / "data", tmp_path / "quarantine"
    write_run(data, quarantine, close=True)
    good = only_file(quarantine)
    broken = quarantine / "rejections-zz-broken.parquet"
    broken.write_bytes(good.read_bytes()[:50])
    got = read_back(data, quarantine)
    assert got.rejected_seqs == [15, None] and got.anonymous_payloads == [b"{}"]
    assert got.unreadable == [f"{broken}: {got.unreadable[0].split(': ', 1)[1]}"]
    ledger = reconcile(range(17), got, sent_payloads={payload_key(b"{}"): 16})
    assert (ledger.rejected, ledger.lost, ledger.missing_seq_sample) == (2, 0, [])


def test_an_unreadable_drop_log_is_named_too(tmp_path: Path) -> None:
    dropped = tmp_path / "dropped"
    dropped.mkdir()
    (dropped / "dropped.parquet").write_bytes(b"PAR1 not really")
    got = read_back(tmp_path / "data", tmp_path / "quarantine", dropped)
    assert got.dropped_seqs == [] and [u.split(": ", 1)[0] for u in got.unreadable] == [
        str(dropped / "dropped.parquet")
    ]
