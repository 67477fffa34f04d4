"""``python -m pipeline --config FILE``: run the pipeline against a real broker.

Runs until SIGINT/SIGTERM, then flushes what is buffered and finalises files.
Example config (an ``opc.tcp://`` URL makes it an OPC UA subscription instead)::

    source: {url: "mqtt://127.0.0.1:1883", topic: "plant/+/telemetry", qos: 1}
    output: pipeline-out
    pipeline:
      buffer: {size: 1000, flush_interval: 1s}
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from pipeline.clock import MonotonicWallClock
from pipeline.config import OpcUaSourceSettings, load_standalone, redact_urls_in
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
    try:
        config = load_standalone(args.config)
        src = config.source
        output = Path(config.output)
        if isinstance(src, OpcUaSourceSettings) and src.security != "None":
            _private_folder(output / src.cert_dir)
        pipeline = Pipeline(config.pipeline, output, MonotonicWallClock())
        source = make_source(src, pipeline.submit, output=output)
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
