"""Mid-phase train-state saves through Orbax's CheckpointManager: policies, restore, a change of settings
(only a learning-rate change resumes), a damaged save (training restarts, with a message)."""

import jax.numpy as jnp
import numpy as np
import pytest

from mtjax.interrupts import Interrupted
from mtjax.rundir import RunDir
from mtjax.sharding import make_mesh
from mtjax.train import OptimizerConfig, init_train_state
from mtjax.train_checkpoint import TrainCheckpoint

SETTINGS = {"learning_rate": 1e-3, "beta": 0.1, "batch_size": 4}


def state_at(step: int):
    state = init_train_state({"w": jnp.arange(8.0)}, OptimizerConfig(learning_rate=1e-3, total_steps=10),
                             make_mesh(data=1))
    return state.replace(step=jnp.asarray(step, state.step.dtype), params={"w": jnp.arange(8.0) + step})


def checkpoint(run_dir, **kwargs):
    kwargs = {"every_steps": 2, "every_seconds": 0.0, "settings": SETTINGS, **kwargs}
    return TrainCheckpoint(run_dir, "iter_1/e_step/train_state", **kwargs)


@pytest.fixture
def saved(tmp_path):
    """A train state saved by the step policy at step 2 of 5 (history rows 1 and 2)."""
    run_dir = RunDir(tmp_path, {})
    ckpt = checkpoint(run_dir)
    history = []
    for step in (1, 2, 3):
        history.append({"loss": float(step)})
        ckpt.after_step(state_at(step), history, total=5)
    assert ckpt.latest_step() == 2  # every 2 steps: saved after step 2, not 1 or 3
    ckpt.close()
    return run_dir


def test_restore_gives_the_saved_state_and_history(saved):
    ckpt = checkpoint(saved)
    state, history = ckpt.restore(state_at(0))
    assert int(state.step) == 2 and history == [{"loss": 1.0}, {"loss": 2.0}]
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.arange(8.0) + 2)
    assert ckpt.saved_step == 2


def test_a_learning_rate_change_resumes_and_other_changes_restart(saved, capsys):
    lowered = checkpoint(saved, settings={**SETTINGS, "learning_rate": 1e-5})
    assert lowered.restore(state_at(0)) is not None
    assert "resuming with learning_rate 0.001 -> 1e-05" in capsys.readouterr().out
    other = checkpoint(saved, settings={**SETTINGS, "beta": 0.5})
    assert other.restore(state_at(0)) is None
    assert "was trained with other settings (beta changed); training this phase from its start" in \
        capsys.readouterr().err
    assert not other.directory.exists()


def test_a_damaged_save_restarts_the_training_with_a_message(saved, capsys):
    ckpt = checkpoint(saved)
    for path in ckpt.directory.rglob("*"):
        if path.is_file() and path.parent.name == "d":  # the array data files
            path.write_bytes(b"garbage")
    assert ckpt.restore(state_at(0)) is None
    assert "train_state is damaged (" in capsys.readouterr().err and not ckpt.directory.exists()


def test_saving_at_the_last_step_is_left_to_the_phase(tmp_path):
    ckpt = checkpoint(RunDir(tmp_path, {}), every_steps=1)
    ckpt.after_step(state_at(1), [{"loss": 1.0}], total=1)
    assert ckpt.latest_step() is None


def test_ctrl_c_saves_the_newest_state(tmp_path):
    ckpt = checkpoint(RunDir(tmp_path, {}), every_steps=0)
    history = [{"loss": 1.0}, {"loss": 2.0}, {"loss": 3.0}]
    stop = ckpt.save_on_interrupt(KeyboardInterrupt(), state_at(3), history, None, log=print, total=5)
    assert isinstance(stop, Interrupted) and stop.announced and "step 3" in stop.saved
    assert ckpt.latest_step() == 3

