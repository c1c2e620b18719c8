"""A device out-of-memory error inside a phase ends with one message naming the phase, the batch shape and the
setting to lower; the run directory accepts the lowered setting and the phase resumes."""

import pytest
from conftest import tiny_config

from mtjax import sampling
from mtjax.device_memory import OutOfDeviceMemory, working_on
from mtjax.em import MutualTaught


def config(max_batch_tokens: int):
    cfg = tiny_config()
    cfg.iterations = 1
    cfg.prompts.policy = (6,)
    cfg.sampling.max_batch_tokens = max_batch_tokens
    return cfg


def test_out_of_memory_names_phase_shape_and_setting_and_the_lowered_setting_resumes(tmp_path, monkeypatch):
    real = sampling.score

    def exhausted(*args, **kwargs):
        working_on("reward scoring", (32, 5120), ("sampling.max_batch_tokens", "sampling.batch_size"))
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 28454158336 bytes.")

    with monkeypatch.context() as m:
        m.setattr(sampling, "score", exhausted)
        run = MutualTaught(config(8192), str(tmp_path))
        with pytest.raises(OutOfDeviceMemory) as err:
            run.run()
    message = str(err.value)
    assert message.startswith("out of device memory in phase iter_1/e_step, reward scoring of a [32 x 5120] batch")
    assert "lower sampling.max_batch_tokens or sampling.batch_size and rerun the same command" in message
    assert "\n" not in message
    assert sampling.score is real
    run = MutualTaught(config(2048), str(tmp_path))  # an operational setting: the directory accepts it
    assert run.rd.completed() == ["prompts", "base_rm", "iter_0/eval"]
    run.run()
    assert "iter_1/eval" in run.rd.completed()
