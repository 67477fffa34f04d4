"""``python -m pipeline --config FILE``: run the pipeline against a real broker.

Runs until SIGINT/SIGTERM, then flushes what is buffered and finalises files.
Example config (an ``opc.tcp://`` URL makes it an OPC UA subscription instead)::

    source: {url: "mqtt://127.0.0.1:1883", topic: "plant/+/telemetry", qos: 1}
    output: pipeline-out
    pipeline:
      buffer: {size: 1000, flush_interval: 1s}

Crash-safe MQTT ingestion (docs/durability.md)::

    source: {url: "mqtt://127.0.0.1:1883", qos: 1, client_id: plant-ingest-1, session: persistent, ack: durable}
    pipeline: {durability: crash_safe}

Counters go to stdout; log lines (disconnects, reconnects, failed flushes) to stderr. With
``durability: crash_safe`` a sink that fails (a full disk, a database down) stalls the pipeline instead of losing
rows; while it does, the counter line says so (``status_line``)::

    pipeline: received=9000 accepted=9000 rejected=0 stalled=12.3s held=4000 error="cannot append to ...: No space..."

Stopped while a sink still fails, it retries for at most 10 s, then exits 1 with what it left unwritten (never
acknowledged: a persistent MQTT session delivers it again).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from pipeline.clock import MonotonicWallClock
from pipeline.config import MqttSourceSettings, OpcUaSourceSettings, StandaloneConfig, load_standalone, redact_urls_in
from pipeline.errors import ConfigError, PipelineError
from pipeline.runtime import Pipeline, PipelineStatistics, freeze_startup_heap
from pipeline.sources import describe, make_source


def _private_folder(folder: Path) -> None:
    """Create ``folder`` readable by its owner only (0700): the source writes its private key there.

    Under the output folder, like every file the pipeline writes; the mode keeps the key from other users
    whatever mode the key file itself gets.
    """
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode passes through the umask and does nothing to a folder that exists.
        folder.chmod(0o700)
    except OSError as exc:
        raise ConfigError(f"source.cert_dir: cannot create {folder}: {exc.strerror}") from None


def _log_to_stderr() -> None:
    """The pipeline's own log lines (INFO and up) on stderr, once; other libraries' stay at their defaults."""
    logger = logging.getLogger("pipeline")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pipeline: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _warn_about_durability(config: StandaloneConfig) -> None:
    src = config.source
    if isinstance(src, MqttSourceSettings) and src.ack == "durable" and config.pipeline.durability == "naive":
        logging.getLogger("pipeline").warning(
            "source.ack durable with pipeline.durability naive: a message is acknowledged once flushed, but a "
            "flushed row sits in a *.parquet.tmp file without a footer until its window closes, and a restart "
            "reuses file names; after a kill -9 those rows are lost. Set pipeline.durability: crash_safe"
        )


STATUS_ERROR_CHARS = 300
"""Longest error the status line quotes (a driver's message can run long)."""


def status_line(s: PipelineStatistics) -> str:
    """The periodic counter line. Its prefix is parsed by the bench (``received=(\\d+) accepted=(\\d+)
    rejected=(\\d+)``) and must not change; while a sink fails (crash_safe) it goes on with how long, how many
    rows are held, and the last error, JSON-quoted so the line stays one line and parseable."""
    line = f"pipeline: received={s.received} accepted={s.accepted} rejected={s.rejected}"
    if s.stalled_s > 0:
        error = redact_urls_in(s.sink_error or "")[:STATUS_ERROR_CHARS]
        line += f" stalled={s.stalled_s:.1f}s held={s.held_rows} error={json.dumps(error, ensure_ascii=False)}"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="YAML config file")
    parser.add_argument(
        "--report-every", type=float, default=5.0, metavar="S", help="print counters every S seconds (0: never)"
    )
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    _log_to_stderr()
    try:
        config = load_standalone(args.config)
        src = config.source
        output = Path(config.output)
        if isinstance(src, OpcUaSourceSettings) and src.security != "None":
            _private_folder(output / src.cert_dir)
        _warn_about_durability(config)
        pipeline = Pipeline(config.pipeline, output, MonotonicWallClock())
        source = make_source(
            src, pipeline.submit, output=output, request_flush=pipeline.request_flush, on_fields=pipeline.submit_fields
        )
        where = describe(src)
        pipeline.start()
        source.start()
        freeze_startup_heap()  # this process runs the pipeline and nothing else
    except PipelineError as exc:
        # Errors name URLs; a credential one of them holds (from the environment) is not printed.
        print(f"pipeline: error: {redact_urls_in(str(exc))}", file=sys.stderr)
        return 2
    print(f"pipeline: subscribed to {where}; writing to {output}/", flush=True)
    close_error: PipelineError | None = None
    try:
        while not stop.wait(args.report_every if args.report_every > 0 else None):
            print(status_line(pipeline.statistics()), flush=True)
    finally:
        # The source first: with ack durable it waits (bounded) until what the pipeline holds is flushed and
        # acknowledged, while it is still connected; then the pipeline flushes whatever else is left.
        source.close()
        try:
            pipeline.close()
        except PipelineError as exc:
            # A file that cannot be finalised (the disk is still full): its journal stays for the next start.
            close_error = exc
    s = pipeline.statistics()
    print(
        f"pipeline: stopped; received={s.received} accepted={s.accepted} rejected={s.rejected} "
        f"files={len(pipeline.parquet.files_written)}",
        flush=True,
    )
    errors = [*pipeline.errors, *([close_error] if close_error is not None else [])]
    if errors:
        for error in errors:
            print(f"pipeline: error: {redact_urls_in(str(error))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
