"""Execution options that must not change the maths: remat, dtypes, attention implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_hf import padded_batch

from mtjax.models import CausalLM, ModelConfig, RewardModel
from mtjax.models.attention import resolve_attention_impl

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, sliding_window=6)


def _loss_and_grads(cfg, params, ids, mask):
    model = CausalLM(cfg)

    def loss(p):
        logits = model.apply({"params": p}, ids, attention_mask=mask)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

    return jax.value_and_grad(loss)(params)


def test_remat_gives_identical_loss_and_gradients():
    ids, mask = map(jnp.asarray, padded_batch([10, 6], 10, "left"))
    params = CausalLM(CFG).init(jax.random.PRNGKey(0), ids)["params"]
    plain = _loss_and_grads(CFG, params, ids, mask)
    remat = _loss_and_grads(CFG.replace(remat=True), params, ids, mask)
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), plain[1], remat[1])


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bfloat16_compute_tracks_float32(param_dtype):
    ids, mask = map(jnp.asarray, padded_batch([10, 6], 10, "right"))
    params32 = RewardModel(CFG).init(jax.random.PRNGKey(1), ids)["params"]
    ref = RewardModel(CFG).apply({"params": params32}, ids, attention_mask=mask)
    cfg16 = CFG.replace(dtype="bfloat16", param_dtype=param_dtype)
    params = jax.tree.map(lambda x: x.astype(param_dtype), params32)
    out = RewardModel(cfg16).apply({"params": params}, ids, attention_mask=mask)
    assert out.dtype == jnp.float32  # rewards/logits always come back in float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=0.05 * float(jnp.abs(ref).max()) + 1e-3)
    tied = cfg16.replace(tie_word_embeddings=True)  # reuse the backbone; its embedding is the head
    logits = CausalLM(tied).apply({"params": {"model": params["model"]}}, ids, attention_mask=mask)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_reward_read_by_mask_not_by_token_id():
    """pad == eos must not move the reward position: rows that differ only in what sits under
    the padding get the same reward."""
    ids, mask = padded_batch([5], 8, "right")
    other = ids.copy()
    other[0, 5:] = 2  # eos id in the padding
    model = RewardModel(CFG)
    params = model.init(jax.random.PRNGKey(2), jnp.asarray(ids))["params"]
    a = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    b = model.apply({"params": params}, jnp.asarray(other), attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_attention_impl_auto_picks_cudnn_only_where_it_runs():
    assert CFG.replace(attention_impl=None).attention_impl == "auto"  # configs written before "auto"
    bf16 = CFG.replace(dtype="bfloat16")
    assert resolve_attention_impl(bf16, "gpu") == "cudnn"
    assert resolve_attention_impl(bf16, "cpu") == "einsum"
    assert resolve_attention_impl(CFG, "gpu") == "einsum"  # float32: cuDNN's flash kernel needs bf16/fp16
    assert resolve_attention_impl(bf16.replace(head_dim=12), "gpu") == "einsum"  # not a multiple of 8
    assert resolve_attention_impl(CFG.replace(attention_impl="xla"), "gpu") == "xla"  # explicit wins
    with pytest.raises(ValueError, match="attention_impl='flash'.*'auto', 'einsum', 'xla', 'cudnn'"):
        CFG.replace(attention_impl="flash")


def test_fused_attention_keeps_an_all_padding_row_finite():
    """A batch-filling row with no real token (mask all 0) must not put NaN into the loss or gradients."""
    ids, mask = map(jnp.asarray, padded_batch([10, 0], 10, "right"))
    cfg = CFG.replace(attention_impl="xla")
    params = CausalLM(cfg).init(jax.random.PRNGKey(3), ids)["params"]
    loss, grads = _loss_and_grads(cfg, params, ids, mask)
    assert bool(jnp.isfinite(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
