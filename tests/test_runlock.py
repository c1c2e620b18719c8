"""One run per run directory: a second run is refused with the holder named; a lock left by a process that
died is taken over."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtjax.runlock import RunDirLocked, exclusive_run_lock

HOLD = """
import sys, time
from mtjax.runlock import exclusive_run_lock
with exclusive_run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunDirLocked, match=rf"in use by another run \(pid {proc.pid} on host "
                                               rf"{socket.gethostname()}, running since .*\.lock"):
            with exclusive_run_lock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)  # dies holding it: no clean release
        proc.wait()
    said = []
    with exclusive_run_lock(tmp_path, say=said.append):
        assert f"pid {proc.pid} on host" in said[0] and "ended without releasing it; taking over" in said[0]
        assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()
    said.clear()
    with exclusive_run_lock(tmp_path, say=said.append):  # a clean release leaves nothing stale
        assert said == []


def test_the_lock_is_released_when_the_holder_exits(tmp_path):
    proc = _holder(tmp_path)
    proc.terminate()
    proc.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with exclusive_run_lock(tmp_path, say=lambda message: None):
                break
        except RunDirLocked:
            assert time.monotonic() < deadline
            time.sleep(0.1)
