"""Run directory: config guard, phase markers, atomic artifacts, Orbax round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax.rundir import ConfigMismatchError, RunDir


def test_phases_persist_across_reopen(tmp_path):
    run = RunDir(tmp_path, {"seed": 0, "model": {"lr": 1e-6}})
    assert run.completed() == []
    run.write_jsonl("iter_1/pairs.jsonl", [{"a": 1}, {"a": 2}])
    run.mark_done("iter_1/e_step", {"pairs": 2, "skipped": 0})
    again = RunDir(tmp_path, {"model": {"lr": 1e-6}, "seed": 0})  # key order does not matter
    assert again.done("iter_1/e_step") and not again.done("iter_1/m_step")
    assert again.summary("iter_1/e_step") == {"pairs": 2, "skipped": 0}
    assert again.read_jsonl("iter_1/pairs.jsonl") == [{"a": 1}, {"a": 2}]
    again.log_metrics({"iteration": 1, "loss": 0.5})
    assert again.metrics() == [{"iteration": 1, "loss": 0.5}]
    assert not list(tmp_path.rglob(".*tmp*"))  # no temp files left behind


def test_different_config_is_refused_with_the_changes_named(tmp_path):
    RunDir(tmp_path, {"seed": 0, "model": {"lr": 1e-6}})
    with pytest.raises(ConfigMismatchError, match=r"model\.lr: 1e-06 -> 2e-06"):
        RunDir(tmp_path, {"seed": 0, "model": {"lr": 2e-6}})
    RunDir(tmp_path, {"seed": 0, "model": {"lr": 2e-6}}, allow_config_change=True)
    # How often training saves its state changes nothing computed: added, removed or changed, it resumes.
    RunDir(tmp_path, {"seed": 0, "model": {"lr": 2e-6}, "checkpoint": {"train_every_steps": 5}})
    RunDir(tmp_path, {"seed": 0, "model": {"lr": 2e-6}, "checkpoint": {"train_every_steps": 0}})
    RunDir(tmp_path, {"seed": 0, "model": {"lr": 2e-6}})


def test_orbax_params_round_trip(tmp_path):
    run = RunDir(tmp_path, {})
    params = {"model": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}}
    run.save_params("iter_1/policy", params)
    run.save_params("iter_1/policy", params)  # overwriting a finished checkpoint is allowed
    restored = run.load_params("iter_1/policy", like=params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, restored)
    assert restored["model"]["b"].dtype == jnp.bfloat16
    with pytest.raises(FileNotFoundError, match="incomplete"):
        run.load_params("iter_2/policy")
