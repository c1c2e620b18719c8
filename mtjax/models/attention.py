"""Attention of the Llama/Mistral decoder: one masking rule, three implementations.

A query at slot q sees key slot k iff k <= q, the key is a real token (attention mask 1) and, with a
sliding window W, q - k < W (the window counts the query itself, as transformers' Mistral does).

* ``einsum`` — `grouped_attention`: float32 `[B, K, G·T, S]` scores from a dense `[B,1,T,S]` mask. Runs
  everywhere and serves the KV-cache path (prefill and decode) under every setting.
* ``xla`` / ``cudnn`` — `fused_attention`: `jax.nn.dot_product_attention(is_causal=True,
  query_seq_lengths=, key_value_seq_lengths=, local_window_size=(W-1, 0))`. With ``cudnn`` no score
  tensor is ever materialised; ``xla`` runs the same call through XLA, so CPU tests check the exact
  arguments the cuDNN kernel receives.
* ``auto`` (the default) — ``cudnn`` where it runs (`cudnn_supported`), else ``einsum``.

Sequence lengths describe right padding only (the real tokens are slots `[0, L)`). Left-padded rows
(reward scoring, the sampler's prompts) and rows padded on both sides are therefore moved to the front
before the decoder runs and moved back after it (`front_padding_offsets`, `shift_rows`): every other
op of the decoder works token by token and positions come from the mask, so this is exact for any row
whose real tokens are one contiguous run — the only layout mtjax builds (`data` right-pads training
pairs, `sampling` left-pads prompts and scoring rows). A mask with holes inside a row needs ``einsum``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtjax.models.config import ModelConfig

FUSED_IMPLS = ("xla", "cudnn")
_CUDNN_DTYPES = ("bfloat16", "float16")


class AttentionInputs(NamedTuple):
    """What a layer needs to mask its attention: a dense boolean `[B,1,T,S]` mask (einsum path) or the
    number of real tokens per row `[B]`, moved to the front (fused path). Exactly one is set."""

    mask_b1ts: jax.Array | None = None
    lengths_b: jax.Array | None = None


def cudnn_supported(cfg: ModelConfig, platform: str) -> bool:
    """Whether jax's cuDNN flash attention accepts this model on `platform` ('gpu', 'cpu', 'tpu').

    cuDNN takes bf16/fp16 with head_dim a multiple of 8, up to 128 before Hopper (256 from Hopper on;
    128 keeps the rule device-independent)."""
    return (platform == "gpu" and cfg.dtype in _CUDNN_DTYPES and cfg.head_dim % 8 == 0
            and cfg.head_dim <= 128)


def resolve_attention_impl(cfg: ModelConfig, platform: str | None = None) -> str:
    """The implementation `cfg.attention_impl` means on `platform` (default: jax's default backend):
    'einsum', 'xla' or 'cudnn'. Static: decided once per trace."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    platform = platform or jax.default_backend()
    return "cudnn" if cudnn_supported(cfg, platform) else "einsum"


# ----------------------------------------------------------------------------- masks and padding


def build_attention_mask(kv_mask_bs: jax.Array, query_slots_t: jax.Array, sliding_window: int | None) -> jax.Array:
    """Boolean `[B,1,T,S]`: causal (by slot index), padding (by `kv_mask`) and optional sliding window."""
    key_slots = jnp.arange(kv_mask_bs.shape[1])
    allowed = key_slots[None, :] <= query_slots_t[:, None]
    if sliding_window is not None:
        allowed &= key_slots[None, :] > query_slots_t[:, None] - sliding_window
    return allowed[None, None] & kv_mask_bs.astype(bool)[:, None, None, :]


def positions_from_mask(mask_bs: jax.Array) -> jax.Array:
    """Token positions that skip padding, so a left-padded row sees the same RoPE phases as unpadded."""
    return jnp.maximum(jnp.cumsum(mask_bs.astype(jnp.int32), axis=-1) - 1, 0)


def front_padding_offsets(mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(offsets [B], lengths [B])`: the slot of each row's first real token and its number of real tokens
    (at least 1, so an all-padding row stays finite in every kernel)."""
    mask = mask_bt.astype(bool)
    offsets = jnp.argmax(mask, axis=-1).astype(jnp.int32)
    lengths = jnp.maximum(jnp.sum(mask, axis=-1, dtype=jnp.int32), 1)
    return offsets, lengths


def shift_rows(x_bt: jax.Array, offsets_b: jax.Array, inverse: bool = False) -> jax.Array:
    """Rotates each row of `x [B, T, ...]` left by its offset (`x[b, (t + offset_b) mod T]`), so the real
    tokens start at slot 0; `inverse=True` rotates back."""
    length = x_bt.shape[1]
    sign = -1 if inverse else 1
    index_bt = (jnp.arange(length)[None, :] + sign * offsets_b[:, None]) % length
    index = index_bt.reshape(index_bt.shape + (1,) * (x_bt.ndim - 2))
    return jnp.take_along_axis(x_bt, index, axis=1)


# ----------------------------------------------------------------------------- implementations


def grouped_attention(q_btnh, k, v_bksh, mask_b1ts, scale: float, k_layout: str = "bkhs"):
    """Grouped-query attention of T queries over keys `k` laid out `[B,K,H,S]` (`k_layout="bkhs"`, the KV
    cache's) or `[B,K,S,H]` (`k_layout="bksh"`) and values `[B,K,S,H]`. Query head n reads kv head n // (N/K), as
    transformers groups them; softmax in float32, as `jax.nn.dot_product_attention`.

    The G = N/K query heads of a kv head are stacked as G*T rows of one `[G*T, S]` score matrix per
    (batch, kv head), so both products are plain batched matmuls: on CPU this runs the DPO/RM train step
    ~5 % faster than `jax.nn.dot_product_attention`'s XLA path."""
    batch, length, heads, head_dim = q_btnh.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q_bkqh = q_btnh.reshape(batch, length, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4).reshape(
        batch, kv_heads, group * length, head_dim)
    scores = jnp.einsum(f"bkqh,{k_layout}->bkqs", q_bkqh, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(jnp.tile(mask_b1ts, (1, 1, group, 1)), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bksh.dtype)
    out_bkqh = jnp.einsum("bkqs,bksh->bkqh", probs, v_bksh)
    return out_bkqh.reshape(batch, kv_heads, group, length, head_dim).transpose(0, 3, 1, 2, 4).reshape(
        batch, length, heads, head_dim)


def fused_attention(q_btnh, k_btkh, v_btkh, lengths_b, scale: float, sliding_window: int | None,
                    implementation: str):
    """Causal self-attention over right-padded rows of `lengths_b` real tokens through
    `jax.nn.dot_product_attention` (GQA handled by the kernel). Padding query rows come back as zeros
    (as jax's XLA path makes them), so no kernel's value for them can reach a gradient."""
    window = None if sliding_window is None else (sliding_window - 1, 0)
    out = jax.nn.dot_product_attention(
        q_btnh, k_btkh, v_btkh, scale=scale, is_causal=True, query_seq_lengths=lengths_b,
        key_value_seq_lengths=lengths_b, local_window_size=window, implementation=implementation)
    real_bt = jnp.arange(q_btnh.shape[1])[None, :] < lengths_b[:, None]
    return jnp.where(real_bt[:, :, None, None], out, jnp.zeros((), out.dtype))
