"""Two processes on 127.0.0.1 (one CPU device each, gloo collectives) run the `tiny` preset end to end
through `python -m mtjax.run`, are preempted (SIGTERM) and interrupted (Ctrl-C) on one host, resume, and
end with the same parameters and metrics as a single-process run over the same two-device mesh with the
same seed."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mtjax.rundir import RunDir, RunDirError

REPO = Path(__file__).parents[1]
# The global mesh of conftest.tiny_config (2 devices, data-parallel), one iteration (every multi-host step
# of the loop runs in it; a second would add minutes of CI and no new code path); the M-step trains for 3
# epochs (9 steps) so that a preemption notice sent as it starts, and a Ctrl-C sent after its third step, land
# before it ends.
OVERRIDES = ["--config.mesh.data=2", "--config.iterations=1", "--config.prompts.policy=(6,)", "--config.rm.epochs=3"]
# The two-process runs save the train state after every step, exercising the collective mid-phase checkpoint;
# the single-process reference, never interrupted, saves none (operational settings: they change no number,
# as the resume tests of tests/test_em_run.py show).
SAVES = {2: ["--config.checkpoint.train_every_steps=1"],
         1: ["--config.checkpoint.train_every_steps=0", "--config.checkpoint.train_every_seconds=0"]}
CHECKPOINTS = ("base_rm/reward_model", "iter_1/policy", "iter_1/reward_model")
M_STEP = "iter_1/m_step"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, logs: Path, attempt: str, processes: int = 2) -> list[subprocess.Popen]:
    """The CLI on the tiny preset's 2-device mesh: `processes` = 2 hosts of one CPU device each, or 1 process
    owning both devices (the numbers XLA:CPU computes can depend on how many devices a process has, so the
    single-process reference gets exactly the two the mesh uses)."""
    devices = 2 // processes
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONUNBUFFERED": "1"}
    port = _free_port()
    distributed = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"] if processes > 1 else []
    procs = []
    for pid in range(processes):
        log = open(logs / f"{attempt}_process_{pid}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mtjax.run", "--config=configs/mt.py:tiny", *OVERRIDES,
             *SAVES[processes], f"--workdir={workdir}",
             f"--compilation_cache={logs.parent / f'xla_cache_{processes}'}", *distributed,
             *([f"--process_id={pid}"] if processes > 1 else [])],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process of the two-process run hung for more than {timeout:.0f} s")
    return codes


def _completed(workdir: Path) -> list[str]:
    try:
        return RunDir.open_read_only(workdir).completed()
    except (FileNotFoundError, RunDirError):
        return []


def _saved_steps(workdir: Path) -> list[int]:
    """The M-step's saved train-state steps (Orbax step folders appear whole, by rename)."""
    folder = workdir / M_STEP / "train_state"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def test_two_processes_equal_one_process_and_survive_a_lost_host(tmp_path):
    workdir, logs = tmp_path / "two_processes", tmp_path / "logs"
    logs.mkdir()

    # 1. SIGTERM on host 1 (what a preempting scheduler sends) as the M-step starts training: both hosts stop
    #    at the same sync point, save the train state together, and end with one line each ...
    procs = _launch(workdir, logs, "preempted")
    while not (workdir / M_STEP / "old_policy_samples.jsonl").exists():
        assert all(p.poll() is None for p in procs), (logs / "preempted_process_0.log").read_text()[-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    assert _wait(procs, timeout=300) == [143, 143]
    for pid in (0, 1):
        log = (logs / f"preempted_process_{pid}.log").read_text()
        assert "mtjax: stopped (preemption); the train state at step" in log and "Traceback" not in log, log[-3000:]
    assert M_STEP not in _completed(workdir) and _saved_steps(workdir)

    # 2. A Ctrl-C on host 1 in the middle of the resumed M-step ends both hosts (none waits forever) ...
    first = _saved_steps(workdir)[-1]
    procs = _launch(workdir, logs, "interrupted")
    while not [s for s in _saved_steps(workdir) if s >= first + 2]:
        assert all(p.poll() is None for p in procs), (logs / "interrupted_process_0.log").read_text()[-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGINT)
    codes = _wait(procs, timeout=150)
    assert codes[0] != 0 and codes[1] != 0, codes
    assert "process 1 of 2 interrupted" in (logs / "interrupted_process_1.log").read_text()
    assert M_STEP not in _completed(workdir)

    # 3. ... and the same command resumes after the last finished phase.
    procs = _launch(workdir, logs, "resumed")
    codes = _wait(procs, timeout=400)
    out = (logs / "resumed_process_0.log").read_text()
    assert codes == [0, 0], out[-3000:]
    assert "resuming; finished phases" in out and "2 processes" in out
    assert "policy/gold_reward" in out  # the end-of-run table, printed once by process 0
    assert "policy/gold_reward" not in (logs / "resumed_process_1.log").read_text()

    # 4. A single process driving the same two-device mesh gives the same models and metrics.
    (code,) = _wait(_launch(tmp_path / "one_process", logs, "single", processes=1), timeout=400)
    assert code == 0, (logs / "single_process_0.log").read_text()[-3000:]
    two, single = RunDir.open_read_only(workdir), RunDir.open_read_only(tmp_path / "one_process")
    assert two.completed() == single.completed() and "iter_1/eval" in two.completed()
    for t in range(2):
        assert two.read_json(f"eval/iter_{t}.json") == single.read_json(f"eval/iter_{t}.json")
    assert two.read_jsonl("iter_1/e_step/pairs.jsonl") == single.read_jsonl("iter_1/e_step/pairs.jsonl")
    for name in CHECKPOINTS:
        ours, theirs = two.load_params(name), single.load_params(name)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6),
                     ours, theirs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2, process_id=0), "needs coordinator_address"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2), "process_id=2 must be in 0 .. 1"),
    (dict(coordinator_address="127.0.0.1:1", process_id=1), "needs num_processes > 1"),
])
def test_incomplete_multi_process_arguments_are_refused(kwargs, message):
    from mtjax.distributed import initialize

    with pytest.raises(ValueError, match=message):
        initialize(**kwargs)


def test_single_process_needs_no_initialization():
    from mtjax.distributed import initialize, is_primary

    assert initialize() is False and initialize(num_processes=1) is False and is_primary()
