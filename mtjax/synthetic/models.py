"""The synthetic testbed's models: a ~1M-parameter Llama policy and a reward model of the same shape.

The reward model starts from the policy's backbone (after the supervised phase, as in InstructGPT's
recipe) with a fresh score head; it is then trained on gold-labelled pairs (r0).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtjax.models import CausalLM, ModelConfig, RewardModel
from mtjax.models.hf import init_score_head

MAX_POSITIONS = 64  # prompt (<= 8 ids) + response (<= 16 new ids) fit with room to spare


def model_config(tokenizer: Any, **overrides: Any) -> ModelConfig:
    """Llama architecture (GQA 4:2, tied embeddings), 4 layers of width 128: about 1.0M parameters."""
    settings = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=32, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_ids=(tokenizer.eos_token_id,))
    return ModelConfig(**{**settings, **overrides})


def init_policy(cfg: ModelConfig, seed: int) -> tuple[CausalLM, Any]:
    model = CausalLM(cfg)
    params = jax.jit(lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32))["params"])(jax.random.PRNGKey(seed))
    return model, params


def reward_model_from_policy(cfg: ModelConfig, policy_params: Any, seed: int) -> tuple[RewardModel, Any]:
    """A reward model sharing `policy_params`' backbone (copied) with a fresh N(0, 0.02²) score head."""
    model = RewardModel(cfg)
    backbone = jax.tree.map(jnp.array, policy_params["model"])
    return model, {"model": backbone, "score": {"kernel": jnp.asarray(init_score_head(cfg, seed))}}


def num_parameters(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
