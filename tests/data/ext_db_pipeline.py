"""A tiny external pipeline for the db_outage tests (tests/test_external_db_outage.py): subscribes with paho,
inserts each reading into a SQL table through SQLAlchemy, one transaction per message, and prints "subscribed"
once it is ready.

``--on-error retry`` keeps trying an insert that failed until it succeeds (idempotent: ``seq`` is the primary
key, so a commit whose answer was lost is not written twice); while it retries, paho's loop is held and the
messages wait at the broker. ``--on-error drop`` drops a message whose insert failed, as a pipeline without a
retry would. Each failure is printed, so the system's log shows the outage reached it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

RETRY_EVERY_S = 0.1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("broker")
    parser.add_argument("topic")
    parser.add_argument("sql_url")
    parser.add_argument("table")
    parser.add_argument("--on-error", choices=("retry", "drop"), default="retry")
    args = parser.parse_args()
    where = urlsplit(args.broker)
    # pre_ping: connections cut by an outage are found dead before use, not by a failed insert after it.
    engine = sa.create_engine(args.sql_url, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    table = sa.Table(
        args.table,
        sa.MetaData(),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("machine", sa.Text),
        sa.Column("stored_at", sa.Float),
    )
    table.create(engine, checkfirst=True)
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert

        statement: Any = insert(table).on_conflict_do_nothing(index_elements=["seq"])
    else:
        statement = table.insert()

    def store(seq: int, machine: str) -> None:
        while True:
            try:
                with engine.begin() as conn:
                    conn.execute(statement, {"seq": seq, "machine": machine, "stored_at": time.time()})
                return
            except sa.exc.DBAPIError as exc:
                if args.on_error == "drop":
                    print(f"ext-db: dropped seq {seq}: {type(exc.orig).__name__}", flush=True)
                    return
                print(f"ext-db: insert of seq {seq} failed ({type(exc.orig).__name__}), retrying", flush=True)
                time.sleep(RETRY_EVERY_S)

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        reading = json.loads(msg.payload)
        store(reading["seq"], reading["machine"])

    def on_subscribe(*_: Any) -> None:
        print("ext-db: subscribed", flush=True)

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.on_message, client.on_subscribe = on_message, on_subscribe
    client.on_connect = lambda c, *_: c.subscribe(args.topic, qos=1)
    client.connect(where.hostname or "127.0.0.1", where.port or 1883)

    def stop(*_: Any) -> None:
        client.disconnect()
        engine.dispose()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    client.loop_forever()


if __name__ == "__main__":
    main()
