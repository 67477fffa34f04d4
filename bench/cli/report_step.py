"""The report step of the commands that write one automatically (``bench run``, ``load``, ``capacity``)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def write_report_or_warn(run_dir: Path, err: Console) -> Path | None:
    """report.html and summary.md in a run folder; the path of report.html, or None when it could not be made.

    A report that fails to render must not cost the run its results (already written): the failure is printed
    as a warning and the command goes on to its own verdict.
    """
    # matplotlib is a second of start-up: only the commands that write a report import it.
    from bench.report.render import write_report

    try:
        return write_report([run_dir]).html
    except Exception as exc:  # any rendering failure; the report's own tests keep it from being routine
        err.print(f"bench: warning: could not write the report into {run_dir}: {exc}", style="yellow")
        return None
