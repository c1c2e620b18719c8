"""The models of a run, loaded: the policy and the reward model with their tokenizers, stop and pad ids, and
an LLM judge of its own when `mt.judge_model` names one (`describe_models` reads what `mtjax.sources` says of
them without weights; `load_models` places them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ml_collections import ConfigDict

from mtjax import settings


@dataclasses.dataclass
class Models:
    policy: Any  # CausalLM module
    reward: Any  # RewardModel module
    tokenizer: Any  # the policy's
    reward_tokenizer: Any
    policy_params: Any  # π0
    reward_init_params: Any  # the RM's starting point (backbone + seeded score head, or a trained RM)
    stop_ids: tuple[int, ...]  # the policy's stop ids (config, generation config and tokenizer)
    pad_id: int  # the policy's
    reward_pad_id: int
    judge: Models | None = None  # `mt.judge_model`: the judge as a policy (module, tokenizer, stop/pad ids, π0 = its
    # weights); None when the policy judges

    def judge_view(self) -> Models:
        """The models the LLM judge samples with: `judge` if the run has a judge model, else these (the policy)."""
        return self if self.judge is None else self.judge


def describe_models(cfg: ConfigDict) -> dict[str, Any]:
    """The policy's and the reward model's `sources.ModelSpec`: checkpoint configs with the run's model
    settings on top, tokenizers and stop ids, read without loading any weights."""
    from mtjax.models.config import ModelConfig
    from mtjax.sources import ModelSource, describe

    specs = {name: describe(settings.build(ModelSource, cfg[name]), settings.set_values(ModelConfig, cfg[name]), name)
             for name in ("policy", "reward_model")}
    if cfg.mt.get("policy_rewards") == "judge_model":
        specs["judge"] = describe_judge(cfg)
    return specs


def describe_judge(cfg: ConfigDict) -> Any:
    """The spec of `mt.judge_model`: run with the policy section's execution settings (dtype, attention,
    remat, layer scan); a random source (`tiny`) takes the policy's architecture settings too."""
    from mtjax.models.config import EXECUTION_FIELDS, ModelConfig
    from mtjax.sources import RANDOM_SOURCES, ModelSource, describe

    source = ModelSource(source=cfg.mt.judge_model)
    overrides = settings.set_values(ModelConfig, cfg.policy)
    if source.source not in RANDOM_SOURCES:
        overrides = {k: v for k, v in overrides.items() if k in EXECUTION_FIELDS}
    return describe(source, overrides, "mt.judge_model")


def load_models(specs: Mapping[str, Any], run_seed: int, mesh=None) -> Models:
    """π0 and the RM's starting point from described sources (`describe_models`), placed on `mesh` by the
    partition rules (an HF checkpoint is streamed shard by shard: no host or device holds a whole model)."""
    from mtjax.sharding import shard_params
    from mtjax.sources import load, special_ids

    policy, policy_params = load(specs["policy"], "causal_lm", run_seed, mesh)
    reward, reward_params = load(specs["reward_model"], "reward", run_seed, mesh)
    if mesh is not None:
        policy_params, reward_params = shard_params(policy_params, mesh), shard_params(reward_params, mesh)
    tokenizer, reward_tokenizer = specs["policy"].tokenizer, specs["reward_model"].tokenizer
    (stop_ids, pad), (_, reward_pad) = special_ids(policy, tokenizer), special_ids(reward, reward_tokenizer)
    judge = None
    if "judge" in specs:  # a causal LM of its own, seen as a policy by the sampler
        module, params = load(specs["judge"], "causal_lm", run_seed, mesh)
        if mesh is not None:
            params = shard_params(params, mesh)
        judge_stop, judge_pad = special_ids(module, specs["judge"].tokenizer)
        judge = Models(module, None, specs["judge"].tokenizer, None, params, None, judge_stop, judge_pad, judge_pad)
    return Models(policy, reward, tokenizer, reward_tokenizer, policy_params, reward_params, stop_ids, pad, reward_pad,
                  judge)
