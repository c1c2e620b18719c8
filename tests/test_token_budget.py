"""Sampling and scoring batches are bounded by a token budget: a long prompt runs in a batch of few rows (a
power of two, so few shapes compile), and the results do not depend on the budget."""

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import sampling
from mtjax.models import make_model
from mtjax.sampling import _budget_chunks, generate, score
from mtjax.sources import tiny_config

CFG = tiny_config(64, num_layers=1, hidden_size=32, intermediate_size=32, head_dim=8, max_position_embeddings=256,
                  eos_token_ids=(3,))
PROMPTS = [[5] * 120, *[[6 + i % 20] * (4 + i) for i in range(5)]]  # one long prompt among short ones


def test_budget_chunks_take_the_largest_power_of_two_that_fits():
    items = [100, 100, 100, 10, 10, 10, 10, 10, 10, 10]
    chunks = _budget_chunks(items, lambda n: n, max_items=8, max_tokens=250)
    assert [(len(c), limit) for c, limit in chunks] == [(2, 2), (2, 2), (6, 8)]
    one = _budget_chunks([1000, 10], lambda n: n, max_items=8, max_tokens=250)  # too wide alone: runs alone
    assert [(len(c), limit) for c, limit in one] == [(1, 1), (1, 8)]


def test_a_long_prompt_gets_a_small_batch_and_the_samples_do_not_change():
    model = make_model(CFG, "causal_lm")
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    kw = dict(max_new_tokens=8, temperature=1.0, num_samples=2, eos_token_ids=[3], pad_token_id=0, seed=4,
              batch_size=16, progress=False)
    free = generate(model, params, PROMPTS, max_batch_tokens=10**6, **kw)
    sampling.TRACE_SHAPES.clear()
    budget = 2 * (128 + 8)  # the long prompt's bucket (128) + new tokens, two rows
    tight = generate(model, params, PROMPTS, max_batch_tokens=budget, **kw)
    assert [[g.token_ids for g in per] for per in tight] == [[g.token_ids for g in per] for per in free]
    shapes = set(sampling.TRACE_SHAPES)
    assert (1, 128, 2) in shapes  # the long prompt alone, its 2 samples sharing one prefill
    assert all(rows * (bucket + 8) <= budget for _, bucket, rows in shapes)
    rm = make_model(CFG, "reward")
    rm_params = rm.init(jax.random.PRNGKey(1), jnp.zeros((1, 1), jnp.int32))["params"]
    responses = [[7, 8, 3]] * len(PROMPTS)
    np.testing.assert_allclose(score(rm, rm_params, PROMPTS, responses, pad_token_id=0, max_batch_tokens=200,
                                     progress=False),
                               score(rm, rm_params, PROMPTS, responses, pad_token_id=0, progress=False), atol=1e-5)
