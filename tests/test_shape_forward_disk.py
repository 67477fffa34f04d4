"""A full disk under the store-and-forward outbox: a real 2 MB tmpfs (root only; skipped where mounting is not
permitted), filled by the outbox itself while the upstream is down.

The named policy (pipeline/forward.py): a reading that would leave less than ``min_free_bytes`` free is refused
with reason ``disk_full``, written to the ``dropped`` table (or, if even that cannot be written, kept in memory);
once the upstream drains the outbox, the freed pages take new readings again. Every reading must end delivered
or dropped with that reason: none unexplained. Assertions are on counts, never on wall times."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.shapes.forward import reconcile
from pipeline.forward import ForwardConfig, ForwardPipeline
from simulators.forward_upstream import Upstream
from simulators.stream import Message

WAIT_S = 60.0  # generous: a busy shared machine must not fail a test by being slow
PAD = "x" * 500  # larger rows fill 2 MB in a few thousand puts


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, unmounted afterwards; skipped where mounting is not permitted."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small file system to fill")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a 2 MB tmpfs is not permitted here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


def _payload(seq: int) -> bytes:
    body = {"machine": f"m-{seq % 3}", "ts": "2026-01-01T00:00:00Z", "load_rate": 1.5, "mileage": 3.0, "seq": seq}
    return json.dumps({**body, "pad": PAD}).encode()


def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_full_disk_refuses_by_name_and_recovers_once_drained(small_disk: Path, tmp_path: Path) -> None:
    upstream = Upstream(seed=4)
    upstream.start()
    upstream.down()  # nothing leaves the outbox: it fills the disk
    pipe = ForwardPipeline(ForwardConfig(upstream.url, small_disk / "outbox.sqlite", "outbox", backoff_cap_s=0.1))
    answers: dict[int, str | None] = {}
    try:
        pipe.start()
        seq = 0
        # 2 MB of ~600-byte rows is a few thousand; 50,000 is a bound that a disk that never fills would hit.
        while Counter(answers.values())["disk_full"] < 30 and seq < 50_000:
            answers[seq] = pipe.put(_payload(seq))
            seq += 1
        stored_while_full = pipe.outbox.rows
        upstream.up()
        _until(lambda: pipe.outbox.rows == 0, "the upstream to drain the outbox")
        # The pages the delivered rows freed take new readings again: the refusal lasted as long as the full disk.
        for _ in range(200):
            answers[seq] = pipe.put(_payload(seq))
            seq += 1
        pipe.close(drain_s=WAIT_S)
    finally:
        upstream.down()
    refused = {s for s, a in answers.items() if a == "disk_full"}
    assert len(refused) >= 30 and stored_while_full > 0
    assert all(answers[s] is None for s in range(seq - 200, seq))  # recovered
    assert set(answers.values()) <= {None, "disk_full"}  # nothing else went wrong
    # The bench's read-back: every reading delivered or dropped with the named reason; none lost, none twice.
    # Copied off the tmpfs first, so the file read is the one the pipeline left.
    copy = tmp_path / "outbox-copy.sqlite"
    shutil.copyfile(small_disk / "outbox.sqlite", copy)
    sent = [Message(seq=s, machine=f"m-{s % 3}", intended_send_ns=s, payload=b"") for s in range(seq)]
    part, ledger, _ = reconcile(
        "outbox", sent=sent, log=upstream.log, outbox_file=copy, faults=(), epoch_ns=0, stats=pipe.stats
    )
    assert part["dropped_by_reason"] == {"disk_full": len(refused)} and part["dropped"] == len(refused)
    assert (part["lost"], part["duplicates"], part["in_outbox"], part["out_of_order"]) == (0, 0, 0, 0)
    assert part["delivered"] == seq - len(refused) and pipe.outbox.pending_drops == []
    assert ledger.reconciled and ledger.dropped_by_reason == {"disk_full": len(refused)}
    db = sqlite3.connect(copy)
    try:
        dropped = {s for (s,) in db.execute("SELECT seq FROM dropped WHERE reason = 'disk_full'")}
    finally:
        db.close()
    assert dropped == refused  # the very readings refused, by seq


def test_command_line_sender_names_what_the_full_disk_refused(small_disk: Path) -> None:
    """``python -m pipeline.forward`` on a full disk with the upstream down throughout: it refuses by name,
    keeps what it stored, and says on exit what is left (exit code 1: not drained)."""
    upstream = Upstream(seed=5)
    upstream.start()
    url = upstream.url
    upstream.down()
    lines = b"".join(_payload(s) + b"\n" for s in range(6000))  # about 3.6 MB: more than the disk holds
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.forward",
            "--upstream",
            url,
            "--db",
            str(small_disk / "outbox.sqlite"),
            "--drain",
            "0.5",
            "--backoff-cap",
            "0.1",
        ],
        input=lines,
        capture_output=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 1, done.stderr.decode()[-2000:]
    summary = json.loads(done.stdout.decode().splitlines()[-1])
    db = sqlite3.connect(small_disk / "outbox.sqlite")
    try:
        queued = {s for (s,) in db.execute("SELECT seq FROM outbox")}
        dropped = {s for (s,) in db.execute("SELECT seq FROM dropped WHERE reason = 'disk_full'")}
    finally:
        db.close()
    unwritten = {s for s, reason in summary["unwritten_drops"] if reason == "disk_full"}
    assert summary["left_in_outbox"] == len(queued) > 0 and dropped | unwritten
    # Every line is in the outbox or refused by name (in the file, or in the exit summary): none unexplained.
    assert queued | dropped | unwritten == set(range(6000)) and not queued & (dropped | unwritten)
