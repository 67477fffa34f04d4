"""Rows dropped by a named overflow policy: counted, kept, and written out.

Nothing is dropped silently: every drop is recorded with its reason and, at
close, written to ``dropped/dropped.parquet`` so the ledger can read it back.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SinkError

DROP_SCHEMA = pa.schema(
    [
        pa.field("seq", pa.int64()),
        pa.field("machine", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


class DropLog:
    """Thread-safe record of dropped rows (anything with ``seq``/``machine`` attributes)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._rows: list[tuple[int | None, str | None, str]] = []

    def record(self, item: Any, reason: str) -> None:
        seq = getattr(item, "seq", None)
        machine = getattr(item, "machine", None)
        with self._lock:
            self._rows.append((seq, machine, reason))

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(reason for _, _, reason in self._rows))

    def close(self) -> None:
        with self._lock:
            rows = list(self._rows)
        if not rows:
            return
        table = pa.table(
            {
                "seq": pa.array([r[0] for r in rows], pa.int64()),
                "machine": pa.array([r[1] for r in rows], pa.string()),
                "reason": pa.array([r[2] for r in rows], pa.string()),
            },
            schema=DROP_SCHEMA,
        )
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / "dropped.parquet.tmp"
            pq.write_table(table, tmp)
            tmp.replace(self.folder / "dropped.parquet")
        except (OSError, pa.ArrowException) as exc:
            raise SinkError(f"cannot write the drop log in {self.folder}: {exc}") from None
