"""The progress display the running commands share: a rich bar on a terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Update = Callable[[int, int, str], None]
"""``update(total, completed, info)``."""


@contextmanager
def progress_bar(console: Console, counting: str) -> Iterator[Update]:
    """A bar of ``counting`` (e.g. "sent") with elapsed time and a line of detail; kept on screen at the end."""
    with Progress(
        TextColumn(counting),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(counting, total=None, info="starting broker and pipeline")

        def update(total: int, completed: int, info: str) -> None:
            bar.update(task, total=total, completed=completed, info=info)

        yield update
