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

Counters go to stdout; log lines (disconnects, reconnects, failed flushes) to stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from pipeline.clock import MonotonicWallClock
from pipeline.config import MqttSourceSettings, OpcUaSourceSettings, StandaloneConfig, load_standalone, redact_urls_in
from pipeline.errors import ConfigError, PipelineError
from pipeline.runtime import Pipeline
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
        source = make_source(src, pipeline.submit, output=output, request_flush=pipeline.request_flush)
        where = describe(src)
        pipeline.start()
        source.start()
    except PipelineError as exc:
        # Errors name URLs; a credential one of them holds (from the environment) is not printed.
        print(f"pipeline: error: {redact_urls_in(str(exc))}", file=sys.stderr)
        return 2
    print(f"pipeline: subscribed to {where}; writing to {output}/", flush=True)
    try:
        while not stop.wait(args.report_every if args.report_every > 0 else None):
            s = pipeline.statistics()
            print(f"pipeline: received={s.received} accepted={s.accepted} rejected={s.rejected}", flush=True)
    finally:
        # The source first: with ack durable it waits (bounded) until what the pipeline holds is flushed and
        # acknowledged, while it is still connected; then the pipeline flushes whatever else is left.
        source.close()
        pipeline.close()
    s = pipeline.statistics()
    print(
        f"pipeline: stopped; received={s.received} accepted={s.accepted} rejected={s.rejected} "
        f"files={len(pipeline.parquet.files_written)}",
        flush=True,
    )
    if pipeline.errors:
        print(f"pipeline: error: {redact_urls_in(str(pipeline.errors[0]))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
