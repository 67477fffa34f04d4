"""A user's pipeline of another shape, started, fed and stopped by the bench (bench/shapes/external.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from bench.errors import ScenarioError, ServiceError
from bench.shapes.external import ShapeProcess
from bench.shapes.external_settings import ShapeExternal

# Echoes each line of standard input to {dir}/out.jsonl, after printing a ready line; with --busy it burns CPU
# per line first, so its CPU time is measurable.
ECHO = """
import sys, time
out = open(sys.argv[1], "a")
print("echo ready", flush=True)
for line in sys.stdin:
    if "--busy" in sys.argv:
        end = time.thread_time() + 0.01
        while time.thread_time() < end:
            pass
    out.write(line)
    out.flush()
print("echo done", flush=True)
"""


def _process(tmp_path: Path, **spec: object) -> ShapeProcess:
    script = tmp_path / "echo.py"
    script.write_text(ECHO)
    settings = ShapeExternal.model_validate(
        {"name": "mine", "command": f"{{python}} {script} {{dir}}/out.jsonl", **spec}
    )
    return ShapeProcess(settings, where="x.yaml: forward.external[0]", scenario_dir=tmp_path, folder=tmp_path / "v")


def test_lines_reach_it_in_order_and_it_exits_at_end_of_input(tmp_path: Path) -> None:
    proc = _process(tmp_path, ready={"log": "echo ready"})
    proc.start()
    for i in range(50):
        assert proc.send(json.dumps({"seq": i}).encode())
    assert proc.finish() == 0
    got = [json.loads(line)["seq"] for line in (tmp_path / "v" / "out.jsonl").read_text().splitlines()]
    assert got == list(range(50))
    assert "echo done" in (tmp_path / "v" / "system.log").read_text(), "its output is kept in the variant's folder"


def test_its_cpu_is_counted_from_ready(tmp_path: Path) -> None:
    script = tmp_path / "echo.py"
    script.write_text(ECHO)
    spec = ShapeExternal(name="busy", command=[sys.executable, str(script), "{dir}/out.jsonl", "--busy"])
    proc = ShapeProcess(spec, where="x.yaml: w", scenario_dir=tmp_path, folder=tmp_path / "b")
    proc.start()
    for i in range(40):  # 40 x 10 ms of thread CPU = 0.4 s, far above the 10 ms tick of the CPU clock
        proc.send(b'{"seq": %d}' % i)
    time.sleep(0.3)  # at least one sample of the tree while it works (the sampler runs every 0.2 s)
    assert proc.finish() == 0
    assert proc.usage()["cpu_s"] >= 0.2
    assert proc.usage()["peak_rss_mb"] > 1


def test_kill_then_restart_resumes_on_the_same_folder(tmp_path: Path) -> None:
    proc = _process(tmp_path, ready={"log": "echo ready"})
    proc.start()
    assert proc.send(b'{"seq": 1}')
    time.sleep(0.2)
    proc.kill()
    assert not proc.alive()
    assert not proc.send(b'{"seq": 2}'), "a killed pipeline's input is gone"
    proc.restart()
    assert proc.send(b'{"seq": 3}')
    assert proc.finish() == 0
    assert proc.exit_codes[0] == -9 and proc.exit_codes[-1] == 0
    seqs = [json.loads(line)["seq"] for line in (tmp_path / "v" / "out.jsonl").read_text().splitlines()]
    assert seqs == [1, 3]


def test_ready_by_http_and_by_file(tmp_path: Path) -> None:
    server = tmp_path / "serve.py"
    server.write_text(
        "import sys, http.server\n"
        "open(sys.argv[2], 'w').close()\n"
        "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.BaseHTTPRequestHandler)"
        ".serve_forever()\n"
    )
    for ready in ({"http": "/status"}, {"file": "{dir}/up"}):
        spec = ShapeExternal(name="s", command=f"{{python}} {server} {{port}} {{dir}}/up", ready=ready, stop_timeout=1)
        proc = ShapeProcess(spec, where="x.yaml: s", scenario_dir=tmp_path, folder=tmp_path / "s")
        proc.start()
        assert proc.alive()
        assert proc.finish() == -15, "it never exits on end of input, so the bench ends it with SIGTERM"


def test_user_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"x.yaml: w.command: 'no-such-program' not found"):
        ShapeProcess(
            ShapeExternal(name="w", command="no-such-program"),
            where="x.yaml: w",
            scenario_dir=tmp_path,
            folder=tmp_path,
        ).start()
    with pytest.raises(ScenarioError, match=r"w.cwd: .* is not a folder"):
        ShapeProcess(
            ShapeExternal(name="w", command="true", cwd="nope"),
            where="x.yaml: w",
            scenario_dir=tmp_path,
            folder=tmp_path,
        ).start()
    with pytest.raises(ServiceError, match=r"exited with code 3 before it was ready"):
        ShapeProcess(
            ShapeExternal(name="w", command=[sys.executable, "-c", "raise SystemExit(3)"], ready={"log": "up"}),
            where="x.yaml: w",
            scenario_dir=tmp_path,
            folder=tmp_path,
        ).start()
    with pytest.raises(ServiceError, match=r"was not ready within 0.3 s \(ready: log 'never'\)"):
        ShapeProcess(
            ShapeExternal(
                name="w",
                command=[sys.executable, "-c", "import time; time.sleep(30)"],
                ready={"log": "never", "timeout": 0.3},
            ),
            where="x.yaml: w",
            scenario_dir=tmp_path,
            folder=tmp_path,
        ).start()
    with pytest.raises(ScenarioError, match=r"placeholder \{upstream_url\} is not given to this shape's pipelines"):
        ShapeProcess(
            ShapeExternal(name="w", command="true {upstream_url}"),
            where="x.yaml: w",
            scenario_dir=tmp_path,
            folder=tmp_path,
        ).start()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"command": "run {nope}"}, r"command\[1\]: unknown placeholder \{nope\}; expected one of \{dir\}"),
        ({"command": ""}, "command: expected a program to run"),
        ({"command": "x", "ready": {}}, "expected exactly one of log, http or file, got none"),
        ({"command": "x", "ready": {"http": "status"}}, "http: expected a path starting with /"),
        ({"command": "x", "ready": {"log": "("}}, "log: not a regular expression"),
        ({"command": "x", "env": {"A": "{oops}"}}, r"env.A: unknown placeholder \{oops\}"),
        ({"command": "x", "name": "bad name"}, "should match pattern"),
    ],
)
def test_bad_settings_are_refused_with_the_field_and_what_is_expected(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ShapeExternal.model_validate({"name": "w", **spec})


def test_a_pipeline_that_stops_reading_its_input_is_named_not_waited_for(tmp_path: Path) -> None:
    spec = ShapeExternal(name="deaf", command=[sys.executable, "-c", "import time; time.sleep(60)"], stop_timeout=0.5)
    proc = ShapeProcess(spec, where="x.yaml: forward.external[0]", scenario_dir=tmp_path, folder=tmp_path)
    proc.SEND_TIMEOUT_S = 0.5
    proc.start()
    line = b"x" * 1000
    with pytest.raises(ServiceError, match=r"forward.external\[0\]: the pipeline has not read its standard input"):
        for _ in range(1000):  # 1 MB: far past a pipe's 64 KiB buffer
            proc.send(line)
    assert proc.finish() == -15
