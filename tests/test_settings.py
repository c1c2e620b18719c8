"""Run settings reach the library by construction: every dataclass field is a config key, every key a field,
and every impossible value is reported at once, by its setting's name, before anything runs."""

import dataclasses
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from mtjax import settings
from mtjax.train import DPOConfig, OptimizerConfig

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "configs"))
import mt  # noqa: E402


@pytest.mark.parametrize("preset", mt.PRESETS)
def test_every_library_field_is_a_key_of_every_preset_and_every_key_a_field(preset):
    cfg = mt.get_config(preset)
    for name, classes in settings._sections().items():
        fields = {f.name for cls in classes for f in settings.settings_of(cls)}
        derived = {f for cls in classes for f in settings.derived_fields(cls)}
        assert fields, name
        keys = set(cfg[name].keys())
        assert fields <= keys, f"{name}: unreachable settings {sorted(fields - keys)}"
        assert keys <= fields, f"{name}: keys that reach no dataclass {sorted(keys - fields)}"
        assert not derived & keys, f"{name}: derived fields must not be settings: {sorted(derived & keys)}"
    # and nothing outside the sections but the run's own scalars
    assert set(cfg.keys()) == set(settings._sections()) | {"preset", "arm", "seed", "iterations"}


@pytest.mark.parametrize("preset", mt.PRESETS)
def test_presets_validate(preset):
    settings.validate_config(mt.get_config(preset))


def parse(*overrides: str):
    """The config as `python -m mtjax.run` parses it from the command line."""
    argv = ["run", "--config=" + str(ROOT / "configs/mt.py:tiny"), *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


def test_command_line_overrides_reach_the_dataclasses_with_their_types():
    from mtjax.em import describe_models
    from mtjax.sampling import SamplingConfig

    cfg = parse("--config.dpo.label_smoothing=0.1", "--config.dpo.simpo_gamma=0.7", "--config.dpo.logits_chunk=64",
                "--config.dpo.average_logprobs=True", "--config.dpo.max_grad_norm=0.5", "--config.dpo.b2=0.95",
                "--config.dpo.eps=1e-6", "--config.policy.attention_impl=xla", "--config.policy.num_layers=3",
                "--config.sampling.top_k=5", "--config.eval.benchmarks=('testbed','rewardbench')")
    dpo = settings.build(DPOConfig, cfg.dpo)
    assert (dpo.label_smoothing, dpo.simpo_gamma, dpo.logits_chunk, dpo.average_logprobs) == (0.1, 0.7, 64, True)
    opt = settings.build(OptimizerConfig, cfg.dpo, total_steps=10)
    assert (opt.max_grad_norm, opt.b2, opt.eps, opt.total_steps) == (0.5, 0.95, 1e-6, 10)
    assert settings.build(SamplingConfig, cfg.sampling).top_k == 5
    assert cfg.eval.benchmarks == ("testbed", "rewardbench")
    specs = describe_models(cfg)
    assert specs["policy"].config.num_layers == 3 and specs["policy"].config.attention_impl == "xla"
    assert specs["reward_model"].config.num_layers == 2  # the other section keeps its own settings
    settings.validate_config(cfg)


def test_a_key_that_matches_no_field_names_the_valid_ones():
    cfg = mt.get_config("tiny")
    with cfg.dpo.unlocked():
        cfg.dpo.betta = 0.2
    with pytest.raises(ValueError, match=r"dpo\.betta is not a setting; dpo holds .*beta, .*label_smoothing"):
        settings.validate_config(cfg)
    with pytest.raises(ValueError, match=r"\['betta'\] are not settings of \['DPOConfig'\]; valid: .*'beta'"):
        settings.section(DPOConfig, betta=0.2)


def test_every_impossible_value_is_reported_together_by_its_setting():
    """Issue 17's list: each used to pass the up-front check and fail after phases had run."""
    cfg = mt.get_config("tiny")
    cfg.sampling.update(max_new_tokens=0, temperature=float("nan"))
    cfg.dpo.update(num_micro_batches=0, beta=-1.0, loss_type="foo", learning_rate=float("inf"))
    cfg.policy.dtype = "float12"
    cfg.eval.temperature = -1.0
    cfg.prompts.reward_model = 0
    cfg.mt.rm_update = "sometimes"
    cfg.rm.b1 = 1.5
    with pytest.raises(ValueError) as err:
        settings.validate_config(cfg)
    message = str(err.value)
    for expected in ("sampling.max_new_tokens must be an int >= 1, got 0", "dpo.num_micro_batches must be >= 1",
                     "dpo.beta must be a finite number > 0, got -1.0", "dpo.loss_type='foo' is not one of",
                     "dpo.learning_rate must be a finite number > 0, got inf", "policy.dtype='float12'",
                     "eval.temperature=-1.0", "prompts.reward_model=0", "mt.rm_update='sometimes'",
                     "rm.b1 and b2 must be in [0, 1)"):
        assert expected in message, (expected, message)
    cfg = mt.get_config("tiny")
    cfg.sampling.temperature = float("nan")
    with pytest.raises(ValueError, match=r"sampling.temperature must be a finite number >= 0"):
        settings.validate_config(cfg)
    cfg = mt.get_config("tiny")
    cfg.sampling.update(num_samples=1, batch_size=0)
    cfg.prompts.policy = (6,)
    with pytest.raises(ValueError) as err:
        settings.validate_config(cfg)
    assert "sampling.batch_size must be an int >= 1" in str(err.value)


def test_only_the_sections_a_run_uses_are_validated():
    cfg = mt.get_config("paper")  # base_rm is off: its values are not checked
    cfg.base_rm.update(learning_rate=-1.0, max_length=1)
    settings.validate_config(cfg)
    cfg.mt.rm_update = "frozen"  # iterative DPO: the rm section is unused
    cfg.rm.update(learning_rate=-1.0, batch_size=0)
    settings.validate_config(cfg)
    cfg.mt.rm_update = "mutual"
    with pytest.raises(ValueError, match=r"rm.learning_rate must be a finite number > 0"):
        settings.validate_config(cfg)


def test_cross_section_checks():
    cfg = mt.get_config("tiny")
    cfg.dpo.max_length = cfg.prompts.max_prompt_tokens
    cfg.iterations = 3
    with pytest.raises(ValueError) as err:
        settings.validate_config(cfg)
    assert "dpo.max_length=176 must exceed prompts.max_prompt_tokens=176" in str(err.value)
    assert "prompts.policy has 2 sizes but iterations=3" in str(err.value)


def test_sections_are_built_from_the_dataclasses_own_defaults():
    section = settings.section(DPOConfig, OptimizerConfig, beta=0.3)
    assert section.beta == 0.3 and section.loss_type == DPOConfig.loss_type
    assert section.b1 == OptimizerConfig.b1 and "total_steps" not in section
    assert section.logits_chunk is None  # an unset optional field stays unset (a typed placeholder)
    section.logits_chunk = 32
    assert settings.build(DPOConfig, section).logits_chunk == 32
    assert dataclasses.asdict(settings.build(settings.MTConfig, mt.get_config("default").mt)) == \
        dataclasses.asdict(settings.MTConfig())
