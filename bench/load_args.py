"""``bench load``'s command line, apart from :mod:`bench.load`: building the parser must not import locust,
the pipeline and the simulators (a second of start-up that ``bench validate`` would pay)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli_args import broker_url, count, positive_int


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench load`` to the CLI's subcommands."""
    p = sub.add_parser(
        "load",
        help="run a scenario with locust (master + N worker processes) as the load engine",
        description="Replay a scenario's stream with locust (a local master and N worker processes) into the "
        "pipeline under test, then read back and reconcile the ledger. Locust's response time is the publish "
        "acknowledgement; end-to-end latency comes from the read-back. See docs/load.md.",
    )
    p.add_argument("scenario", type=Path, help="scenario YAML file (transport mqtt or opcua)")
    p.add_argument(
        "--workers",
        type=count,
        default=2,
        metavar="N",
        help="locust worker processes on this machine (default 2)",
    )
    p.add_argument(
        "--remote-workers",
        type=count,
        default=0,
        metavar="K",
        help="also wait for K workers started by hand on other machines (see docs/load.md)",
    )
    p.add_argument(
        "--master-bind",
        metavar="HOST[:PORT]",
        help="where the locust master listens (default 127.0.0.1 on a free port; 0.0.0.0:5557 with remote workers)",
    )
    p.add_argument(
        "--users",
        type=positive_int,
        metavar="U",
        help="locust users over all workers (default 4 per worker, "
        "at most one per machine); each publishes whole machines",
    )
    p.add_argument("--out", type=Path, help="run folder (default reports/<scenario>-load-<UTC time>/)")
    p.add_argument(
        "--messages",
        type=positive_int,
        metavar="N",
        help="send exactly N messages (rates kept, phases stretched)",
    )
    p.add_argument(
        "--broker",
        type=broker_url,
        metavar="URL",
        help="use this broker instead of the scenario's (e.g. mqtt://127.0.0.1:1883)",
    )
    p.add_argument("--variant", metavar="NAME", help="pipeline settings of this matrix variant (default: the base)")
    p.add_argument("--quiet", action="store_true", help="no progress display, only the summary")
