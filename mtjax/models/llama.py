"""A Llama/Mistral decoder in Flax Linen, with a causal-LM head and a scalar reward head.

One implementation serves Llama 2, Llama 3/3.1 (grouped-query attention, llama3 RoPE scaling),
SmolLM2 (tied embeddings) and Mistral (sliding-window attention). The same parameter tree feeds
training, sampling (KV-cache path) and reward scoring. Shapes are named by axis letters:
B batch, T query length, S key/cache length, D hidden, N query heads, K kv heads, H head dim,
F MLP width, V vocab.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtjax.models.attention import (
    FUSED_IMPLS,
    AttentionInputs,
    build_attention_mask,
    front_padding_offsets,
    fused_attention,
    grouped_attention,
    positions_from_mask,
    resolve_attention_impl,
    shift_rows,
)
from mtjax.models.config import ModelConfig

_init = nn.initializers.normal(stddev=0.02)


class KVCache(NamedTuple):
    """Keys `[B,K,H,S]`, values `[B,K,S,H]` per layer, and the number of slots already written.

    Unrolled layers hold one array per layer (tuples of `num_layers`); with `scan_layers` each is one
    stacked array with a leading layer axis (`[L,B,K,H,S]`, `[L,B,K,S,H]`), carried through the scan and
    updated in place one slot at a time. Either way `keys[i]` is layer i's keys.

    Each (batch, kv head) holds its keys as an `[H,S]` and its values as an `[S,H]` matrix, the operand
    layouts of the two attention products `q @ K` and `p @ V`, read in place. With `[B,S,K,H]` XLA
    transposed the whole cache of every layer at every decode step; with keys `[B,K,S,H]` the `q @ K^T`
    product alone took a quarter of a decode step on CPU (measured: 82.7 -> 68.0 ms per step of
    SmolLM2-135M at batch 32)."""

    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array
    index: jax.Array  # int32 scalar

    @property
    def stacked(self) -> bool:
        return not isinstance(self.keys, (tuple, list))

    @property
    def length(self) -> int:
        """Slots per row."""
        return self.values[0].shape[2]

    def repeat_rows(self, repeats: int) -> KVCache:
        """Each batch row repeated `repeats` times in place (`jnp.repeat` on the batch axis)."""
        axis = 1 if self.stacked else 0
        keys, values = jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=axis), (self.keys, self.values))
        return KVCache(keys, values, self.index)


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    dtype = jnp.dtype(dtype or cfg.dtype)
    key_shape = (batch_size, cfg.num_kv_heads, cfg.head_dim, max_length)
    value_shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
    if cfg.scan_layers:
        return KVCache(keys=jnp.zeros((cfg.num_layers, *key_shape), dtype),
                       values=jnp.zeros((cfg.num_layers, *value_shape), dtype), index=jnp.zeros((), jnp.int32))
    keys = tuple(jnp.zeros(key_shape, dtype) for _ in range(cfg.num_layers))
    values = tuple(jnp.zeros(value_shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(keys=keys, values=values, index=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- rotary embeddings


def rope_inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies `[H/2]` in float32, computed as transformers does (incl. llama3 scaling)."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(cfg.head_dim)
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_position
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables `[B,T,H]` for integer positions `[B,T]` (half-split layout, as in HF)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_frequencies(cfg))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_btnh: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x, kernel, n_contract: int):
    """x's trailing `n_contract` axes against the kernel's leading ones."""
    dims = ((tuple(range(x.ndim - n_contract, x.ndim)), tuple(range(n_contract))), ((), ()))
    return jax.lax.dot_general(x, kernel, dims)


def _project_fwd(x, kernel, n_contract):
    return _project(x, kernel, n_contract), (x, kernel)


def _project_bwd(n_contract, res, d_y):
    x, kernel = res
    n_lead = x.ndim - n_contract
    d_x = jax.lax.dot_general(d_y, kernel, ((tuple(range(n_lead, d_y.ndim)), tuple(range(n_contract, kernel.ndim))),
                                            ((), ())), preferred_element_type=jnp.float32)
    # Activations on the left: x^T @ dy.
    d_kernel = jax.lax.dot_general(x, d_y, ((tuple(range(n_lead)), tuple(range(n_lead))), ((), ())),
                                   preferred_element_type=jnp.float32)
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def projection_dot(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
    """The `dot_general` of every projection (`nn.Dense` / `nn.DenseGeneral`): x's trailing axes against the
    kernel's leading ones.

    Same forward as `lax.dot_general`; the difference is the backward pass, which computes the kernel
    gradient as `x^T @ dy` with the activations on the left. Left to autodiff, XLA:CPU wrote the wider
    cotangent (e.g. the `[tokens, F]` SwiGLU gradient) transposed from inside an elementwise fusion, ~35 ms
    per layer for SmolLM2-135M at 2048 tokens (the reward-model step: 11.5 -> 9.7 s)."""
    (contract_x, contract_k), (batch_x, _) = dimension_numbers
    n = len(contract_x)
    if batch_x or precision is not None or preferred_element_type is not None or \
            tuple(contract_x) != tuple(range(x.ndim - n, x.ndim)) or tuple(contract_k) != tuple(range(n)):
        return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    return _project(x, kernel, n)


def _cache_read(buffer: jax.Array, layer: jax.Array | None) -> jax.Array:
    """Layer `layer`'s slice of a stacked cache buffer (the buffer itself when it is per-layer)."""
    return buffer if layer is None else jax.lax.dynamic_index_in_dim(buffer, layer, 0, keepdims=False)


def _cache_write(buffer: jax.Array, update: jax.Array, layer: jax.Array | None, start: tuple) -> jax.Array:
    """Writes `update` at `start` of layer `layer`: one in-place slot update, never a copy of the buffer."""
    if layer is None:
        return jax.lax.dynamic_update_slice(buffer, update.astype(buffer.dtype), start)
    return jax.lax.dynamic_update_slice(buffer, update[None].astype(buffer.dtype), (layer, *start))


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, cos, sin, attn: AttentionInputs, layer_cache, cache_index, layer=None):
        """`layer_cache`: None, or `(keys, values)` buffers (per-layer, or stacked and indexed by `layer`)."""
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        def proj(heads, name):
            return nn.DenseGeneral((heads, cfg.head_dim), use_bias=cfg.attention_bias, dtype=dtype,
                                   param_dtype=pdtype, kernel_init=_init, dot_general=projection_dot,
                                   name=name)(x_btd)

        q_btnh = apply_rope(proj(cfg.num_heads, "q_proj"), cos, sin)
        k_btkh = apply_rope(proj(cfg.num_kv_heads, "k_proj"), cos, sin)
        v_btkh = proj(cfg.num_kv_heads, "v_proj")
        scale = cfg.head_dim**-0.5
        new_cache = None
        if layer_cache is None and attn.lengths_b is not None:
            out_btnh = fused_attention(q_btnh, k_btkh, v_btkh, attn.lengths_b, scale, cfg.sliding_window,
                                       resolve_attention_impl(cfg))
        elif layer_cache is None:
            out_btnh = grouped_attention(q_btnh, k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3),
                                         attn.mask_b1ts, scale, k_layout="bksh")
        else:
            keys, values = layer_cache
            keys = _cache_write(keys, k_btkh.transpose(0, 2, 3, 1), layer, (0, 0, 0, cache_index))
            values = _cache_write(values, v_btkh.transpose(0, 2, 1, 3), layer, (0, 0, cache_index, 0))
            new_cache = (keys, values)
            out_btnh = grouped_attention(q_btnh, _cache_read(keys, layer).astype(dtype),
                                         _cache_read(values, layer).astype(dtype), attn.mask_b1ts, scale)
        out_btd = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), use_bias=cfg.attention_bias, dtype=dtype,
                                  param_dtype=pdtype, kernel_init=_init, dot_general=projection_dot,
                                  name="o_proj")(out_btnh)
        return out_btd, new_cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.cfg
        dense = lambda width, name: nn.Dense(width, use_bias=cfg.mlp_bias, dtype=jnp.dtype(cfg.dtype),
                                             param_dtype=jnp.dtype(cfg.param_dtype), kernel_init=_init,
                                             dot_general=projection_dot, name=name)
        hidden_btf = nn.silu(dense(cfg.intermediate_size, "gate_proj")(x_btd)) * dense(
            cfg.intermediate_size, "up_proj")(x_btd)
        return dense(cfg.hidden_size, "down_proj")(hidden_btf)


class DecoderBlock(nn.Module):
    """One pre-norm block. Its call has the shape of an `nn.scan` body: `carry = (x, keys, values)` (the
    cache buffers None without a cache) and `(carry, None)` back; `layer` indexes stacked cache buffers."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, cos, sin, attn: AttentionInputs, cache_index, layer=None):
        cfg = self.cfg
        x_btd, keys, values = carry
        layer_cache = None if keys is None else (keys, values)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name=name)
        attn_out, new_cache = Attention(cfg, name="self_attn")(
            norm("input_layernorm")(x_btd), cos, sin, attn, layer_cache, cache_index, layer)
        x_btd = x_btd + attn_out
        x_btd = x_btd + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x_btd))
        keys, values = (None, None) if new_cache is None else new_cache
        return (x_btd, keys, values), None


def decoder_layers(cfg: ModelConfig):
    """The block module class the decoder runs: remat inside (the policy saves only each block's input),
    and under `scan_layers` one `nn.scan` over a leading layer axis of every param."""
    block = nn.remat(DecoderBlock, prevent_cse=not cfg.scan_layers) if cfg.remat else DecoderBlock
    if not cfg.scan_layers:
        return block
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers)


class Decoder(nn.Module):
    """Embeddings, blocks and the final norm: the backbone shared by both heads."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                                     param_dtype=jnp.dtype(cfg.param_dtype), embedding_init=_init)
        layers = decoder_layers(cfg)
        self.layers = layers(cfg) if cfg.scan_layers else [layers(cfg) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype))

    def __call__(self, input_ids_bt, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        cfg = self.cfg
        batch, length = input_ids_bt.shape
        if cache is None:
            kv_mask = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask
            query_slots = jnp.arange(length)
            cache_index = 0
        else:
            if attention_mask is None or attention_mask.shape[1] != cache.length:
                raise ValueError("with a KV cache, attention_mask must cover all cache slots: shape "
                                 f"[B, {cache.length}], got {None if attention_mask is None else attention_mask.shape}")
            kv_mask = attention_mask
            cache_index = cache.index
            query_slots = cache_index + jnp.arange(length)
        if position_ids is None:
            position_ids = jax.lax.dynamic_slice_in_dim(positions_from_mask(kv_mask), cache_index, length, axis=1)
        offsets = None
        if cache is None and resolve_attention_impl(cfg) in FUSED_IMPLS:
            # Sequence lengths describe right padding: move each row's real tokens to the front, and back
            # after the last block (every op but attention is per token, so this is exact).
            offsets, lengths = front_padding_offsets(kv_mask)
            input_ids_bt, position_ids = shift_rows(input_ids_bt, offsets), shift_rows(position_ids, offsets)
            attn = AttentionInputs(lengths_b=lengths)
        else:
            attn = AttentionInputs(mask_b1ts=build_attention_mask(kv_mask, query_slots, cfg.sliding_window))
        cos, sin = rope_cos_sin(cfg, position_ids, jnp.dtype(cfg.dtype))

        x_btd = self.embed_tokens(input_ids_bt)
        new_cache = None
        if cfg.scan_layers:
            carry = (x_btd, None, None) if cache is None else (x_btd, cache.keys, cache.values)
            (x_btd, keys, values), _ = self.layers(carry, cos, sin, attn, cache_index,
                                                   jnp.arange(cfg.num_layers, dtype=jnp.int32))
            if cache is not None:
                new_cache = KVCache(keys, values, cache.index + length)
        else:
            new_keys, new_values = [], []
            for i, layer in enumerate(self.layers):
                carry = (x_btd, None, None) if cache is None else (x_btd, cache.keys[i], cache.values[i])
                (x_btd, keys, values), _ = layer(carry, cos, sin, attn, cache_index)
                new_keys.append(keys)
                new_values.append(values)
            if cache is not None:
                new_cache = KVCache(tuple(new_keys), tuple(new_values), cache.index + length)
        hidden_btd = self.norm(x_btd)
        if offsets is not None:
            hidden_btd = shift_rows(hidden_btd, offsets, inverse=True)
        return hidden_btd, new_cache


class CausalLM(nn.Module):
    """`apply(params, ids, attention_mask)` → float32 logits `[B,T,V]`; with `cache=` → (logits, cache)."""

    cfg: ModelConfig

    def setup(self):
        self.model = Decoder(self.cfg)
        if not self.cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(self.cfg.vocab_size, use_bias=False, dtype=jnp.dtype(self.cfg.dtype),
                                    param_dtype=jnp.dtype(self.cfg.param_dtype), kernel_init=_init)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        hidden_btd, new_cache = self.model(input_ids, attention_mask, position_ids, cache)
        logits = self.logits_from_hidden(hidden_btd)
        return logits if cache is None else (logits, new_cache)

    def logits_from_hidden(self, hidden_btd):
        if self.cfg.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden_btd).astype(jnp.float32)
        return self.lm_head(hidden_btd).astype(jnp.float32)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None):
        """Final-norm hidden states `[B,T,D]` (for memory-lean losses that chunk the vocab projection)."""
        return self.model(input_ids, attention_mask, position_ids)[0]


def last_valid_index(attention_mask_bt: jax.Array) -> jax.Array:
    """Index of the rightmost position with mask 1 (works for left and right padding) — read by mask,
    never by token id, so pad == eos cannot move it."""
    positions = jnp.arange(attention_mask_bt.shape[1])
    return jnp.argmax(positions[None, :] * (attention_mask_bt > 0), axis=-1)


class RewardModel(nn.Module):
    """`apply(params, ids, attention_mask)` → float32 rewards `[B]` (or `[B, num_labels]`)."""

    cfg: ModelConfig

    def setup(self):
        self.model = Decoder(self.cfg)
        self.score = nn.Dense(self.cfg.num_labels, use_bias=False, dtype=jnp.dtype(self.cfg.dtype),
                              param_dtype=jnp.dtype(self.cfg.param_dtype), kernel_init=_init)

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        hidden_btd, _ = self.model(input_ids, attention_mask, position_ids)
        last_b = last_valid_index(attention_mask)
        pooled_bd = jnp.take_along_axis(hidden_btd, last_b[:, None, None], axis=1)[:, 0]
        rewards = self.score(pooled_bd).astype(jnp.float32)
        return rewards[:, 0] if self.cfg.num_labels == 1 else rewards
