"""Tests for the strategy registries: PARQUET_STRATEGIES, SQL_STRATEGIES, LOCK_STRATEGIES.

A strategy is added in one place only if the names config validation accepts
(pipeline/config.py) are exactly the registry's keys; these tests fail otherwise.
An unknown name, from settings built without validation, is refused with the known names.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel

from pipeline.async_buffer import AsyncFlushingBuffer
from pipeline.buffer import FlushingBuffer
from pipeline.buffer_core import LOCK_STRATEGIES, LockKind
from pipeline.clock import FakeClock
from pipeline.config import BufferSettings, ParquetSettings, SqlSettings
from pipeline.errors import ConfigError
from pipeline.parquet_sink import PARQUET_STRATEGIES, ParquetSink, ParquetStrategy
from pipeline.sinks import MemorySink
from pipeline.sql_sink import SQL_STRATEGIES, SqlSink, SqlStrategy

FAMILIES = [
    pytest.param(PARQUET_STRATEGIES, ParquetSettings, "strategy", ParquetStrategy, id="parquet"),
    pytest.param(SQL_STRATEGIES, SqlSettings, "strategy", SqlStrategy, id="sql"),
    pytest.param(LOCK_STRATEGIES, BufferSettings, "lock", LockKind, id="lock"),
]


@pytest.mark.parametrize(("registry", "settings", "field", "literal"), FAMILIES)
def test_config_accepts_exactly_the_registry_keys(
    registry: dict[str, Any], settings: type[BaseModel], field: str, literal: Any
) -> None:
    accepted = get_args(settings.model_fields[field].annotation)
    assert sorted(accepted) == sorted(registry), f"{settings.__name__}.{field} and the registry disagree"
    assert sorted(get_args(literal)) == sorted(registry), "the strategy's Literal type and its registry disagree"
    assert settings.model_fields[field].default in registry


@pytest.mark.parametrize(("registry", "settings", "field", "literal"), FAMILIES)
def test_config_refuses_a_name_outside_the_registry(
    registry: dict[str, Any], settings: type[BaseModel], field: str, literal: Any
) -> None:
    with pytest.raises(ValueError, match=field):
        settings.model_validate({field: "no-such-strategy"})


def test_unknown_parquet_strategy_lists_the_known_ones(tmp_path: Path) -> None:
    unknown: Any = "append"  # what settings built without validation can carry
    with pytest.raises(ValueError, match=r"expected one of writer, rewrite, dataset, got 'append'"):
        ParquetSink(tmp_path / "data", rotate_s=60, compression="snappy", fsync=False, strategy=unknown)
    assert not (tmp_path / "data").exists(), "an unknown strategy must fail before touching the disk"


@pytest.mark.parametrize("strategy", PARQUET_STRATEGIES)
def test_every_parquet_strategy_builds_a_sink(tmp_path: Path, strategy: ParquetStrategy) -> None:
    sink = ParquetSink(tmp_path / "data", rotate_s=60, compression="snappy", fsync=False, strategy=strategy)
    assert sink.strategy == strategy
    sink.close()


def test_unknown_sql_strategy_lists_the_known_ones(tmp_path: Path) -> None:
    settings = SqlSettings(url="sqlite:///x.db").model_copy(update={"strategy": "merge"})
    with pytest.raises(ConfigError, match=r"sql\.strategy: expected one of row, bulk, upsert, copy, got 'merge'"):
        SqlSink(settings, tmp_path)
    assert not (tmp_path / "x.db").exists(), "an unknown strategy must fail before opening the database"


@pytest.mark.parametrize("strategy", [s for s in SQL_STRATEGIES if not SQL_STRATEGIES[s].needs_postgresql])
def test_every_sql_strategy_builds_a_sink_on_sqlite(tmp_path: Path, strategy: SqlStrategy) -> None:
    sink = SqlSink(SqlSettings(url="sqlite:///x.db", strategy=strategy), tmp_path)
    assert sink.strategy == strategy
    sink.close()


def test_unknown_lock_strategy_lists_the_known_ones() -> None:
    unknown: Any = "fine"
    with pytest.raises(ValueError, match=r"expected one of coarse, swap, got 'fine'"):
        FlushingBuffer(MemorySink[int](), size=1, flush_interval_s=1, capacity=1, clock=FakeClock(), lock=unknown)
    with pytest.raises(ValueError, match=r"expected one of coarse, swap, got 'fine'"):
        AsyncFlushingBuffer(
            [MemorySink[int]()], size=1, flush_interval_s=1, capacity=1, clock=FakeClock(), lock=unknown
        )


@pytest.mark.parametrize("lock", LOCK_STRATEGIES)
def test_every_lock_strategy_builds_both_drivers(lock: LockKind) -> None:
    threaded: FlushingBuffer[int] = FlushingBuffer(
        MemorySink[int](), size=1, flush_interval_s=1, capacity=1, clock=FakeClock(), lock=lock
    )
    assert threaded.lock_kind == lock

    async def build() -> AsyncFlushingBuffer[int]:
        return AsyncFlushingBuffer(
            [MemorySink[int]()], size=1, flush_interval_s=1, capacity=1, clock=FakeClock(), lock=lock
        )

    assert asyncio.run(build()).lock_kind == lock
