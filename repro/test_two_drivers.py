"""README: "Two drivers never share a sweep. ... seen from another machine, the heartbeat decides: the holder counts as
gone 300 s after its last heartbeat". A holder that is alive but silent for that long (a laptop that slept, a driver
stopped with Ctrl-Z, a VM paused) is taken over by a driver on another machine; when it wakes, its heartbeat thread
finds its record gone and only logs an error (owner.hold's refresh): it goes on running the sweep next to the new
holder. Two drivers then share the sweep.

Real processes and signals (SIGSTOP/SIGCONT). Named stand-ins: "another machine" is owner._machine patched in the
holder (as tests/test_owner.py does), and STALE_S / HEARTBEAT_S are shortened from 300 s / 30 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lorahpo import owner
from lorahpo.config import load_config

from .conftest import ROOT

HOLDER = """
import sys, time, logging
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from lorahpo import owner
from lorahpo.config import load_config
owner._machine = lambda: "another machine"   # stand-in: this holder runs elsewhere
owner.HEARTBEAT_S = 0.5
cfg = load_config(None, {"sweep.storage_path": sys.argv[1], "sweep.name": "s"})
with owner.hold(cfg, None):
    print("holding", flush=True)
    while True:   # the sweep's work: it never learns that it lost the sweep
        print("working", time.time(), flush=True)
        time.sleep(0.2)
"""


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_driver_that_wakes_after_a_takeover_stops(tmp_path: Path, procs: list, monkeypatch) -> None:
    store = tmp_path / "store"
    log = tmp_path / "holder.log"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store)],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    procs.append(holder)
    wait_for(lambda: "holding" in log.read_text(), 180, "the first driver to hold the sweep")
    os.kill(holder.pid, signal.SIGSTOP)  # the laptop sleeps
    monkeypatch.setattr(owner, "STALE_S", 3.0)
    cfg = load_config(None, {"sweep.storage_path": str(store), "sweep.name": "s"})
    record = store / "s" / ".lorahpo-owner.1"
    wait_for(lambda: time.time() - json.loads(record.read_text())["heartbeat"] > 3.5, 30, "a stale heartbeat")
    with owner.hold(cfg, "--resume"):  # the second driver, on this machine, takes the sweep over
        taken = time.time()
        os.kill(holder.pid, signal.SIGCONT)  # the laptop wakes
        time.sleep(3)  # a few of its heartbeats
        after = [float(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("working")]
        worked_after = [t for t in after if t > taken]
        assert holder.poll() is not None and not worked_after, (
            f"the first driver is still running the sweep ({len(worked_after)} work ticks after the takeover); "
            f"its log: {[line for line in log.read_text().splitlines() if 'owner' in line][:2]}"
        )
