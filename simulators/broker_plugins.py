"""Plugins of the embedded broker (amqtt), loaded by dotted path in the broker's own process only.

The bench never imports this module: amqtt is imported where the broker runs (see :mod:`simulators.broker`).
"""

from __future__ import annotations

import time

from amqtt.broker import BrokerContext
from amqtt.plugins.base import BasePlugin

from simulators.broker import SUBSCRIBE_LOG_TOPIC


class SubscribeLog(BasePlugin[BrokerContext]):  # type: ignore[misc]  # amqtt ships no type information
    """Reports every subscription on :data:`SUBSCRIBE_LOG_TOPIC` as it happens, in Mosquitto's format.

    The bench sees a system under test subscribe (``ready: {subscribed: true}``) the same way on both brokers.
    amqtt's own $SYS plugin only counts subscriptions every ``sys_interval`` seconds, and costs throughput.
    """

    async def on_broker_client_subscribed(self, *, client_id: str, topic: str, qos: int) -> None:
        line = f"{int(time.time())}: {client_id} {qos} {topic}"
        await self.context.broadcast_message(SUBSCRIBE_LOG_TOPIC, line.encode())
