"""``bench capacity`` against a pipeline the user brings (system.kind external): a fresh start per step, the
ledger by read-back, the step's CPU from its process tree, and the sustainable rate of *that* pipeline."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.capacity import sweep
from bench.errors import ScenarioError
from bench.scenario import load_scenario

# An external pipeline with a known ceiling: each message costs it SLEEP_S of wall time (one thread), so it can
# take at most 1 / SLEEP_S = 200 msg/s whatever the machine's load, and fewer on a busy machine.
SLOW = """
import json, signal, sys, time
from urllib.parse import urlsplit
import paho.mqtt.client as mqtt

url, topic, out = sys.argv[1], sys.argv[2], sys.argv[3]
where = urlsplit(url)
f = open(out, "a", buffering=1)

def on_message(client, userdata, msg):
    time.sleep(0.005)
    d = json.loads(msg.payload)
    f.write(json.dumps({"seq": d["seq"], "machine": d["machine"]}) + "\\n")

c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
c.on_message = on_message
c.on_subscribe = lambda *a: print("slow: subscribed", flush=True)
c.on_connect = lambda client, userdata, flags, rc, props: client.subscribe(topic, qos=1)
c.connect(where.hostname, where.port)
signal.signal(signal.SIGTERM, lambda *a: (c.disconnect(), f.close(), sys.exit(0)))
c.loop_forever()
"""

# Margins, not statistics, keep the verdicts from flaking: at 40 msg/s the pipeline has 5x headroom over its
# 200 msg/s ceiling and needs only 80% of the offered rate (threshold 0.8); at 400 msg/s it can achieve at most
# 200 / 400 = 0.5 of it, far below 0.8 however busy the machine (a busy machine only lowers the ceiling).
SCENARIO = """
name: external-capacity
seed: 3
machines: {count: 4}
transport: {kind: mqtt, mqtt: {qos: 1}}
system:
  kind: external
  external:
    command: [PYTHON, slow.py, "{broker_url}", "{topic}", "{out_dir}/out.jsonl"]
    ready: {log: "subscribed", timeout: 30s}
    output: {format: jsonl, path: "{out_dir}/out.jsonl"}
phases:
  - {kind: steady, rate: 40, duration: 2s}
run: {drain_timeout: 10s}
capacity:
  rates: [40, 400]
  step: 3s
  settle: 0.5s
  threshold: 0.8
  backlog_growth: 0.1
  workers: [1]
  publishers: 1
"""


def _scenario(tmp_path: Path, write_scenario: Callable[[str], Path], text: str = SCENARIO) -> Path:
    (tmp_path / "slow.py").write_text(SLOW, encoding="utf-8")
    return write_scenario(text.replace("PYTHON", sys.executable))


def test_capacity_finds_the_sustainable_rate_of_an_external_pipeline(
    tmp_path: Path, write_scenario: Callable[[str], Path]
) -> None:
    path = _scenario(tmp_path, write_scenario)
    outcome = sweep.run_capacity(load_scenario(path), sweep.CapacityOptions(out=tmp_path / "cap", report=False))
    assert outcome.ok, outcome.problems
    cap = outcome.results.capacity
    assert cap is not None
    (series,) = cap.series
    assert [s.verdict for s in series.steps] == ["sustainable", "unsustainable"]
    assert series.sustainable_per_s == 40
    slow, fast = series.steps
    assert slow.ledger is not None and slow.ledger.sent == slow.ledger.persisted == 120 and slow.lost == 0
    # Read back from its own output: at 400 msg/s it kept up with at most half.
    assert fast.achieved_ratio is not None and fast.achieved_ratio < 0.6
    # Its own process tree's CPU and memory, not a built-in worker's; no flush or lock probes (absent, not 0).
    assert slow.cpu_pct is not None and slow.cpu_pct > 0 and slow.rss_mb is not None and slow.rss_mb > 5
    assert slow.flush_ms is None and slow.lock_wait_ms is None
    assert series.limit is not None and "external system" in series.limit
    (variant,) = outcome.results.variants
    assert variant.system is not None and variant.system.kind == "external"
    assert variant.system.durable_from == "watching" and variant.system.durable_resolution_ms == 50
    assert variant.system.starts == 1 and variant.system.exit_codes == [0]
    # Each step started the command afresh on a folder of its own.
    for step in series.steps:
        assert step.dir is not None
        lines = (outcome.run_dir / step.dir / "out.jsonl").read_text(encoding="utf-8").splitlines()
        assert {json.loads(line)["seq"] for line in lines} == set(range(len(lines)))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("workers: [1]", "workers: [1, 2]"), "capacity.workers: an external system"),
        (
            lambda t: t.split("system:")[0] + "system: {kind: process}\n" + "phases:" + t.split("phases:")[1],
            "system.kind: bench capacity runs the built-in pipeline as worker processes already",
        ),
    ],
    ids=["several-workers", "process-kind"],
)
def test_capacity_refuses_what_it_cannot_measure_for_an_external_system(
    tmp_path: Path, write_scenario: Callable[[str], Path], edit: Callable[[str], str], message: str
) -> None:
    path = _scenario(tmp_path, write_scenario, edit(SCENARIO))
    with pytest.raises(ScenarioError, match=message):
        sweep.run_capacity(load_scenario(path), sweep.CapacityOptions(out=tmp_path / "cap", report=False))
    assert not (tmp_path / "cap").exists(), "refused before anything started"
