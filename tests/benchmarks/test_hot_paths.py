"""Micro-benchmarks of each strategy's hot path (pytest-benchmark).

Not in the default run (marker ``microbench``). Run them with::

    .venv/bin/pytest -m microbench --benchmark-only

Compare two commits with ``--benchmark-autosave`` then ``--benchmark-compare``.
They measure cost per call on this machine; the assertions only check that the
benchmarked code did its work, never a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.aggregate import MinuteAggregator
from pipeline.buffer import FlushingBuffer
from pipeline.clock import MonotonicWallClock
from pipeline.config import RulePolicies, SqlSettings, ValidateSettings
from pipeline.model import Reading
from pipeline.parquet_sink import ParquetSink
from pipeline.sinks import SinkTiming
from pipeline.sql_sink import SqlSink
from pipeline.validate import Validator
from simulators.stream import PhaseSpec, StreamSpec, stream

pytestmark = pytest.mark.microbench

BASE_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z


def readings(n: int, offset: int = 0) -> list[Reading]:
    return [
        Reading(f"m-{i % 10}", BASE_NS + (offset + i) * 1_000_000, 50.0, float(i), offset + i, BASE_NS)
        for i in range(n)
    ]


class NullSink:
    name = "null"

    def write_batch(self, items: Any, batch_id: int) -> SinkTiming:
        return SinkTiming(0, 0, 0)

    def close(self) -> None:
        pass


def test_validate_one_message(benchmark: Any) -> None:
    payload = json.dumps(
        {"machine": "press-001", "ts": "2026-01-01T00:00:00.123456Z", "load_rate": 42.5, "mileage": 1234.5, "seq": 7}
    ).encode()
    # The same message over and over: duplicate detection off, so every call takes the accept path.
    validator = Validator(ValidateSettings(rules=RulePolicies(duplicate="accept")))
    result = benchmark(validator.check, payload, "plant/press-001/telemetry", BASE_NS)
    assert isinstance(result, Reading)


def test_generate_1000_messages(benchmark: Any) -> None:
    spec = StreamSpec(seed=1, machines=("a", "b"), phases=(PhaseSpec("steady", 1.0, 1000.0),))
    messages = benchmark(lambda: list(stream(spec, BASE_NS)))
    assert len(messages) == 1000


@pytest.mark.parametrize("lock", ["coarse", "swap"])
def test_buffer_put_1000(benchmark: Any, lock: str) -> None:
    buf: FlushingBuffer[int] = FlushingBuffer(
        NullSink(),
        size=500,
        flush_interval_s=60,
        capacity=100_000,
        clock=MonotonicWallClock(),
        lock=lock,  # type: ignore[arg-type]
    )
    buf.start()

    def put_many() -> None:
        for i in range(1000):
            buf.put(i)

    benchmark(put_many)
    buf.close()
    assert buf.statistics().flushed_rows == buf.statistics().accepted


@pytest.mark.parametrize("strategy", ["writer", "rewrite", "dataset"])
def test_parquet_flush_10k_rows_into_a_100k_row_file(benchmark: Any, strategy: str, tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path, rotate_s=3600, compression="snappy", fsync=False, strategy=strategy)  # type: ignore[arg-type]
    for b in range(10):  # grow the file first: the append cost depends on it
        sink.write_batch(readings(10_000, b * 10_000), b)
    counter = iter(range(10, 10_000))

    def flush() -> SinkTiming:
        b = next(counter)
        return sink.write_batch(readings(10_000, b * 10_000), b)

    timing = benchmark.pedantic(flush, rounds=5, iterations=1)
    sink.close()
    assert timing.write_ns > 0


@pytest.mark.parametrize("strategy", ["row", "bulk", "upsert"])
def test_sqlite_write_200_rows(benchmark: Any, strategy: str, tmp_path: Path) -> None:
    settings = SqlSettings.model_validate({"url": "sqlite:///bench.db", "strategy": strategy, "aggregate": "raw"})
    sink = SqlSink(settings, tmp_path)
    counter = iter(range(10_000))

    def write() -> SinkTiming:
        b = next(counter)
        return sink.write_batch(readings(200, b * 200), b)

    benchmark.pedantic(write, rounds=5, iterations=1)
    assert sink.read_back()["rows"] == sink.rows_written
    sink.close()


def test_aggregate_10k_readings(benchmark: Any) -> None:
    batch = readings(10_000)
    rows = benchmark(lambda: MinuteAggregator().add(batch))
    assert sum(r.count for r in rows) == 10_000
