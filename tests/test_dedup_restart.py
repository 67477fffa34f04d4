"""A restart after kill -9 still rejects what the broker delivers again: the duplicate window, read back.

With ``durability: crash_safe`` and MQTT ``ack: durable``, rows that were durable but not acknowledged at the
kill come again after the restart. The validator's ``duplicate`` rule catches them only if its per-machine
window of recent seqs is seeded from the output (pipeline/recent.py, ``Validator.seed_recent``).

The kill is real: a child process runs a crash-safe :class:`Pipeline`, reports once every message it took is
durable (the ``on_durable`` callbacks), and is SIGKILLed with its open window still a journal. The restart
reads the finalised files and the recovered journal. Seqs are unique across machines, as the bench sends
them, so the bench's ledger can account for every copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.harness.ledger import read_back, reconcile
from pipeline.clock import FakeClock
from pipeline.config import PipelineSettings, ValidateSettings
from pipeline.model import Reading
from pipeline.parquet_sink import JOURNAL_SUFFIX, ParquetSink, ParquetStrategy
from pipeline.recent import RecentSeqs, recent_seqs
from pipeline.runtime import Pipeline
from pipeline.validate import Validator

ROOT = Path(__file__).resolve().parent.parent
NOW_NS = 1_700_000_000 * 10**9  # the FakeClock of both processes
MACHINES = 3
SENT = 240  # seq 0..239, machine m-(seq % 3), ts one second apart: four one-minute windows
WINDOW = 40  # dedup_window: per machine, the last 40 of its 80 seqs
REDELIVERED = 45  # the last 45 sent (15 per machine), durable but "unacknowledged" at the kill
BATCH = 30  # rows per flush in the killed process: 8 batches, windows start at seq 40, 100, 160, 220
BAD_SEQ = SENT - 5  # refused (load_rate 500) before the kill, and delivered again after it

SETTINGS: dict[str, Any] = {
    "durability": "crash_safe",
    # Flushed on request only (the FakeClock never moves), so the batches are what the child asks for.
    "buffer": {"size": 1000, "flush_interval": 3600},
    "parquet": {"fsync": False},  # a killed process's page cache survives: kill -9 needs no fsync
    "validate": {"dedup_window": WINDOW},
}


def iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


def payload(seq: int) -> bytes:
    """Message ``seq``: machine m-(seq % 3), one second after seq - 1, the last one sent a second before now."""
    body = {
        "machine": f"m-{seq % MACHINES}",
        "ts": iso(NOW_NS // 10**9 - SENT + seq),
        "load_rate": 500.0 if seq == BAD_SEQ else 50.0,
        "mileage": float(seq),
        "seq": seq,
    }
    return json.dumps(body).encode()


# The child takes seq 0..SENT-1 in batches of BATCH, each durable (its callbacks ran) before the next, says so,
# and waits to be killed: the open window is then a journal, the older ones finalised files.
CHILD = """
import sys, threading
from pathlib import Path
from pipeline.clock import FakeClock
from pipeline.config import PipelineSettings
from pipeline.runtime import Pipeline
from tests.test_dedup_restart import BATCH, SENT, SETTINGS, NOW_NS, payload

pipeline = Pipeline(PipelineSettings.model_validate(SETTINGS), Path(sys.argv[1]), FakeClock(NOW_NS))
pipeline.start()
done = threading.Semaphore(0)
for first in range(0, SENT, BATCH):  # a batch each: batch ids 1.., some of them spanning two windows
    for seq in range(first, first + BATCH):
        pipeline.submit(payload(seq), "plant/telemetry", done.release)
    pipeline.request_flush()
    for _ in range(BATCH):
        assert done.acquire(timeout=30), "a message never became durable"
print("durable", flush=True)
sys.stdin.read()
"""


def seeded_pipeline(output: Path, *, seed: bool = True) -> tuple[Pipeline, RecentSeqs | None]:
    """A started Pipeline on ``output``, seeded as runtime.py will seed it in ``Pipeline.__init__``.

    Seeding twice (here and in ``Pipeline.__init__`` once it is wired there) is harmless: the seqs are the same.
    ``seed=False`` gives the validator an empty window, as every restart had before.
    """
    settings = PipelineSettings.model_validate(SETTINGS)
    pipeline = Pipeline(settings, output, FakeClock(NOW_NS))
    found = None
    if not seed:
        pipeline._validator = Validator(settings.validate_)
    # After the sinks are built (the data sink has recovered the dead process's journals), before start().
    elif settings.durability == "crash_safe" and settings.validate_.rules.duplicate == "reject":
        found = recent_seqs(output / settings.parquet.path, settings.validate_.dedup_window)
        pipeline._validator.seed_recent(found.seqs)
    pipeline.start()
    return pipeline, found


def run_killed_child(output: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(output)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "durable":
            pytest.fail(f"the child stopped: {proc.stderr.read() if proc.stderr else ''}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def persisted(folder: Path) -> list[int]:
    return sorted(s for p in sorted(folder.rglob("*.parquet")) for s in pq.read_table(p).column("seq").to_pylist())


def quarantined(folder: Path) -> list[tuple[int, str]]:
    rows: list[tuple[int, str]] = []
    for path in sorted(folder.rglob("*.parquet")):
        table = pq.read_table(path, columns=["seq", "reason"])
        rows.extend(zip(table.column("seq").to_pylist(), table.column("reason").to_pylist(), strict=True))
    return sorted(rows)


@pytest.fixture(scope="module")
def killed_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the killed child left; copy it (mtimes kept) before restarting on it."""
    output = tmp_path_factory.mktemp("killed") / "out"
    run_killed_child(output)
    journals = list((output / "data").glob(f"*{JOURNAL_SUFFIX}"))
    assert journals, "the kill left no journal: the open window was not being written"
    assert list((output / "data").glob("*.parquet")), "no window was finalised before the kill"
    return output


def restart_and_redeliver(output: Path, *, seed: bool) -> tuple[Pipeline, RecentSeqs | None]:
    pipeline, found = seeded_pipeline(output, seed=seed)
    for seq in range(SENT - REDELIVERED, SENT):  # the broker delivers the unacknowledged ones again, in order
        pipeline.submit(payload(seq), "plant/telemetry")
    for seq in range(SENT, SENT + 30):  # then what was published meanwhile
        pipeline.submit(payload(seq), "plant/telemetry")
    pipeline.close()
    return pipeline, found


def test_a_redelivery_after_kill_9_is_quarantined_as_duplicate(killed_output: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    shutil.copytree(killed_output, output)  # copy2: mtimes kept

    before_recovery = recent_seqs(output / "data", WINDOW)  # the journals read as they are
    pipeline, found = restart_and_redeliver(output, seed=True)

    # Per machine its last WINDOW seqs, in the order they were sent; machines by their last row (in the last
    # flush, stored sorted by machine, m-2's).
    assert found is not None
    sent_by_machine = {f"m-{m}": [s for s in range(SENT) if s % MACHINES == m and s != BAD_SEQ] for m in range(3)}
    assert found.seqs == {m: seqs[-WINDOW:] for m, seqs in sent_by_machine.items()}
    assert list(found.seqs) == ["m-0", "m-1", "m-2"]
    assert (found.stopped, found.rows_read) == ("all_read", SENT - 1)
    assert before_recovery.seqs == found.seqs  # whether journals or their recovered files are read

    stats = pipeline.statistics()
    assert stats.rejected_by_reason == {"duplicate": REDELIVERED - 1, "out_of_range": 1}
    assert pipeline.errors == []
    seqs = persisted(output / "data")
    assert seqs == sorted(set(range(SENT + 30)) - {BAD_SEQ}), "each seq persisted exactly once, new ones too"
    redelivered = [(s, "duplicate") for s in range(SENT - REDELIVERED, SENT) if s != BAD_SEQ]
    # The refused message, refused again for its own reason: once before the kill, once after.
    assert quarantined(output / "quarantine") == sorted(
        [*redelivered, (BAD_SEQ, "out_of_range"), (BAD_SEQ, "out_of_range")]
    )

    # The bench's ledger: nothing lost, nothing twice; every extra copy, duplicate or refused again, redelivered.
    ledger = reconcile(range(SENT + 30), read_back(output / "data", output / "quarantine"))
    assert (ledger.lost, ledger.duplicates, ledger.unexpected) == (0, 0, 0)
    assert ledger.reconciled
    assert (ledger.persisted, ledger.rejected, ledger.redelivered) == (SENT + 29, 1, REDELIVERED)
    # by_reason counts quarantine rows, not messages: the refused message counts twice there.
    assert ledger.by_reason == {"duplicate": REDELIVERED - 1, "out_of_range": 2}


def test_without_the_seed_the_redelivery_is_stored_twice(killed_output: Path, tmp_path: Path) -> None:
    """The problem this fixes, on the same folder: an empty window accepts the redelivered copies."""
    output = tmp_path / "out"
    shutil.copytree(killed_output, output)
    restart_and_redeliver(output, seed=False)
    twice = sorted(s for s, n in Counter(persisted(output / "data")).items() if n > 1)
    assert twice == [s for s in range(SENT - REDELIVERED, SENT) if s != BAD_SEQ]
    assert reconcile(range(SENT + 30), read_back(output / "data", output / "quarantine")).duplicates == len(twice)


# --- the bounded read ------------------------------------------------------------------------------------------------

BASE_NS = 1_699_999_980 * 10**9  # 2023-11-14T22:13:00Z, the start of a one-minute window


def readings(first_seq: int, n: int, at_s: float, machines: int = 2) -> list[Reading]:
    ts = BASE_NS + int(at_s * 1e9)
    return [
        Reading(f"m-{s % machines}", ts + i * 10**6, 1.0, 1.0, s, ts)
        for i, s in enumerate(range(first_seq, first_seq + n))
    ]


def write_flushes(
    folder: Path, flushes: Sequence[tuple[int, float]], *, strategy: ParquetStrategy = "writer", rows: int = 100
) -> None:
    """One process: flush k of ``flushes`` (first seq, seconds after BASE) as batch k + 1, then close."""
    sink = ParquetSink(folder, rotate_s=60.0, compression="snappy", fsync=False, strategy=strategy, crash_safe=True)
    for k, (first, at_s) in enumerate(flushes):
        sink.write_batch(readings(first, rows, at_s), k + 1)
    sink.close()


def test_the_read_stops_at_max_rows_and_keeps_the_newest(tmp_path: Path) -> None:
    # 12 flushes of 100 rows, 3 per one-minute window: 4 files of 3 row groups.
    write_flushes(tmp_path, [(k * 100, k * 20.0) for k in range(12)])
    assert len(list(tmp_path.glob("*.parquet"))) == 4

    found = recent_seqs(tmp_path, 10_000, max_rows=450)
    # Whole row groups from the end, newest file first: 3 + 1 of them fit in 450 rows.
    assert (found.rows_read, found.files_read, found.stopped) == (400, 2, "max_rows")
    assert found.seqs == {"m-0": list(range(800, 1200, 2)), "m-1": list(range(801, 1200, 2))}

    found = recent_seqs(tmp_path, 10_000, max_files=1)
    assert (found.rows_read, found.files_read, found.stopped) == (300, 1, "max_files")
    # Not even the last row group fits (the rewrite strategy's one group per window): its last rows are kept.
    found = recent_seqs(tmp_path, 10_000, max_rows=99)
    assert (found.rows_read, found.files_read, found.stopped) == (99, 1, "max_rows")
    assert found.seqs == {"m-0": list(range(1102, 1200, 2)), "m-1": list(range(1101, 1200, 2))}
    assert recent_seqs(tmp_path, 10_000, max_rows=0).seqs == {}


def test_a_window_written_as_one_row_group_still_gives_its_newest_rows(tmp_path: Path) -> None:
    write_flushes(tmp_path, [(k * 100, k * 5.0) for k in range(10)], strategy="rewrite")  # one window, one file
    (path,) = tmp_path.glob("*.parquet")
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    found = recent_seqs(tmp_path, 10_000, max_rows=250)
    assert (found.rows_read, found.stopped) == (250, "max_rows")
    # The last 250 rows: the last two flushes (seq 800..999), and the m-1 half of the one before (stored sorted).
    assert found.seqs == {"m-0": list(range(800, 1000, 2)), "m-1": list(range(701, 1000, 2))}


def test_the_read_stops_once_every_machine_has_its_window(tmp_path: Path) -> None:
    write_flushes(tmp_path, [(k * 100, k * 20.0) for k in range(12)])
    found = recent_seqs(tmp_path, 60, min_rows=0)  # the newest file (300 rows) gives both machines 150
    assert (found.files_read, found.stopped) == (1, "window")
    assert found.seqs == {"m-0": list(range(1080, 1200, 2)), "m-1": list(range(1081, 1200, 2))}
    # Not before min_rows rows, so that a rarely sending machine in older files is still found.
    assert recent_seqs(tmp_path, 60, min_rows=301).files_read == 2


def test_one_flush_of_the_dataset_strategy_is_read_whole_before_stopping(tmp_path: Path) -> None:
    """A file per machine and flush, all of one name: a machine is not missed because the others are full."""
    write_flushes(tmp_path, [(k * 100, k * 20.0) for k in range(4)], strategy="dataset")
    found = recent_seqs(tmp_path, 10, min_rows=0)
    assert (found.files_read, found.stopped) == (2, "window")
    assert found.seqs == {"m-0": list(range(380, 400, 2)), "m-1": list(range(381, 400, 2))}


def test_processes_are_ordered_by_their_token_then_batch_ids(tmp_path: Path) -> None:
    # Two runs, batch ids from 1 each time, the second run's readings in an *older* time window: acceptance
    # order is by process, then batch, whatever the windows say.
    write_flushes(tmp_path, [(0, 100.0), (100, 110.0)])
    first = set(tmp_path.glob("*.parquet"))
    write_flushes(tmp_path, [(200, 0.0), (300, 10.0)])
    # Same start second in both tokens (likely here): the newest mtime decides; make it unambiguous.
    for path in first:
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    found = recent_seqs(tmp_path, 150)
    assert found.seqs["m-0"] == [s for s in range(100, 400) if s % 2 == 0][-150:]
    assert found.seqs["m-1"][-1] == 399


def test_a_live_writers_journal_is_read_too(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path, rotate_s=60.0, compression="snappy", fsync=False, crash_safe=True)
    sink.write_batch(readings(0, 100, 0.0), 1)
    sink.write_batch(readings(100, 100, 5.0), 2)
    assert list(tmp_path.glob(f"*{JOURNAL_SUFFIX}")) and not list(tmp_path.glob("*.parquet"))
    found = recent_seqs(tmp_path, 1000)
    sink.close()
    assert found.seqs == {"m-0": list(range(0, 200, 2)), "m-1": list(range(1, 200, 2))}
    assert recent_seqs(tmp_path, 1000).seqs == found.seqs  # the same once finalised, read once


def test_unreadable_or_foreign_files_are_skipped_and_an_empty_folder_gives_nothing(tmp_path: Path) -> None:
    assert recent_seqs(tmp_path / "missing", 100).seqs == {}
    write_flushes(tmp_path, [(0, 0.0)])
    (tmp_path / "readings-20991231T000000Z-000.parquet").write_bytes(b"PAR1 not a parquet file")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "readings-20991231T000100Z-000.parquet")  # not readings
    assert recent_seqs(tmp_path, 1000).seqs == {"m-0": list(range(0, 100, 2)), "m-1": list(range(1, 100, 2))}


# --- seeding the validator -------------------------------------------------------------------------------------------


def reading(seq: int, machine: str = "m-0", *, at_s: int = 0, mileage: float = 100.0) -> bytes:
    body = {"machine": machine, "ts": iso(NOW_NS // 10**9 + at_s), "load_rate": 1.0, "mileage": mileage, "seq": seq}
    return json.dumps(body).encode()


def reason(v: Validator, payload_: bytes) -> str | None:
    result = v.check(payload_, "t", NOW_NS)
    return None if isinstance(result, Reading) else result.reason


def test_seed_recent_keeps_the_last_dedup_window_seqs() -> None:
    v = Validator(ValidateSettings(dedup_window=3))
    assert v.seed_recent({"m-0": [1, 2, 3, 4, 5]}) == 3
    assert [reason(v, reading(s)) for s in (3, 4, 5)] == ["duplicate"] * 3
    assert reason(v, reading(2)) is None  # beyond the window: accepted, as in a process that never stopped
    # The window slides on from the seed: 2 entered, 3 left.
    assert reason(v, reading(3, at_s=1)) is None


def test_seed_recent_keeps_the_machines_tracked_most_recent_machines() -> None:
    v = Validator(ValidateSettings(machines_tracked=2))
    assert reason(v, reading(7, "live")) is None
    v.seed_recent({"old": [1], "newer": [1], "newest": [1, 2]})
    # "live" was seen in this process: it stays; of the seeded, only the most recent fits beside it.
    assert reason(v, reading(7, "live")) == "duplicate"
    assert reason(v, reading(2, "newest")) == "duplicate"
    assert reason(v, reading(1, "old")) is None and reason(v, reading(1, "newer")) is None


def test_seed_recent_merges_with_what_the_validator_saw_and_seeds_no_watermark_or_mileage() -> None:
    v = Validator(ValidateSettings(dedup_window=3))
    assert reason(v, reading(10)) is None
    v.seed_recent({"m-0": [7, 8, 9, 9]})  # older than 10; a seq stored twice is remembered once
    assert [reason(v, reading(s)) for s in (8, 9, 10)] == ["duplicate"] * 3
    assert reason(v, reading(7)) is None  # the window holds 8, 9, 10
    # Only seqs: a seeded machine's first reading may be older (late) or have a lower mileage than the files.
    v.seed_recent({"m-1": [1]})
    assert reason(v, reading(2, "m-1", at_s=-3600, mileage=0.0)) is None
