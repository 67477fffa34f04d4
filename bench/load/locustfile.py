"""Locust users that replay a scenario's stream over MQTT or OPC UA (``bench load``, or plain ``locust``).

Every user publishes whole machines of the scenario's deterministic stream
(same seed, same payloads as ``bench run``), each message at its intended send
time on one timeline shared by all workers. Open model: a slow send makes the
next ones late and the lateness is recorded, the schedule never waits. Together
the users publish every message exactly once:

1. When spawning is complete, the master (or the single local process) sends
   the *plan*: the scenario text, the epoch (first send time, ``--start-lead``
   seconds ahead) and how many users of each class every worker runs.
2. Users are numbered globally: by worker index, then in spawn order on their
   worker. User ``k`` of ``U`` owns machine ``i`` when ``i % U == k``.
3. A user that has sent its share and seen its acknowledgements stops. A worker
   whose users have all stopped sends its last statistics and tells the master,
   which quits the test when every worker has (``--run-time`` is only a guard).

Every send is a locust request: ``MQTT publish`` (response time: until PUBACK at
QoS 1, until written at QoS 0) or ``OPCUA write`` (until the Write response), so
locust's statistics, CSV and HTML report mean something. At test stop every
process that ran users writes ``sent-*.npz`` into ``--sent-dir`` (seq, intended,
sent and acknowledged times; see :class:`bench.load.runner.SentRecords`): the bench
reconciles it against what the pipeline persisted.

Run with the class named, against a broker and a pipeline already running::

    locust -f "$(python -c 'import os, bench.load as m; print(os.path.dirname(m.__file__))')/locustfile.py" \\
        MqttUser --headless -u 8 -r 8 --scenario scenarios/burst.yaml \\
        --broker-url mqtt://127.0.0.1:1883 --sent-dir sent

Workers take the custom arguments from the master; they need the package
installed, not the scenario file (its text travels in the plan).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import tempfile
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import gevent  # type: ignore[import-untyped]
import numpy as np
import paho.mqtt.client as mqtt
from asyncua.client.client import Client as UaClient
from asyncua.common.node import Node
from asyncua.ua import NodeId
from gevent.event import Event  # type: ignore[import-untyped]
from gevent.lock import Semaphore  # type: ignore[import-untyped]
from locust import User, constant, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import STATE_MISSING, LocalRunner, MasterRunner, WorkerRunner
from paho.mqtt.enums import CallbackAPIVersion

from bench.harness.ledger import payload_key
from bench.harness.runner import UNREADABLE
from bench.load.runner import PLAN_FILE, USER_CLASS, SentRecords, sent_bytes, write_sent_bytes
from bench.scenario import Scenario, apply_overrides, load_scenario
from pipeline.clock import MonotonicWallClock
from pipeline.config import resolve_env
from pipeline.mqtt_source import parse_mqtt_url
from simulators.anomalies import inject
from simulators.opcua_server import reading_values
from simulators.publisher import DEFAULT_WINDOW, REFILL, UserProperty, topic_segment
from simulators.stream import Message, stream

logger = logging.getLogger("iiot-bench.locust")
T = TypeVar("T")

PLAN_TIMEOUT_S = 120.0
REPORTS_WAIT_S = 30.0
CONNECT_TIMEOUT_S = 15.0
WRITE_TIMEOUT_S = 30.0
CLOCK_PINGS = 5
YIELD_EVERY = 64
QUIT_DELAY_S = 1.5
"""Locust rewrites its CSV every second: quitting later than that puts the last requests in it."""


# ----------------------------------------------------------------------------- command line


def _arguments(parser: Any, **_: Any) -> None:
    parser.add_argument("--scenario", default="", help="iiot-bench scenario YAML whose stream the users replay")
    parser.add_argument("--variant", default="", help="matrix variant whose transport settings apply (default: base)")
    parser.add_argument("--messages", type=int, default=0, help="send exactly N messages (0: the scenario's)")
    parser.add_argument("--broker-url", default="", help="MQTT broker, e.g. mqtt://127.0.0.1:1883 (MqttUser)")
    parser.add_argument("--opcua-url", default="", help="OPC UA server whose plant nodes are written (OpcUaUser)")
    parser.add_argument("--topic", default="", help="publish topic with {machine} (default: the scenario's)")
    parser.add_argument("--run-id", default="locust", help="fills {run} in the topic")
    parser.add_argument("--sent-dir", default="", help="folder for the sent-*.npz files the ledger reconciles")
    parser.add_argument("--start-lead", type=float, default=2.0, help="seconds from the plan to the first send")
    parser.add_argument("--ack-timeout", type=float, default=30.0, help="seconds to wait for the last PUBACKs")
    parser.add_argument(
        "--master-port-file", default="", include_in_web_ui=False, help="the master writes its bound port here"
    )


def _option(environment: Environment, name: str, default: Any) -> Any:
    options = environment.parsed_options
    return getattr(options, name, default) if options is not None else default


# ----------------------------------------------------------------------------- shared state of one process


class _Clock:
    """The master's timeline: this process's wall clock plus the offset measured against the master's."""

    def __init__(self) -> None:
        self._base = MonotonicWallClock()
        self.offset_ns = 0
        self.rtt_ns: int | None = None

    def now_ns(self) -> int:
        return self._base.now_ns() + self.offset_ns

    def local_ns(self) -> int:
        return self._base.now_ns()

    def sample(self, t0_ns: int, master_ns: int, t1_ns: int) -> None:
        """One ping: keep the estimate from the shortest round trip (NTP's rule)."""
        rtt = t1_ns - t0_ns
        if self.rtt_ns is None or rtt < self.rtt_ns:
            self.rtt_ns = rtt
            self.offset_ns = master_ns - (t0_ns + t1_ns) // 2


class _Feed:
    """One pass over the stream per process, dealt into the local users' queues as they ask for more.

    The stream is a chain (one random generator for all machines), so every
    process generates all of it and keeps its own users' messages; a user's
    queue only holds what other users' requests pulled ahead of it.
    """

    def __init__(self, messages: Iterator[Message], owner: Callable[[int], int | None]) -> None:
        self._messages = messages
        self._owner = owner
        self._queues: dict[int, deque[Message]] = {}
        self._retired: set[int] = set()

    def take(self, slot: int) -> Message | None:
        queue = self._queues.setdefault(slot, deque())
        while not queue:
            message = next(self._messages, None)
            if message is None:
                return None
            owner = self._owner(message.seq)
            if owner is not None and owner not in self._retired:
                self._queues.setdefault(owner, deque()).append(message)
        return queue.popleft()

    def retire(self, slot: int) -> None:
        """The user of ``slot`` stopped: stop keeping its messages."""
        self._retired.add(slot)
        self._queues.pop(slot, None)


class _SentLog:
    """What this process handed to the transport; written at test stop."""

    def __init__(self) -> None:
        self.seq = array("q")
        self.intended = array("q")
        self.sent = array("q")
        self.ack = array("q")
        self.copy = array("b")
        self.failed = array("q")
        self.payloads: dict[str, int] = {}

    def add(self, message: Message, sent_ns: int) -> int:
        self.seq.append(message.seq)
        self.intended.append(message.intended_send_ns)
        self.sent.append(sent_ns)
        self.ack.append(-1)
        self.copy.append(1 if message.copy else 0)
        if message.truth in UNREADABLE:
            self.payloads[payload_key(message.payload).hex()] = message.seq
        return len(self.seq) - 1

    def acked(self, index: int, ack_ns: int) -> None:
        self.ack[index] = ack_ns

    def fail(self, message: Message) -> None:
        self.failed.append(message.seq)

    def records(self, meta: dict[str, Any]) -> SentRecords:
        def ints(values: array[int]) -> Any:
            return np.frombuffer(values, dtype=np.int64).copy() if len(values) else np.zeros(0, dtype=np.int64)

        return SentRecords(
            meta,
            seq=ints(self.seq),
            intended_ns=ints(self.intended),
            sent_ns=ints(self.sent),
            ack_ns=ints(self.ack),
            copy=np.frombuffer(self.copy, dtype=np.int8).astype(np.bool_),
            failed_seq=ints(self.failed),
            payload_key=np.array(list(self.payloads), dtype=np.str_),
            payload_seq=np.array(list(self.payloads.values()), dtype=np.int64),
        )


class _AsyncioGreenlet:
    """One asyncio loop for every OPC UA user of this process, running in a greenlet.

    Under locust every thread is a greenlet of one OS thread, and asyncio allows one
    running loop per OS thread: asyncua's sync wrapper (one loop per client) fails
    at the second user ("Cannot run the event loop while another loop is
    running"). One loop in a greenlet works: gevent's selector yields to the hub
    while the loop waits, and a user waits for its coroutine's future
    cooperatively. A loop in a real OS thread measured the same (about 2,300
    writes/s with 4 users on loopback), but would run asyncio and asyncua against
    gevent-patched locks and sockets from a second thread.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._greenlet = gevent.spawn(self._serve)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._greenlet.join(5)


class _Replay:
    """What the users of one locust process share: the plan, the stream, the clock, the sent log."""

    def __init__(self) -> None:
        self.environment: Environment | None = None
        self.clock = _Clock()
        self.pong = Event()
        self.plan_ready = Event()
        self.plan: dict[str, Any] | None = None
        self.plan_made = False
        self.scenario: Scenario | None = None
        self.slots: dict[str, tuple[int, int, int]] = {}
        """user class -> (first global slot on this process, users of that class in all, here)."""
        self.feed: _Feed | None = None
        self.claimed: Counter[str] = Counter()
        self.local_users = 0
        self.finished_users = 0
        self.finish_sent = False
        self.done_workers: set[str] = set()
        self.quitting = False
        self.log = _SentLog()
        self.errors: list[str] = []
        self.loop: _AsyncioGreenlet | None = None
        self.node_ids: dict[str, list[NodeId]] | None = None
        self.browse_lock = Semaphore()
        self.worker_index = 0
        self._written: tuple[int, int] | None = None

    def claim(self, user_class: str) -> int:
        """This process's index for a new user of ``user_class`` (spawn order)."""
        index = self.claimed[user_class]
        self.claimed[user_class] += 1
        return index

    def error(self, text: str) -> None:
        logger.error(text)
        self.errors.append(text)

    def asyncio_loop(self) -> _AsyncioGreenlet:
        if self.loop is None:
            self.loop = _AsyncioGreenlet()
        return self.loop

    # -- the plan ------------------------------------------------------------------

    def apply_plan(self, plan: dict[str, Any], client_id: str) -> None:
        """Work out this process's users' machines and the stream they share; then let them go."""
        try:
            self._apply(plan, client_id)
        except Exception as exc:  # reported in the sent file and the log; the users then idle
            self.error(f"cannot apply the plan: {exc.__class__.__name__}: {exc}")
            self.slots = {}
        self.plan = plan
        self.plan_ready.set()
        if self.local_users == 0:
            self.finish()

    def _apply(self, plan: dict[str, Any], client_id: str) -> None:
        workers = sorted(plan["workers"], key=lambda w: w["index"])
        me = next((w for w in workers if w["id"] == client_id), None)
        if me is None:
            raise LookupError(f"this process ({client_id}) is not in the plan; it joined late")
        self.worker_index = int(me["index"])
        self.local_users = sum(me["users"].values())
        sc = _scenario_from_text(plan["scenario"]["name"], plan["scenario"]["text"], plan.get("variant") or "")
        self.scenario = sc
        classes = {c for w in workers for c in w["users"]}
        for cls in classes:
            offset = sum(w["users"].get(cls, 0) for w in workers if w["index"] < me["index"])
            total = sum(w["users"].get(cls, 0) for w in workers)
            self.slots[cls] = (offset, total, me["users"].get(cls, 0))
        user_class = USER_CLASS.get(sc.transport.kind)
        if user_class is None:
            raise ValueError(f"transport.kind {sc.transport.kind!r}: the locust users replay over mqtt or opcua")
        if user_class not in self.slots:
            raise ValueError(f"the scenario replays over {sc.transport.kind}: run {user_class} users")
        first, total, here = self.slots[user_class]
        if total == 0:
            raise ValueError(f"the test runs no {user_class} users; name the class: locust -f ... {user_class}")
        for cls in sorted(c for c in classes - {user_class} if self.slots[c][1]):
            logger.warning(f"{cls} users idle: the scenario replays over {sc.transport.kind} ({user_class})")
        spec = apply_overrides(sc.stream_spec(), plan.get("messages") or None)
        epoch_ns = int(plan["epoch_ns"])
        ts_epoch = None if sc.run.start is None else int(sc.run.start.timestamp() * 1e9)
        messages: Iterator[Message] = stream(spec, epoch_ns, ts_epoch)
        if sc.anomalies:
            messages = inject(
                messages,
                [a.spec() for a in sc.anomalies],
                seed=sc.seed,
                start_ns=epoch_ns,
                zones=sc.machines.zones(),
            )
        n = len(spec.machines)

        def owner(seq: int) -> int | None:
            # Machine i (message seq's machine is seq % n) belongs to global user i % total.
            local = (seq % n) % total - first
            return local if 0 <= local < here else None

        self.feed = _Feed(messages, owner)

    def slot(self, user_class: str, index: int) -> int | None:
        """The local slot of user ``index`` of ``user_class``, or None if it has nothing to send."""
        if self.scenario is None or self.feed is None or USER_CLASS.get(self.scenario.transport.kind) != user_class:
            return None
        _, _, here = self.slots.get(user_class, (0, 0, 0))
        return index if index < here else None

    # -- the end -----------------------------------------------------------------------

    def user_finished(self) -> None:
        self.finished_users += 1
        if self.finished_users >= self.local_users:
            self.finish()

    def finish(self) -> None:
        """Every local user is done: report it (a worker to the master; alone, quit)."""
        if self.finish_sent or self.environment is None:
            return
        self.finish_sent = True
        runner = self.environment.runner
        if isinstance(runner, WorkerRunner):
            runner._send_stats()  # the master must hold every request before it quits the test
            self.write_sent()  # and every record (messages from one worker arrive in order)
            runner.send_message("iiot_done", {"sent": len(self.log.seq), "failed": len(self.log.failed)})
        elif isinstance(runner, LocalRunner):
            gevent.spawn_later(QUIT_DELAY_S, runner.quit)

    def write_sent(self) -> None:
        env = self.environment
        sent_dir = _option(env, "sent_dir", "") if env is not None else ""
        if env is None or not sent_dir or self.plan is None or isinstance(env.runner, MasterRunner):
            return
        if self._written == (len(self.log.seq), len(self.log.failed)):
            return  # test_stop, then quitting: once is enough when nothing changed in between
        host, pid = socket.gethostname(), os.getpid()
        path = Path(sent_dir) / f"sent-w{self.worker_index:03d}-{host}-{pid}.npz"
        meta = {
            "file": path.name,
            "host": host,
            "pid": pid,
            "worker_index": self.worker_index,
            "runner": type(env.runner).__name__,
            "epoch_ns": int(self.plan["epoch_ns"]),
            "clock_offset_ns": self.clock.offset_ns,
            "clock_rtt_ns": self.clock.rtt_ns,
            "scenario": self.plan["scenario"]["name"],
            "users": dict(self.claimed),
            "slots": {k: list(v) for k, v in self.slots.items()},
            "errors": self.errors,
        }
        data = sent_bytes(self.log.records(meta))
        self._written = (len(self.log.seq), len(self.log.failed))
        if isinstance(env.runner, WorkerRunner):
            # The master writes it into its own --sent-dir too: workers on other machines need no copying.
            env.runner.send_message("iiot_sent", {"name": path.name, "data": data})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_sent_bytes(path, data)
        except OSError as exc:
            logger.error(f"cannot write {path}: {exc}")
            return
        logger.info(f"wrote {path} ({len(self.log.seq)} sent, {len(self.log.failed)} failed)")


_REPLAY = _Replay()


def _scenario_from_text(name: str, text: str, variant: str) -> Scenario:
    with tempfile.TemporaryDirectory(prefix="iiot-bench-locust-") as tmp:
        path = Path(tmp) / (Path(name).name or "scenario.yaml")
        path.write_text(text, encoding="utf-8")
        loaded = load_scenario(path)
    if not variant:
        return loaded.scenario
    variants = dict(loaded.variants)
    if variant not in variants:
        raise ValueError(f"--variant {variant}: no such variant in {name} ({', '.join(variants)})")
    return variants[variant]


# ----------------------------------------------------------------------------- master and workers


def _on_init(environment: Environment, **_: Any) -> None:
    _REPLAY.environment = environment
    # asyncua logs every request at INFO: the worker logs would be mostly that.
    logging.getLogger("asyncua").setLevel(logging.WARNING)
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        runner.register_message("iiot_clock", _on_clock_ping)
        runner.register_message("iiot_done", _on_worker_done)
        runner.register_message("iiot_sent", _on_sent_file)
        port_file = _option(environment, "master_port_file", "")
        if port_file:
            # bench load binds the master to port 0 (no clash on 5557) and learns the port here.
            tmp = Path(port_file).with_name(Path(port_file).name + ".tmp")
            tmp.write_text(str(runner.server.port), encoding="utf-8")
            os.replace(tmp, port_file)
    elif isinstance(runner, WorkerRunner):
        client_id = runner.client_id
        runner.register_message("iiot_plan", lambda environment, msg, **_: _REPLAY.apply_plan(msg.data, client_id))
        runner.register_message("iiot_clock_reply", _on_clock_reply)
        gevent.spawn(_sync_clock, runner)


def _sync_clock(runner: WorkerRunner) -> None:
    """A few pings to the master: its clock is the timeline (workers may run on other machines)."""
    for _ in range(CLOCK_PINGS):
        _REPLAY.pong.clear()
        runner.send_message("iiot_clock", {"t0": _REPLAY.clock.local_ns()})
        _REPLAY.pong.wait(2.0)
    logger.info(
        f"clock offset to the master {_REPLAY.clock.offset_ns / 1e6:+.3f} ms "
        f"(round trip {(_REPLAY.clock.rtt_ns or 0) / 1e6:.3f} ms)"
    )


def _on_clock_ping(environment: Environment, msg: Any, **_: Any) -> None:
    assert environment.runner is not None
    reply = {"t0": msg.data["t0"], "master_ns": _REPLAY.clock.now_ns()}
    environment.runner.send_message("iiot_clock_reply", reply, client_id=msg.node_id)


def _on_clock_reply(environment: Environment, msg: Any, **_: Any) -> None:
    _REPLAY.clock.sample(int(msg.data["t0"]), int(msg.data["master_ns"]), _REPLAY.clock.local_ns())
    _REPLAY.pong.set()


def _on_spawning_complete(user_count: int, **_: Any) -> None:
    env = _REPLAY.environment
    if env is None or _REPLAY.plan_made or not isinstance(env.runner, MasterRunner | LocalRunner):
        return
    _REPLAY.plan_made = True
    gevent.spawn(_make_plan, env)


def _make_plan(environment: Environment) -> None:
    runner = environment.runner
    path = Path(_option(environment, "scenario", ""))
    try:
        text = path.read_text(encoding="utf-8")
        _scenario_from_text(path.name, text, _option(environment, "variant", ""))
    except Exception as exc:  # a bad --scenario ends the test at once, with the reason in the log
        logger.error(f"--scenario {path}: {exc}")
        environment.process_exit_code = 2
        assert runner is not None
        gevent.spawn(runner.quit)
        return
    if isinstance(runner, MasterRunner):
        # Wait until every worker has reported its users: the plan numbers them.
        deadline = time.monotonic() + REPORTS_WAIT_S
        while time.monotonic() < deadline:
            active = [c for c in runner.clients.values() if c.state != STATE_MISSING]
            if sum(c.user_count for c in active) >= runner.target_user_count:
                break
            gevent.sleep(0.05)
        workers = [
            {"index": runner.worker_indexes[c.id], "id": c.id, "users": dict(c.user_classes_count)}
            for c in runner.clients.values()
            if c.state != STATE_MISSING
        ]
    else:
        assert isinstance(runner, LocalRunner)
        workers = [{"index": 0, "id": runner.client_id, "users": dict(runner.user_classes_count)}]
    now = _REPLAY.clock.now_ns()
    plan = {
        "epoch_ns": now + int(float(_option(environment, "start_lead", 2.0)) * 1e9),
        "master_ns": now,
        "scenario": {"name": path.name, "text": text},
        "variant": _option(environment, "variant", ""),
        "messages": int(_option(environment, "messages", 0)),
        "workers": sorted(workers, key=lambda w: w["index"]),
    }
    users = sum(sum(w["users"].values()) for w in workers)
    lead_s = (plan["epoch_ns"] - now) / 1e9
    logger.info(f"plan: {users} users on {len(workers)} process(es); first send in {lead_s:g} s")
    _write_plan(environment, plan)
    if isinstance(runner, MasterRunner):
        runner.send_message("iiot_plan", plan)
    else:
        _REPLAY.apply_plan(plan, runner.client_id)


def _write_plan(environment: Environment, plan: dict[str, Any]) -> None:
    sent_dir = _option(environment, "sent_dir", "")
    if not sent_dir:
        return
    workers = [{**w, "host": w["id"].rsplit("_", 1)[0]} for w in plan["workers"]]  # locust ids are host_uuid
    record = {**plan, "scenario": {"name": plan["scenario"]["name"]}, "workers": workers}
    path = Path(sent_dir) / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(PLAN_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _on_sent_file(environment: Environment, msg: Any, **_: Any) -> None:
    """A worker's sent records: written into the master's --sent-dir (same name as the worker's own copy)."""
    name, sent_dir = str(msg.data["name"]), _option(environment, "sent_dir", "")
    if not sent_dir or Path(name).name != name or not name.startswith("sent-") or not name.endswith(".npz"):
        return
    path = Path(sent_dir) / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_sent_bytes(path, bytes(msg.data["data"]))
    except OSError as exc:
        logger.error(f"cannot write {path}: {exc}")
        return
    logger.info(f"wrote {path} for worker {msg.node_id}")


def _on_worker_done(environment: Environment, msg: Any, **_: Any) -> None:
    _REPLAY.done_workers.add(msg.node_id)
    runner = environment.runner
    assert isinstance(runner, MasterRunner)
    expected = {c.id for c in runner.clients.values() if c.state != STATE_MISSING}
    if expected <= _REPLAY.done_workers and not _REPLAY.quitting:
        _REPLAY.quitting = True
        logger.info(f"all {len(expected)} workers have sent their share; quitting")
        gevent.spawn_later(QUIT_DELAY_S, runner.quit)


def _on_test_stop(**_: Any) -> None:
    _REPLAY.write_sent()


def _on_quitting(**_: Any) -> None:
    _REPLAY.write_sent()
    if _REPLAY.loop is not None:
        _REPLAY.loop.close()


def _listen(hook: Any, handler: Callable[..., None]) -> None:
    hook.add_listener(handler)  # locust's EventHook is untyped


_listen(events.init_command_line_parser, _arguments)
_listen(events.init, _on_init)
_listen(events.spawning_complete, _on_spawning_complete)
_listen(events.test_stop, _on_test_stop)
_listen(events.quitting, _on_quitting)


# ----------------------------------------------------------------------------- the users


class _ReplayUser(User):
    """Replays its share of the stream once, then stops. Subclasses connect and send."""

    abstract = True
    wait_time = constant(0)
    request_type = ""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self._index = _REPLAY.claim(type(self).__name__)
        self._ran = False
        # Set by a subclass whose transport stopped answering: the rest of the share fails without pacing.
        self._gave_up = False

    @task
    def replay(self) -> None:
        if self._ran:
            raise StopUser()
        self._ran = True
        slot: int | None = None
        try:
            if not _REPLAY.plan_ready.wait(PLAN_TIMEOUT_S):
                _REPLAY.error(f"{type(self).__name__} {self._index}: no plan from the master in {PLAN_TIMEOUT_S:g} s")
                return
            slot = _REPLAY.slot(type(self).__name__, self._index)
            if slot is None:
                return
            self._run(slot)
        except Exception as exc:  # reported; the user's unsent messages show as not published
            _REPLAY.error(f"{type(self).__name__} {self._index}: {exc.__class__.__name__}: {exc}")
        finally:
            if slot is not None and _REPLAY.feed is not None:
                _REPLAY.feed.retire(slot)
            self._close()
            _REPLAY.user_finished()
        raise StopUser()

    def _run(self, slot: int) -> None:
        feed = _REPLAY.feed
        assert feed is not None
        started = time.perf_counter()
        try:
            self._connect()
        except Exception as exc:
            self._report("connect", started, 0, exc)
            # Nothing of this share can go: say so per message, so it shows in locust's failures too.
            while (message := feed.take(slot)) is not None:
                _REPLAY.log.fail(message)
                self._report("publish" if self.request_type == "MQTT" else "write", time.perf_counter(), 0, exc)
            return
        self._report("connect", started, 0)
        clock = _REPLAY.clock
        n = 0
        while (message := feed.take(slot)) is not None:
            delay_s = (message.intended_send_ns - clock.now_ns()) / 1e9
            if delay_s > 0 and not self._gave_up:
                gevent.sleep(delay_s)
            elif n % YIELD_EVERY == 0:
                gevent.sleep(0)  # behind schedule: still let the acks and the other users in
            self._send(message)
            n += 1
        self._finish_sends()

    def _report(self, name: str, started: float, size: int, exc: BaseException | None = None, ms: float = -1) -> None:
        self.environment.events.request.fire(
            request_type=self.request_type,
            name=name,
            response_time=ms if ms >= 0 else (time.perf_counter() - started) * 1000,
            response_length=size,
            exception=exc,
            context={},
        )

    def _connect(self) -> None:
        raise NotImplementedError

    def _send(self, message: Message) -> None:
        raise NotImplementedError

    def _finish_sends(self) -> None:
        """Wait for what is still unacknowledged (bounded)."""

    def _close(self) -> None:
        """Disconnect; must be safe to call twice and before connecting."""

    def on_stop(self) -> None:
        self._close()


class _Unacknowledged(Exception):
    pass


class MqttUser(_ReplayUser):
    """Publishes its machines' messages over MQTT (paho, one connection per user, the scenario's QoS).

    At QoS > 0 at most ``DEFAULT_WINDOW`` publishes await their acknowledgement,
    as in :class:`simulators.publisher.PacedPublisher` (paho refuses a publish
    whose 16-bit message id is still pending); waiting for room is part of the
    send lag. With the window full and no acknowledgement for ``--ack-timeout``
    seconds, the rest of the user's share fails at once, each a reported failure.
    """

    request_type = "MQTT"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self._client: mqtt.Client | None = None
        self._pending: dict[int, tuple[int, float, int]] = {}  # mid -> (log index, started, size)
        self._early: dict[int, float] = {}  # mid acknowledged before publish() returned (QoS 0 does)
        self._drained = Event()
        self._room = Event()  # set when a full window has room again
        self._low_water = DEFAULT_WINDOW - min(DEFAULT_WINDOW // 2, REFILL)
        self._last_ack = 0.0
        self._topic = ""
        self._qos = 1
        self._seq_property: str | None = None

    def _connect(self) -> None:
        env, sc = self.environment, _REPLAY.scenario
        assert sc is not None
        mq = sc.transport.mqtt
        url = _option(env, "broker_url", "") or (mq.broker if mq.broker != "embedded" else "")
        if not url:
            raise ValueError("the scenario's broker is 'embedded': give --broker-url mqtt://host:port")
        host, port = parse_mqtt_url(url)
        self._topic = (_option(env, "topic", "") or mq.topic).replace("{run}", _option(env, "run_id", "locust"))
        self._qos = mq.qos
        client_id = f"{_option(env, 'run_id', 'locust')}-{socket.gethostname()}-{os.getpid()}-{self._index}"
        # transport.mqtt.seq_property: MQTT 5, each seq also as a user property (the payload keeps it too).
        self._seq_property = mq.seq_property
        protocol = mqtt.MQTTv5 if mq.seq_property is not None else mqtt.MQTTv311
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id[:128], protocol=protocol)
        username = resolve_env(mq.username, "transport.mqtt.username")
        if username is not None:
            client.username_pw_set(username, resolve_env(mq.password, "transport.mqtt.password"))
        # No in-flight limit inside paho: the window is the limit (paho's own queues the excess out of sight
        # of the send lag and rescans it on every acknowledgement).
        client.max_inflight_messages_set(0)
        connected, refused = Event(), []

        def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            if reason.is_failure:
                refused.append(str(reason))
            connected.set()

        client.on_connect = on_connect
        client.on_publish = self._on_publish
        self._client = client
        client.connect(host, port, keepalive=30)
        client.loop_start()
        if not connected.wait(CONNECT_TIMEOUT_S) or refused:
            raise ConnectionError(f"MQTT broker {host}:{port} refused: {refused[0] if refused else 'no CONNACK'}")

    def _send(self, message: Message) -> None:
        assert self._client is not None
        topic = self._topic.format(machine=topic_segment(message.machine), seq=message.seq)
        size = len(message.payload)
        if self._qos > 0 and (self._gave_up or not self._wait_for_room()):
            self._gave_up = True
            timeout = float(_option(self.environment, "ack_timeout", 30.0))
            _REPLAY.log.fail(message)
            why = f"no acknowledgement within {timeout:g} s with {DEFAULT_WINDOW:,} publishes unacknowledged"
            self._report("publish", time.perf_counter(), size, _Unacknowledged(why))
            return
        # Taken after any wait for room: that wait is part of the send lag.
        started, sent_ns = time.perf_counter(), _REPLAY.clock.now_ns()
        try:
            props = UserProperty(self._seq_property, str(message.seq)) if self._seq_property is not None else None
            info = self._client.publish(topic, message.payload, qos=self._qos, properties=props)
        except ValueError as exc:
            _REPLAY.log.fail(message)
            self._report("publish", started, size, exc)
            return
        # QoS > 0 while reconnecting: paho keeps the message and sends it on reconnect, so it is sent.
        if info.rc != mqtt.MQTT_ERR_SUCCESS and not (info.rc == mqtt.MQTT_ERR_NO_CONN and self._qos > 0):
            _REPLAY.log.fail(message)
            self._report("publish", started, size, ConnectionError(mqtt.error_string(info.rc)))
            return
        index = _REPLAY.log.add(message, sent_ns)
        acked_at = self._early.pop(info.mid, None)
        if acked_at is None:
            self._pending[info.mid] = (index, started, size)
        else:
            self._complete(index, started, size, acked_at)

    def _wait_for_room(self) -> bool:
        """Wait while the window is full; False when no acknowledgement came for ``--ack-timeout`` seconds."""
        if len(self._pending) < DEFAULT_WINDOW:
            return True
        timeout = float(_option(self.environment, "ack_timeout", 30.0))
        self._last_ack = max(self._last_ack, time.perf_counter())
        while len(self._pending) > self._low_water:
            silent = time.perf_counter() - self._last_ack
            if silent >= timeout:
                return False
            # Greenlets: nothing runs between clear() and wait(), so no acknowledgement's set() is missed.
            self._room.clear()
            self._room.wait(min(timeout - silent, 1.0))
        return True

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        now = time.perf_counter()
        entry = self._pending.pop(mid, None)
        if entry is None:
            self._early[mid] = now
            return
        self._last_ack = now
        if len(self._pending) <= self._low_water:
            self._room.set()
        if reason is not None and getattr(reason, "is_failure", False):
            self._report("publish", entry[1], entry[2], ConnectionError(f"broker refused: {reason}"))
        else:
            self._complete(*entry, now)
        if not self._pending:
            self._drained.set()

    def _complete(self, index: int, started: float, size: int, acked_at: float) -> None:
        _REPLAY.log.acked(index, _REPLAY.log.sent[index] + round((acked_at - started) * 1e9))
        self._report("publish", started, size, ms=(acked_at - started) * 1000)

    def _finish_sends(self) -> None:
        timeout = float(_option(self.environment, "ack_timeout", 30.0))
        if self._pending:
            self._drained.clear()
            self._drained.wait(timeout)
        for _, started, size in self._pending.values():
            self._report("publish", started, size, _Unacknowledged(f"no acknowledgement within {timeout:g} s"))
        self._pending.clear()

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()


class OpcUaUser(_ReplayUser):
    """Writes its machines' readings into the plant server's nodes (asyncua; one session per user).

    Like :class:`simulators.opcua_writer.RemotePlant`: the four values of a
    reading (LoadRate, Mileage, Status, Seq) in one Write request, sharing the
    reading's SourceTimestamp. Writes of one user follow each other (the server
    sees a machine's readings in order); users write in parallel.
    """

    request_type = "OPCUA"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self._client: UaClient | None = None
        self._nodes: dict[str, list[Node]] = {}

    def _connect(self) -> None:
        env, sc = self.environment, _REPLAY.scenario
        assert sc is not None
        ua_cfg = sc.transport.opcua
        url = _option(env, "opcua_url", "") or (ua_cfg.server if ua_cfg.server != "embedded" else "")
        if not url:
            raise ValueError("the scenario's server is 'embedded': give --opcua-url opc.tcp://host:port/path")
        loop = _REPLAY.asyncio_loop()
        client = UaClient(url, timeout=10)
        username = resolve_env(ua_cfg.username, "transport.opcua.username")
        if username is not None:
            client.set_user(username)
            password = resolve_env(ua_cfg.password, "transport.opcua.password")
            if password is not None:
                client.set_password(password)
        loop.call(client.connect(), CONNECT_TIMEOUT_S)
        self._client = client
        with _REPLAY.browse_lock:
            # Browsed once per process; the other users reuse the node ids.
            if _REPLAY.node_ids is None:
                _REPLAY.node_ids = loop.call(_browse(client, ua_cfg.plant), 60)
        self._nodes = {m: [client.get_node(n) for n in ids] for m, ids in _REPLAY.node_ids.items()}

    def _send(self, message: Message) -> None:
        assert self._client is not None and _REPLAY.loop is not None
        started, sent_ns = time.perf_counter(), _REPLAY.clock.now_ns()
        size = len(message.payload)
        try:
            nodes = self._nodes.get(message.machine)
            if nodes is None:
                raise LookupError(f"the server has no writable Objects/<plant>/{message.machine}")
            _REPLAY.loop.call(self._client.write_values(nodes, reading_values(message.payload)), WRITE_TIMEOUT_S)
        except Exception as exc:
            _REPLAY.log.fail(message)
            self._report("write", started, size, exc)
            return
        done = time.perf_counter()
        index = _REPLAY.log.add(message, sent_ns)
        _REPLAY.log.acked(index, sent_ns + round((done - started) * 1e9))
        self._report("write", started, size, ms=(done - started) * 1000)

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None and _REPLAY.loop is not None:
            try:
                _REPLAY.loop.call(client.disconnect(), 10)
            except Exception as exc:  # closing after a failure: nothing more to do than say it
                logger.warning(f"OPC UA disconnect: {exc.__class__.__name__}: {exc}")


async def _browse(client: UaClient, plant_name: str) -> dict[str, list[NodeId]]:
    """Objects/<plant>/<machine>/{LoadRate, Mileage, Status, Seq} -> node ids, in that order."""
    plant = None
    for child in await client.nodes.objects.get_children():
        if (await child.read_browse_name()).Name == plant_name:
            plant = child
    if plant is None:
        raise LookupError(f"no Objects/{plant_name} folder on the server")
    order = ("LoadRate", "Mileage", "Status", "Seq")
    out: dict[str, list[NodeId]] = {}
    for machine_node in await plant.get_children():
        machine = str((await machine_node.read_browse_name()).Name)
        by_name = {str((await v.read_browse_name()).Name): v.nodeid for v in await machine_node.get_children()}
        if all(n in by_name for n in order):
            out[machine] = [by_name[n] for n in order]
    return out
