"""One session: the transport's plant side, the system under test, the drain and a teardown that runs once.

``bench run`` (per variant), ``bench load`` and ``bench capacity`` (per step) all start their broker or plant
server and their system under test here; what publishes into the transport (paced publishers, locust users,
publisher processes) is theirs. Transports are chosen by name from :data:`TRANSPORTS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from bench.errors import ScenarioError, ServiceError
from bench.harness.sut import SourceSpec, SystemUnderTest
from bench.scenario import SEQ_PROPERTY_NEEDS_MQTT5, Scenario
from pipeline.config import MqttSourceSettings, OpcUaSourceSettings, resolve_env
from pipeline.errors import ConfigError, PipelineError
from simulators.broker import EmbeddedBroker
from simulators.errors import SimulatorError
from simulators.mosquitto import ManagedMosquitto

if TYPE_CHECKING:
    from bench.harness.proxy import FaultProxy

    # OPC UA (asyncua) is imported only by sessions that use it: it is half of a new process's import time,
    # and every gate replicate is a new process.
    from simulators.opcua_server import PlantServer
    from simulators.opcua_writer import RemotePlant


@dataclass(frozen=True)
class Credentials:
    """The transport's credentials, resolved from the environment before anything starts."""

    mqtt_username: str | None
    mqtt_password: str | None
    opcua_username: str | None
    opcua_password: str | None

    @classmethod
    def of(cls, sc: Scenario, where: Path) -> Credentials:
        t = sc.transport
        try:
            return cls(
                resolve_env(t.mqtt.username, "transport.mqtt.username"),
                resolve_env(t.mqtt.password, "transport.mqtt.password"),
                resolve_env(t.opcua.username, "transport.opcua.username"),
                resolve_env(t.opcua.password, "transport.opcua.password"),
            )
        except ConfigError as exc:
            raise ScenarioError(f"{where}: {exc}") from None


@dataclass
class Endpoints:
    """What one session's transport offers: where publishers send, and what the system under test subscribes."""

    sources: list[SourceSpec] = field(default_factory=list)
    mqtt_url: str | None = None
    mqtt_topic: str | None = None
    """The publish pattern, ``{machine}`` left for the publisher."""
    opcua_url: str | None = None
    plant: PlantServer | None = None
    remote_plant: RemotePlant | None = None
    broker: EmbeddedBroker | ManagedMosquitto | None = None
    """The broker the bench started for this session's MQTT transport (a broker_restart fault restarts it)."""
    mqtt_proxy: FaultProxy | None = None
    """Between the system under test and the broker, when a broker_partition fault needs one."""

    @property
    def writer(self) -> PlantServer | RemotePlant | None:
        """What writes readings into the OPC UA server the system under test subscribes to."""
        return self.plant or self.remote_plant


@dataclass(frozen=True)
class SessionConfig:
    """Everything a transport needs to open one session."""

    scenario: Scenario
    scenario_path: Path
    run_id: str
    out_dir: Path
    broker_url: str | None
    """The resolved broker URL (the embedded one's, or the user's) for MQTT transports."""
    opcua_machines: Sequence[str]
    credentials: Credentials
    clock: Any
    broker: EmbeddedBroker | ManagedMosquitto | None = None
    partition: bool = False
    """Put a fault proxy between the system under test and the broker (publishers keep the direct route)."""


class Transport(Protocol):
    def __call__(self, config: SessionConfig, stack: ExitStack, endpoints: Endpoints) -> None: ...


def _mqtt(config: SessionConfig, stack: ExitStack, endpoints: Endpoints) -> None:
    mq, creds = config.scenario.transport.mqtt, config.credentials
    assert config.broker_url is not None
    if mq.seq_property is not None and isinstance(config.broker, EmbeddedBroker):
        # The scenario refuses it with broker: embedded; this catches --broker embedded on the command line.
        raise ScenarioError(f"{config.scenario_path}: transport.mqtt.{SEQ_PROPERTY_NEEDS_MQTT5}")
    endpoints.mqtt_url = config.broker_url
    endpoints.mqtt_topic = mq.topic_for_run(config.run_id)
    # A crash-safe pipeline keeps its broker session across restarts and acknowledges only durable messages;
    # the client id is the run's, so a restarted process finds the session it left.
    crash_safe = config.scenario.pipeline.durability == "crash_safe"
    endpoints.broker = config.broker
    source_url = config.broker_url
    if config.partition:
        from bench.harness.proxy import FaultProxy

        where = urlsplit(config.broker_url)
        proxy = FaultProxy(where.hostname or "127.0.0.1", where.port or 1883).start()
        stack.callback(proxy.close)
        endpoints.mqtt_proxy = proxy
        source_url = f"{where.scheme}://127.0.0.1:{proxy.port}"
    settings = MqttSourceSettings.model_construct(
        url=source_url,
        topic=mq.subscription(config.run_id),
        qos=mq.qos,
        client_id=f"{config.run_id}-pipeline",
        session="persistent" if crash_safe else "clean",
        ack="durable" if crash_safe else "on_receive",
        username=mq.username,
        password=mq.password,
    )
    endpoints.sources.append(SourceSpec(settings, {"section": "transport.mqtt"}))
    del creds  # resolved up front only to fail early; the source resolves its own


def _opcua(config: SessionConfig, stack: ExitStack, endpoints: Endpoints) -> None:
    from simulators.opcua_server import NodeNames, PlantServer
    from simulators.opcua_writer import RemotePlant

    ua, creds = config.scenario.transport.opcua, config.credentials
    secure = None if ua.security == "None" else ua.security
    server_cert: Path | None = None
    if ua.server == "embedded":
        plant = PlantServer(
            list(config.opcua_machines),
            names=NodeNames(plant=ua.plant),
            security_mode=secure,
            cert_dir=config.out_dir / "certs",
            users={creds.opcua_username: creds.opcua_password or ""} if creds.opcua_username is not None else None,
        ).start()
        stack.callback(plant.close)
        endpoints.plant, endpoints.opcua_url, server_cert = plant, plant.url, plant.server_cert
    else:
        if secure is not None:
            raise ScenarioError(
                f"{config.scenario_path}: transport.opcua.security: with an external server, run the pipeline "
                "on its own (python -m pipeline) with the server's certificate"
            )
        remote = RemotePlant(
            ua.server, names=NodeNames(plant=ua.plant), username=creds.opcua_username, password=creds.opcua_password
        ).start()
        stack.callback(remote.close)
        endpoints.remote_plant, endpoints.opcua_url = remote, ua.server
    settings = OpcUaSourceSettings.model_construct(
        url=endpoints.opcua_url,
        plant=ua.plant,
        publishing=ua.publishing,
        sampling=ua.sampling,
        queue_size=ua.queue_size,
        discard_oldest=ua.discard_oldest,
        security=ua.security,
        server_certificate=str(server_cert) if server_cert is not None else None,
        cert_dir="certs",
        allow_outside_output=False,
        username=ua.username,
        password=ua.password,
        node_ids=None,
    )
    # A plant server restart should cost seconds, not the library's 30 s backoff cap.
    endpoints.sources.append(SourceSpec(settings, {"section": "transport.opcua", "reconnect_max_delay_s": 2.0}))


def _memory(config: SessionConfig, stack: ExitStack, endpoints: Endpoints) -> None:
    """Nothing to start: the publishers hand payloads to the system under test in this process."""
    endpoints.mqtt_topic = config.scenario.transport.mqtt.topic_for_run(config.run_id)


def _both(config: SessionConfig, stack: ExitStack, endpoints: Endpoints) -> None:
    _mqtt(config, stack, endpoints)
    _opcua(config, stack, endpoints)


TRANSPORTS: dict[str, Transport] = {"mqtt": _mqtt, "opcua": _opcua, "memory": _memory, "both": _both}


@contextmanager
def service_errors() -> Iterator[None]:
    """A broker, server or pipeline that cannot start is a service problem (exit 1), not a traceback."""
    try:
        yield
    except (SimulatorError, PipelineError) as exc:
        raise ServiceError(str(exc)) from None


class BrokerSet(dict[str, str]):
    """kind -> URL of the brokers the bench started, and the brokers themselves (a fault restarts them)."""

    def __init__(self) -> None:
        super().__init__()
        self.servers: dict[str, EmbeddedBroker | ManagedMosquitto] = {}


@contextmanager
def managed_brokers(kinds: set[str], folder: Path) -> Iterator[BrokerSet]:
    """The brokers the bench starts itself (``embedded``, ``mosquitto``) while the block runs: kind -> URL."""
    with ExitStack() as stack:
        urls = BrokerSet()
        if "embedded" in kinds:
            broker = stack.enter_context(embedded_broker(True, folder / "broker.log"))
            assert broker is not None
            urls["embedded"] = broker.url
            urls.servers["embedded"] = broker
        if "mosquitto" in kinds:
            with service_errors():
                mosquitto = ManagedMosquitto(folder / "mosquitto").start()
            stack.callback(mosquitto.close)
            urls["mosquitto"] = mosquitto.url
            urls.servers["mosquitto"] = mosquitto
        yield urls


@contextmanager
def embedded_broker(needed: bool, log_path: Path) -> Iterator[EmbeddedBroker | None]:
    """The embedded broker while the block runs (None when not needed); stopped after it."""
    if not needed:
        yield None
        return
    with service_errors():
        broker = EmbeddedBroker(log_path=log_path).start()
    try:
        yield broker
    finally:
        broker.close()


class Session:
    """One system under test behind one transport; ``with Session(...) as s:`` tears everything down once.

    ``start`` opens the transport and starts the system under test (ready: subscribed); ``stop`` stops it
    gracefully (sources first, then flush and finalise) so it can be read back; anything still running when
    the block ends (a failure, an interrupt) is closed then, in reverse order of starting.
    """

    def __init__(self, config: SessionConfig, sut: SystemUnderTest) -> None:
        self.config = config
        self.sut = sut
        self.endpoints = Endpoints()
        self._stack = ExitStack()
        self._failing = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._failing = exc_type is not None
        self._stack.close()

    def _stop_sut(self) -> None:
        if not self._failing:
            self.sut.stop()
            return
        # Already failing: stop what can be stopped, and let the first error be the one reported.
        with suppress(Exception):
            self.sut.stop()

    def start(self) -> Endpoints:
        # Registered first, so it is stopped last (after the plant side) and even when it never started:
        # a pipeline's files are finalised whatever failed.
        self._stack.callback(self._stop_sut)
        with service_errors():
            TRANSPORTS[self.config.scenario.transport.kind](self.config, self._stack, self.endpoints)
            self.sut.start(self.endpoints.sources)
        return self.endpoints

    def on_close(self, close: Callable[[], Any]) -> None:
        """Close ``close``'s owner (a publisher, a load generator) with the session, before the transport."""
        self._stack.callback(close)

    def stop(self) -> None:
        self.sut.stop()


QUIET_S = 1.5
"""After a fault, the drain also waits until nothing has arrived for this long (redelivered copies count)."""


def wait_quiet(
    received: Callable[[], int], quiet_s: float, timeout_s: float, tick: Callable[[], Any], every_s: float
) -> None:
    """Wait until ``received()`` has not changed for ``quiet_s``, or ``timeout_s`` in all."""
    deadline = time.monotonic() + timeout_s
    last, last_change = received(), time.monotonic()
    while time.monotonic() < deadline:
        tick()
        time.sleep(every_s)  # polling a counter of another thread or process
        now = received()
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            return


def wait_received(
    received: Callable[[], int], expected: int, idle_timeout_s: float, tick: Callable[[], Any], every_s: float
) -> None:
    """Drain: wait until ``received()`` reaches ``expected``, or makes no progress for ``idle_timeout_s``.

    Stopping on no progress rather than on a fixed deadline lets a slow pipeline finish a long backlog while a
    loss (nothing more will come) ends the wait; the ledger then shows what is missing.
    """
    last, last_change = -1, time.monotonic()
    while True:
        now_received = received()
        if now_received >= expected:
            return
        if now_received != last:
            last, last_change = now_received, time.monotonic()
        elif time.monotonic() - last_change > idle_timeout_s:
            return
        tick()
        time.sleep(every_s)  # polling a counter; nothing to wait on across threads or processes
