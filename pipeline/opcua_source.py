"""OPC UA source: an asyncua subscription whose notifications become the same readings as MQTT.

It browses ``Objects/<plant>/<machine>/{LoadRate, Mileage, Status, Seq}``,
subscribes to every variable (publishing and sampling interval, queue size and
whether a full queue discards its oldest or newest value, all configurable;
asyncua's own server always discards the oldest) and assembles, per machine, the values that share
one SourceTimestamp into a reading. The reading is handed on as the JSON object
an MQTT publisher would have sent (``ts`` from the SourceTimestamp in UTC, a
``status`` field when the StatusCode is not Good), so validation, buffering and
sinks are exactly the MQTT path's.

Notification queues are FIFO per monitored item, so once a reading completes,
any older reading of that machine still missing a value can never complete (its
value was discarded, e.g. by queue overflow): it is handed on at once as an
incomplete reading, which the validator quarantines (``missing_field``), and
counted here.

Reconnect: asyncua's client supervisor reconnects with exponential backoff and
re-creates the subscription; each loss is counted. What the server published
while nobody listened is lost, and the ledger counts it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.uaerrors import UaStringParsingError

from pipeline.clock import Clock, MonotonicWallClock
from pipeline.decode import encode_payload
from pipeline.errors import SourceError

# The values a reading needs. The Status variable is informational: every
# DataValue carries its own StatusCode, and an unchanged Status string would
# not even notify.
FIELDS = ("load_rate", "mileage", "seq")
# What the plant server shows before its first reading: skipped, and counted.
PLACEHOLDER = "BadWaitingForInitialData"


@dataclass(frozen=True)
class OpcUaNames:
    plant: str = "Plant"
    load_rate: str = "LoadRate"
    mileage: str = "Mileage"
    status: str = "Status"
    seq: str = "Seq"


@dataclass
class OpcUaStatistics:
    notifications: int = 0
    placeholders: int = 0
    readings: int = 0
    incomplete: int = 0
    connection_losses: int = 0
    resumed_at_ns: list[int] = field(default_factory=list)
    """Wall-clock ns of the first notification after each connection loss."""
    machines: int = 0
    monitored_items: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    # OPC UA DateTime is UTC by definition; asyncua may hand it over naive.
    return moment.isoformat(timespec="microseconds") + "Z"


ISO_CACHE_SIZE = 4096


def status_name(code: ua.StatusCode) -> str:
    """'Good', or the symbolic name of an Uncertain/Bad code (e.g. 'UncertainLastUsableValue')."""
    if code.is_good():
        return "Good"
    try:
        return str(code.name)
    except (AttributeError, KeyError):
        return f"0x{code.value:08X}"


class _Pending:
    """One machine's readings still waiting for a value, by timestamp, in arrival order."""

    __slots__ = ("by_ts", "last", "ordered")

    def __init__(self) -> None:
        self.by_ts: dict[str, _Entry] = {}
        self.last = ""
        # While every new timestamp sorted after the ones before it (the rule: each item's queue is FIFO and the
        # server stamps readings in order), arrival order is time order and finding the older entries needs no
        # scan of them all.
        self.ordered = True


class _Entry:
    __slots__ = ("obj", "status")

    def __init__(self, machine: str, ts: str | None) -> None:
        self.obj: dict[str, Any] = {"machine": machine, "ts": ts}
        self.status = "Good"


_COMPLETE = 2 + len(FIELDS)  # machine, ts and every field


class ReadingAssembler:
    """Per machine, join the variables' notifications by SourceTimestamp. Pure.

    ``add`` returns the payload objects that became final: complete readings,
    and older readings of the same machine that can no longer complete.
    """

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}
        self.incomplete = 0

    def add(self, machine: str, field_name: str, value: Any, ts: str | None, status: str) -> list[dict[str, Any]]:
        key = ts or ""
        pending = self._pending.get(machine)
        if pending is None:
            pending = self._pending[machine] = _Pending()
        by_ts = pending.by_ts
        entry = by_ts.get(key)
        if entry is None:
            entry = by_ts[key] = _Entry(machine, ts)
            if key < pending.last:
                pending.ordered = False
            else:
                pending.last = key
        obj = entry.obj
        obj[field_name] = value
        if status != "Good":
            entry.status = status
        # obj holds machine, ts and one key per field received.
        if len(obj) < _COMPLETE:
            return []
        if len(by_ts) == 1:  # the usual case: nothing older is pending
            by_ts.clear()
            pending.last, pending.ordered = "", True
            return [self._final(entry)]
        out = []
        # Older entries of this machine can no longer complete (FIFO per item).
        if pending.ordered:
            older = []
            for other in by_ts:
                if other == key:
                    break
                older.append(other)
        else:
            older = sorted(k for k in by_ts if k < key)
        for other in older:
            out.append(self._final(by_ts.pop(other)))
            self.incomplete += 1
        out.append(self._final(by_ts.pop(key)))
        if not by_ts:
            pending.last, pending.ordered = "", True
        return out

    def drain(self) -> list[dict[str, Any]]:
        """Everything still pending, as incomplete readings (at shutdown)."""
        out = []
        for pending in self._pending.values():
            for key in sorted(pending.by_ts):
                out.append(self._final(pending.by_ts[key]))
                self.incomplete += 1
        self._pending.clear()
        return out

    @staticmethod
    def _final(entry: _Entry) -> dict[str, Any]:
        obj = entry.obj
        obj.pop("status", None)
        if entry.status != "Good":
            obj["status"] = entry.status
        return obj


async def _client_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed client key and certificate, made once per folder."""
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from pipeline.private_key import FOLDER_MODE, write_private_key

    folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    folder.chmod(FOLDER_MODE)  # mkdir's mode passes through the umask and skips a folder that exists
    key, cert = folder / "pipeline-client-key.pem", folder / "pipeline-client-cert.der"
    # asyncua would write a new key with the umask's mode (0644 as a rule); written first, owner-only, it
    # finds the key and only makes the certificate.
    write_private_key(key)
    await setup_self_signed_certificate(
        key,
        cert,
        "urn:iiot-bench:pipeline",
        socket.gethostname(),
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        {"countryName": "XX", "organizationName": "iiot-bench", "commonName": "pipeline"},
    )
    return key, cert


def subscription_parameters(publishing_ms: float) -> ua.CreateSubscriptionParameters:
    """The subscription the source creates (the OPC UA reference's bare client creates the same)."""
    return ua.CreateSubscriptionParameters(
        RequestedPublishingInterval=publishing_ms,
        RequestedLifetimeCount=1000,
        RequestedMaxKeepAliveCount=10,
        MaxNotificationsPerPublish=0,
        PublishingEnabled=True,
        Priority=0,
    )


def monitored_item_requests(
    node_ids: list[Any], queue_size: int, sampling_ms: float, discard_oldest: bool = True
) -> list[ua.MonitoredItemCreateRequest]:
    """One request per node: value changes, with queue size, sampling and discard policy as given.

    The filter triggers on value, status OR timestamp: two readings with the
    same value (a load rate pinned at 100 %) are still two readings. Client
    handles are 1..n, unique within the subscription they are created on.
    """
    trigger = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp)
    requests = []
    for handle, node_id in enumerate(node_ids, start=1):
        params = ua.MonitoringParameters(
            ClientHandle=cast(ua.UInt32, handle),
            SamplingInterval=cast(ua.Double, sampling_ms),
            Filter=trigger,
            QueueSize=cast(ua.UInt32, queue_size),
            DiscardOldest=discard_oldest,
        )
        item = ua.ReadValueId(NodeId=node_id, AttributeId=cast(ua.UInt32, AttributeIds.Value))
        requests.append(
            ua.MonitoredItemCreateRequest(
                ItemToMonitor=item, MonitoringMode=ua.MonitoringMode.Reporting, RequestedParameters=params
            )
        )
    return requests


class _Handler:
    """What asyncua calls per notification: the source's own method, bound once (no second frame per call)."""

    def __init__(self, source: OpcUaSource) -> None:
        self.datachange_notification = source._on_notification


_NOT_GOOD = 3 << 30  # a StatusCode's severity bits: 00 is Good (ua.StatusCode.is_good)


class OpcUaSource:
    """Subscribe to a plant's variables and hand each reading to ``on_payload(bytes, topic)``: the JSON an MQTT
    publisher would send (:func:`pipeline.decode.encode_payload`). Given ``on_fields``, each reading goes to
    ``on_fields(obj, topic)`` as the object instead, unencoded (``Pipeline.submit_fields``); the callee owns it.
    """

    def __init__(
        self,
        url: str,
        on_payload: Callable[[bytes, str], None],
        *,
        on_fields: Callable[[dict[str, Any], str], None] | None = None,
        names: OpcUaNames = OpcUaNames(),
        publishing_ms: float = 100,
        sampling_ms: float = 0,
        queue_size: int = 1000,
        discard_oldest: bool = True,
        username: str | None = None,
        password: str | None = None,
        security_mode: str | None = None,
        server_certificate: Path | None = None,
        cert_dir: Path | None = None,
        reconnect_max_delay_s: float = 5.0,
        node_ids: dict[str, dict[str, str]] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.url = url
        # The run's clock: the ledger compares the resume time with the outage start the bench took from it.
        self._clock: Clock = clock or MonotonicWallClock()
        # Configured node ids (machine -> {load_rate, mileage, seq[, status]} -> "ns=2;i=7") skip the browse.
        self._node_ids = node_ids
        self._on_payload = on_payload
        self._on_fields = on_fields
        self.names = names
        self.publishing_ms = publishing_ms
        self.sampling_ms = sampling_ms
        self.queue_size = queue_size
        self.discard_oldest = discard_oldest
        self._username = username
        self._password = password
        self._security_mode = security_mode
        self._server_certificate = server_certificate
        self._cert_dir = cert_dir
        self.security_policy_uri: str | None = None
        self._reconnect_max_delay_s = reconnect_max_delay_s
        self._nodes: dict[Any, tuple[str, str]] = {}
        self._by_node: dict[int, tuple[Node, str | None, str, bool]] = {}
        self._assembler = ReadingAssembler()
        # The three values of a reading share one SourceTimestamp: converted to text once, not per value.
        self._iso_cache: dict[datetime, str | None] = {}
        self._topics: dict[str, str] = {}
        self.stats = OpcUaStatistics()
        self._awaiting_resume = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Client | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> None:
        """Connect, browse and subscribe; returns once the subscription exists."""
        ready: Future[None] = Future()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._connect())
            except BaseException as exc:  # reported to start()'s caller
                ready.set_exception(exc)
                loop.close()
                return
            ready.set_result(None)
            loop.run_forever()
            # asyncua leaves session/subscription tasks behind; end them so the loop closes cleanly.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        for name in ("asyncua",):
            logging.getLogger(name).setLevel(logging.ERROR)
        self._thread = threading.Thread(target=serve, name="opcua-source", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout_s)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(
                f"cannot subscribe to OPC UA server {self.url}: {exc.__class__.__name__}: {exc}"
            ) from None

    def close(self) -> None:
        """Disconnect; readings still waiting for a value are handed on as incomplete."""
        loop = self._loop
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._disconnect(), loop).result(30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self._loop = None
        for obj in self._assembler.drain():
            self._deliver(obj)
        self.stats.incomplete = self._assembler.incomplete

    # -- on the source's loop ---------------------------------------------------

    async def _connect(self) -> None:
        client = Client(self.url, auto_reconnect=True, reconnect_max_delay=self._reconnect_max_delay_s)
        if self._username is not None:
            client.set_user(self._username)
        if self._password is not None:
            client.set_password(self._password)
        if self._security_mode is not None:
            if self._cert_dir is None or self._server_certificate is None:
                raise SourceError("a secured OPC UA connection needs a certificate folder and the server certificate")
            pair = await _client_certificate(self._cert_dir)
            await client.set_security(
                SecurityPolicyBasic256Sha256,
                certificate=str(pair[1]),
                private_key=str(pair[0]),
                server_certificate=str(self._server_certificate),
                mode=getattr(ua.MessageSecurityMode, self._security_mode),
            )

        async def lost(exc: Exception) -> None:
            self.stats.connection_losses += 1
            self._awaiting_resume = True

        client.connection_lost_callback = lost
        await client.connect()
        self._client = client
        self.security_policy_uri = client.security_policy.URI
        machines = self._configured() if self._node_ids is not None else await self._browse(client)
        if not machines:
            raise SourceError(f"{self.url}: no machines under Objects/{self.names.plant}")
        subscription = await client.create_subscription(subscription_parameters(self.publishing_ms), _Handler(self))
        nodes = list(machines)
        requests = monitored_item_requests(nodes, self.queue_size, self.sampling_ms, self.discard_oldest)
        for start in range(0, len(requests), 500):
            await subscription.create_monitored_items(requests[start : start + 500])
        self.stats.monitored_items = len(nodes)

    def _configured(self) -> dict[Any, tuple[str, str]]:
        assert self._node_ids is not None
        found: dict[Any, tuple[str, str]] = {}
        for machine, fields in self._node_ids.items():
            missing = set(FIELDS) - set(fields)
            if missing:
                raise SourceError(f"node_ids[{machine!r}]: missing {', '.join(sorted(missing))}")
            for field_name, node_id in fields.items():
                try:
                    found[ua.NodeId.from_string(node_id)] = (machine, field_name)
                except (ValueError, UaStringParsingError) as exc:
                    raise SourceError(
                        f"node_ids[{machine!r}].{field_name}: not a node id: {node_id!r} ({exc})"
                    ) from None
        self._nodes = found
        self._by_node.clear()
        self.stats.machines = len(self._node_ids)
        return found

    async def _browse(self, client: Client) -> dict[Any, tuple[str, str]]:
        objects = client.get_objects_node()
        plant = None
        for child in await objects.get_children():
            if (await child.read_browse_name()).Name == self.names.plant:
                plant = child
                break
        if plant is None:
            raise SourceError(f"{self.url}: no Objects/{self.names.plant} folder")
        wanted = {
            self.names.load_rate: "load_rate",
            self.names.mileage: "mileage",
            self.names.status: "status",
            self.names.seq: "seq",
        }
        found: dict[Any, tuple[str, str]] = {}
        machines = 0
        for machine_node in await plant.get_children():
            machine = (await machine_node.read_browse_name()).Name
            for var in await machine_node.get_children():
                name = (await var.read_browse_name()).Name
                if name in wanted:
                    found[var.nodeid] = (machine, wanted[name])
            machines += 1
        self._nodes = found
        self._by_node.clear()
        self.stats.machines = machines
        return found

    async def _disconnect(self) -> None:
        if self._client is not None:
            await self._client.disconnect()
            self._client = None

    def _on_notification(self, node: Node, value: Any, data: Any) -> None:
        """asyncua's datachange_notification: ``data.monitored_item.Value`` is the DataValue."""
        stats = self.stats
        stats.notifications += 1
        if self._awaiting_resume:
            self._awaiting_resume = False
            stats.resumed_at_ns.append(self._clock.now_ns())
        # asyncua hands over the same Node object for every notification of an item: looking it up by identity
        # skips NodeId's hash (Python code) per notification. The cache holds the node, so its id stays its own.
        hit = self._by_node.get(id(node))
        if hit is None:
            hit = self._learn(node)
        machine = hit[1]
        if machine is None:
            return
        dv = data.monitored_item.Value
        code = dv.StatusCode
        status = "Good" if code is None or not code.value & _NOT_GOOD else status_name(code)
        by_status = stats.by_status
        by_status[status] = by_status.get(status, 0) + 1
        if status == PLACEHOLDER:
            stats.placeholders += 1
            return
        if not hit[3]:
            return  # a variable of the machine that is not a reading's field (Status)
        moment = dv.SourceTimestamp
        if moment is None:
            ts = None
        else:
            cache = self._iso_cache
            ts = cache.get(moment)
            if ts is None:
                if len(cache) >= ISO_CACHE_SIZE:
                    cache.clear()
                ts = cache[moment] = _iso(moment)
        finished = self._assembler.add(machine, hit[2], value, ts, status)
        if finished:
            for obj in finished:
                self._deliver(obj)
            stats.incomplete = self._assembler.incomplete

    def _learn(self, node: Node) -> tuple[Node, str | None, str, bool]:
        """The cache entry of a node first seen: (node, machine or None when not subscribed, field, whether the
        field is one of a reading's)."""
        if len(self._by_node) > 2 * len(self._nodes) + 64:
            self._by_node.clear()  # new Node objects per notification (another asyncua): stay bounded
        where = self._nodes.get(node.nodeid)
        hit = (node, None, "", False) if where is None else (node, where[0], where[1], where[1] in FIELDS)
        self._by_node[id(node)] = hit
        return hit

    def _deliver(self, obj: dict[str, Any]) -> None:
        self.stats.readings += 1
        machine = obj["machine"]
        topic = self._topics.get(machine)
        if topic is None:
            topic = self._topics[machine] = f"opcua/{machine}"
        if self._on_fields is not None:
            self._on_fields(obj, topic)
        else:
            self._on_payload(encode_payload(obj), topic)
