"""The memory planner counts what the real models and cache hold."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mtjax.models import init_cache, make_model
from mtjax.plan import Mesh, format_plan, num_params, plan, shape_of
from mtjax.sources import tiny_config as tiny_model_config

sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
import mt  # noqa: E402


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_parameter_counts_match_real_param_trees():
    cfg = tiny_model_config(49152)
    for head in ("causal_lm", "reward"):
        shapes = jax.eval_shape(lambda h=head: make_model(cfg, h).init(jax.random.PRNGKey(0),
                                                                        jnp.zeros((1, 1), jnp.int32)))
        assert num_params(shape_of("tiny"), head) == n_params(shapes["params"])
    untied = cfg.replace(tie_word_embeddings=False)
    shapes = jax.eval_shape(lambda: make_model(untied, "causal_lm").init(jax.random.PRNGKey(0),
                                                                        jnp.zeros((1, 1), jnp.int32)))
    assert num_params(untied, "causal_lm") == n_params(shapes["params"])
    biased = cfg.replace(attention_bias=True, mlp_bias=True)
    shapes = jax.eval_shape(lambda: make_model(biased, "causal_lm").init(jax.random.PRNGKey(0),
                                                                        jnp.zeros((1, 1), jnp.int32)))
    assert num_params(biased, "causal_lm") == n_params(shapes["params"])
    assert num_params(shape_of("smollm2"), "causal_lm") == 134_515_008  # SmolLM2-135M's published count
    assert round(num_params(shape_of("meta-llama/Meta-Llama-3-8B-Instruct"), "causal_lm") / 1e6) == 8030


def test_kv_cache_bytes_match_init_cache():
    cfg = mt.get_config("tiny")
    result = plan(cfg, Mesh(1, 1, 1))
    model_cfg = tiny_model_config(49152)
    cache = jax.eval_shape(lambda: init_cache(model_cfg, cfg.sampling.batch_size, cfg.dpo.max_length, jnp.float32))
    cache_bytes = sum(x.size * x.dtype.itemsize for x in (*cache.keys, *cache.values))
    assert result["e_step sampling"]["KV cache"] == cache_bytes


def test_sharding_divides_params_and_paper_preset_fits_8x80gb():
    cfg = mt.get_config("paper")
    one = plan(cfg, Mesh(1, 1, 1))
    eight = plan(cfg, Mesh(1, 8, 1))
    moments = "AdamW moments (float32)"
    assert eight["e_step dpo_train"][moments] * 8 == one["e_step dpo_train"][moments]
    assert "fits a 80 GiB device" in format_plan(eight, 80)
    assert "does NOT fit" in format_plan(one, 80)
