"""Jitted KV-cached sampling from a `CausalLM` and batched scoring with a `RewardModel`.

`generate` runs one jitted program per batch: a prefill over the left-padded prompts into a
preallocated KV cache, then a `lax.while_loop` that decodes one token per step and exits as soon as
every row has emitted a stop id (finished rows emit `pad_token_id`). The host syncs once per batch,
never per token. Shapes are bucketed so that similar batches reuse compiled code: prompts are
left-padded to a length bucket (`bucket_length`), and the batch is padded with dummy rows.

With `num_samples = K > 1` each prompt is prefilled once: a batch holds whole groups of `g` sample rows
of one prompt (`g = K` when `K <= batch_size`), the prefill runs on the `[rows / g, L]` distinct prompts,
and its KV cache and last logits are repeated `g` times along the batch (`jnp.repeat`) in the same
jitted program before decoding (see `_plan_groups` for how `g` is chosen).

Randomness is per row: the key of sample `s` of prompt `p` is `fold_in(fold_in(key(seed), p), s)`,
folded again with the decode step, so a prompt's samples do not depend on batch composition,
`batch_size` or ordering.

Sampling filters follow transformers' order (temperature, then top-k, then top-p on the
renormalised top-k distribution); `temperature=0` is greedy decoding (argmax).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtjax.device_memory import working_on
from mtjax.models import init_cache
from mtjax.sharding import batch_divisor, batch_sharding, to_global

__all__ = [
    "Generation", "SamplingConfig", "TRACE_COUNTS", "bucket_length", "count_truncated", "decode",
    "filter_logits", "generate", "sample_logits", "score", "strip_stop",
]

# How many times each jitted program was traced (a retrace means a recompile): tests and benchmarks read it.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()
# Traced generate shapes, `(prefill rows, prompt bucket, decode rows)` -> count: shows the prefill runs on the
# de-duplicated prompts (prefill rows = decode rows / samples per prompt group).
TRACE_SHAPES: collections.Counter[tuple[int, int, int]] = collections.Counter()
# Prefill each prompt once and repeat its cache for its samples; False = one prefill per sample row (the
# earlier behaviour, kept as the reference the tests compare against; same draws either way).
SHARE_PREFILL = True

_BATCH_SETTINGS = ("sampling.max_batch_tokens", "sampling.batch_size")  # what an OOM message tells to lower


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How `generate` samples and how `generate` / `score` batch: the `sampling` section of a run.

    `temperature=0` is greedy; `top_p` in (0, 1]; `top_k=0` is off. A jitted call holds at most `batch_size`
    rows (prompt x sample) and at most `max_batch_tokens` tokens of padded rows (rows x (prompt bucket +
    `max_new_tokens`) when sampling, rows x padded length when scoring; a single longer row runs alone),
    so one long prompt cannot blow up a batch."""

    num_samples: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 32
    max_batch_tokens: int = 65536

    def __post_init__(self) -> None:
        for name, minimum in (("num_samples", 1), ("max_new_tokens", 1), ("top_k", 0), ("batch_size", 1),
                              ("max_batch_tokens", 1)):
            _check_int(f"SamplingConfig.{name}", getattr(self, name), minimum)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"SamplingConfig.temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0.0 < p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {p!r}")


@dataclasses.dataclass(frozen=True)
class Generation:
    """One sampled response: the generated ids (the stop id included when `finish_reason == "stop"`,
    nothing after it) and why it ended ("stop": a stop id was emitted; "length": `max_new_tokens`)."""

    token_ids: tuple[int, ...]
    finish_reason: str

    @property
    def length(self) -> int:
        return len(self.token_ids)


# ----------------------------------------------------------------------------- filters


def filter_logits(logits: jax.Array, temperature: float | jax.Array = 1.0, top_k: int = 0,
                  top_p: float | jax.Array = 1.0) -> jax.Array:
    """Scaled logits `[..., V]` with the tokens outside the sampling set at -inf.

    `logits / temperature` (temperature > 0), then top-k (keep the k largest; 0 = off; ties with the
    k-th value are kept), then top-p on the renormalised result (keep the smallest set of most likely
    tokens whose total probability is >= top_p; the most likely token is always kept, ties with the
    last kept value are kept). `top_k` must be a Python int; `top_p` may be traced, and the nucleus
    step is skipped only when it is a Python number >= 1.
    """
    logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    vocab = logits.shape[-1]
    neg_inf = jnp.asarray(-jnp.inf, jnp.float32)
    if top_k and top_k < vocab:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if isinstance(top_p, (int, float)) and top_p >= 1.0:
        return logits
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
    kept = mass_before < jnp.asarray(top_p, jnp.float32)
    kept = kept.at[..., 0].set(True)
    n_kept = jnp.sum(kept, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_desc, n_kept - 1, axis=-1)
    return jnp.where(logits < threshold, neg_inf, logits)


# Nucleus sampling looks for the nucleus among this many most likely tokens first (lax.top_k is cheap, a
# full-vocabulary sort is very slow on CPU); when some row's nucleus is larger, the batch falls back to an
# exact sort-free threshold search over the whole vocabulary.
NUCLEUS_CANDIDATES = 64


def _inverse_cdf(weights_bv: jax.Array, u_b: jax.Array) -> jax.Array:
    """Index drawn with probability proportional to `weights` (>= 0, in index order) by uniforms `u` in [0, 1)."""
    cum = jnp.cumsum(weights_bv, axis=-1)
    idx = jnp.sum(cum <= u_b[:, None] * cum[:, -1:], axis=-1)
    last_positive = weights_bv.shape[-1] - 1 - jnp.argmax(weights_bv[:, ::-1] > 0, axis=-1)
    return jnp.minimum(idx, last_positive).astype(jnp.int32)


def _nucleus_threshold(probs_bv: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per row, the largest t with sum(p[p >= t]) >= top_p, found exactly by bisection on the float bits
    (non-negative float32 values order like their int32 bit patterns): 31 masked sums, no sort."""
    bits = jax.lax.bitcast_convert_type(probs_bv, jnp.int32)
    lo = jnp.zeros(probs_bv.shape[:-1], jnp.int32)
    hi = jnp.max(bits, axis=-1) + 1  # invariant: mass(lo) >= top_p > mass(hi)

    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        t = jax.lax.bitcast_convert_type(mid, jnp.float32)[:, None]
        ok = jnp.sum(jnp.where(probs_bv >= t, probs_bv, 0.0), axis=-1) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, body, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _sorted_nucleus(probs_bc: jax.Array, values_bc: jax.Array, top_p) -> jax.Array:
    """Nucleus weights on candidates sorted by decreasing value (the filter_logits rule, ties kept)."""
    kept = (jnp.cumsum(probs_bc, axis=-1) - probs_bc) < top_p
    kept = kept.at[:, 0].set(True)
    threshold = jnp.take_along_axis(values_bc, jnp.sum(kept, axis=-1, keepdims=True) - 1, axis=-1)
    return jnp.where(values_bc >= threshold, probs_bc, 0.0)


def _draw_candidates(weights_bc: jax.Array, ids_bc: jax.Array, u_b: jax.Array) -> jax.Array:
    """Inverse-CDF draw over candidates taken in token-id order, so it picks the same token as a draw over
    the whole vocabulary with the same uniform."""
    order = jnp.argsort(ids_bc, axis=-1)
    ids_sorted = jnp.take_along_axis(ids_bc, order, axis=-1)
    j = _inverse_cdf(jnp.take_along_axis(weights_bc, order, axis=-1), u_b)
    return jnp.take_along_axis(ids_sorted, j[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sample_logits(logits_bv: jax.Array, u_b: jax.Array, temperature: float | jax.Array = 1.0, top_k: int = 0,
                  top_p: float | jax.Array = 1.0, candidates: int = NUCLEUS_CANDIDATES) -> jax.Array:
    """Token ids `[B]` drawn from the `filter_logits` distribution of `logits [B,V]`, one uniform `u` per row.

    The draw is an inverse-CDF lookup over the kept tokens in token-id order, so it does not depend on
    how the kept set was found: among the top `candidates` tokens (lax.top_k) when every row's nucleus
    fits there, otherwise by an exact threshold search over the vocabulary. (The two agree up to float
    rounding of probability sums; a draw can differ only when `u` or `top_p` sits within ~1e-7 of a
    boundary.)
    """
    scaled = logits_bv.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    vocab = scaled.shape[-1]
    k = top_k if 0 < top_k < vocab else 0
    use_top_p = not (isinstance(top_p, (int, float)) and top_p >= 1.0)
    top_p_arr = jnp.asarray(top_p, jnp.float32)
    neg_inf = jnp.asarray(-jnp.inf, jnp.float32)

    def top_k_masked(x):
        kth = jax.lax.top_k(x, k)[0][:, -1:]
        return jnp.where(x < kth, neg_inf, x)

    def whole_vocab(x):
        if k:
            x = top_k_masked(x)
        probs = jax.nn.softmax(x, axis=-1)
        if use_top_p:
            probs = jnp.where(probs >= _nucleus_threshold(probs, top_p_arr)[:, None], probs, 0.0)
        return _inverse_cdf(probs, u_b)

    if k and k <= candidates:  # the kept set is inside the top-k candidates
        values, ids = jax.lax.top_k(scaled, k)
        probs = jax.nn.softmax(values, axis=-1)
        if use_top_p:
            probs = _sorted_nucleus(probs, values, top_p_arr)
        return _draw_candidates(probs, ids, u_b)
    if use_top_p and candidates < vocab:
        values, ids = jax.lax.top_k(scaled, candidates)
        lse = jax.nn.logsumexp(top_k_masked(scaled) if k else scaled, axis=-1, keepdims=True)
        probs = jnp.exp(values - lse)
        fits = jnp.all(jnp.sum(probs, axis=-1) >= top_p_arr)
        weights = _sorted_nucleus(probs, values, top_p_arr)
        return jax.lax.cond(fits, lambda: _draw_candidates(weights, ids, u_b), lambda: whole_vocab(scaled))
    return whole_vocab(scaled)


def bucket_length(n: int) -> int:
    """Padded length for `n` tokens: multiples of 16 up to 128, of 64 up to 512, then of 256 (few compiled
    shapes, little padding: on CPU the prefill is a large share of the work)."""
    if n <= 128:
        return max(16, -(-n // 16) * 16)
    if n <= 512:
        return -(-n // 64) * 64
    return -(-n // 256) * 256


# ----------------------------------------------------------------------------- jitted programs


def _last_logits(module, ids_bt, kv_mask_bs, cache):
    """Cached forward that projects only the last position to the vocabulary (the prefill needs no other)."""
    hidden_btd, cache = module.model(ids_bt, kv_mask_bs, None, cache)
    return module.logits_from_hidden(hidden_btd[:, -1:])[:, 0], cache


@functools.lru_cache(maxsize=32)
def _generate_program(model_cls: type, cfg: Any, max_new_tokens: int, greedy: bool, top_k: int, use_top_p: bool):
    """The jitted prefill + while-loop decode for one model config and sampling mode.

    Shapes (prompts, prompt bucket, sample rows, number of stop ids) are left to jit's own cache;
    temperature, top_p, seed, stop ids and pad id are traced, so changing them does not recompile.

    `ids_pl`/`mask_pl` hold the `P` distinct prompts of the batch and `prompt_idx_b`/`sample_idx_b` its
    `B = P * g` sample rows, `g` consecutive rows per prompt: the prefill runs on `[P, L]` and its cache and
    last logits are repeated `g` times along the batch before the decode loop."""
    model = model_cls(cfg)
    n_new = max_new_tokens

    def run(params, ids_pl, mask_pl, prompt_idx_b, sample_idx_b, seed, temperature, top_p, eos_e, pad_id):
        TRACE_COUNTS["generate"] += 1
        n_prompts, prompt_len = ids_pl.shape
        batch = prompt_idx_b.shape[0]
        if batch % n_prompts:
            raise ValueError(f"{batch} sample rows are not a whole number of groups of the {n_prompts} prompts")
        group = batch // n_prompts
        TRACE_SHAPES[(n_prompts, prompt_len, batch)] += 1
        cache = init_cache(cfg, n_prompts, prompt_len + n_new)
        # The kv mask covers every slot; slots not yet written are hidden by the causal (slot) mask, and
        # positions are cumsum(mask) - 1, so a constant mask gives generated token j position len + j.
        kv_mask = jnp.concatenate([mask_pl.astype(jnp.int32), jnp.ones((n_prompts, n_new), jnp.int32)], axis=1)
        base = jax.random.key(seed)
        row_keys = jax.vmap(lambda p, s: jax.random.fold_in(jax.random.fold_in(base, p), s))(
            prompt_idx_b, sample_idx_b)

        def pick(logits_bv, step):
            if greedy:
                return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
            keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
            u = jax.vmap(jax.random.uniform)(keys)
            return sample_logits(logits_bv, u, temperature, top_k, top_p if use_top_p else 1.0)

        def is_stop(tok_b):
            return jnp.any(tok_b[:, None] == eos_e[None, :], axis=-1)

        logits, cache = model.apply({"params": params}, ids_pl, kv_mask, cache, method=_last_logits)
        if group > 1:  # every sample row of a prompt starts from the prompt's one prefill
            logits, kv_mask = (jnp.repeat(x, group, axis=0) for x in (logits, kv_mask))
            cache = cache.repeat_rows(group)  # per-layer or stacked (scan_layers) buffers
        tok = pick(logits, 0)
        out = jnp.full((batch, n_new), pad_id, jnp.int32).at[:, 0].set(tok)
        state = (jnp.asarray(1, jnp.int32), cache, tok, is_stop(tok), out)

        def cond(state):
            step, _, _, done, _ = state
            return (step < n_new) & ~jnp.all(done)

        def body(state):
            step, cache, prev, done, out = state
            logits, cache = model.apply({"params": params}, prev[:, None], kv_mask, cache, method=_last_logits)
            tok = jnp.where(done, pad_id, pick(logits, step))
            out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))
            return step + 1, cache, tok, done | is_stop(tok), out

        step, _, _, _, out = jax.lax.while_loop(cond, body, state)
        return out, step

    return jax.jit(run)


@functools.lru_cache(maxsize=32)
def _score_program(model_cls: type, cfg: Any):
    model = model_cls(cfg)

    def run(params, ids, mask):
        TRACE_COUNTS["score"] += 1
        return model.apply({"params": params}, ids, attention_mask=mask)

    return jax.jit(run)


# ----------------------------------------------------------------------------- host-side helpers


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_ids(name: str, seqs: Sequence[Sequence[int]], vocab: int, allow_empty: bool) -> list[np.ndarray]:
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Sequence) and not isinstance(seqs, np.ndarray):
        raise ValueError(f"{name} must be a sequence of token-id sequences, got {type(seqs).__name__}")
    out = []
    for i, seq in enumerate(seqs):
        if isinstance(seq, (str, bytes)):
            raise ValueError(f"{name}[{i}] is a string; pass token ids (tokenize first)")
        arr = np.asarray(seq, dtype=np.int64).reshape(-1)
        if arr.size == 0 and not allow_empty:
            raise ValueError(f"{name}[{i}] is empty; every prompt needs at least one token")
        if arr.size and (arr.min() < 0 or arr.max() >= vocab):
            raise ValueError(f"{name}[{i}] has token ids outside [0, {vocab}): min {arr.min()}, max {arr.max()}")
        out.append(arr.astype(np.int32))
    return out


def _padded_rows(n_rows: int, batch_size: int, divisor: int) -> int:
    """Rows a batch of `n_rows` is padded to: `batch_size`, or a smaller power of two for a small last batch
    (a few extra compiled shapes at most), always a multiple of the mesh's batch divisor."""
    rows = min(batch_size, 1 << max(n_rows - 1, 0).bit_length())
    return -(-rows // divisor) * divisor


def _plan_groups(num_samples: int, batch_size: int, divisor: int) -> tuple[int, int]:
    """`(g, prompts per batch)`: a prompt's samples are split into `ceil(K / g_max)` groups of `g` rows, as even as
    possible, each group sharing one prefill; a batch holds whole groups (`prompts per batch * g <= batch_size`
    rows). `g_max = batch_size // divisor`, so a batch has at least `divisor` groups (the prefill batch is split
    over the mesh like the sample rows). So with `K <= batch_size` (and no mesh) all K samples of a prompt share
    one prefill and a batch holds `batch_size // K` prompts (`batch_size` rounded down to a multiple of K); with
    `K > batch_size` a prompt's samples span several batches of one prompt each. A group whose prompt has fewer
    samples left than `g` is padded with copies of its last sample row (discarded)."""
    g_max = batch_size // divisor if SHARE_PREFILL else 1
    n_groups = -(-num_samples // g_max)
    group = -(-num_samples // n_groups)
    return group, batch_size // group // divisor * divisor


def _budget_chunks(items: Sequence[Any], tokens_per_item: Callable[[Any], int], max_items: int,
                   max_tokens: int) -> list[tuple[list[Any], int]]:
    """Consecutive chunks of `items` (sorted longest first, so a chunk's first item is its widest) as
    `(chunk, limit)`: at most `max_items` each, and, where `limit x tokens_per_item(first)` would exceed
    `max_tokens`, the largest power of two of items that fits (at least one). `limit` is the row count the
    chunk is padded towards (`_padded_rows`), so the padded batch stays within the budget too."""
    chunks, start = [], 0
    while start < len(items):
        fit = max_tokens // max(1, tokens_per_item(items[start]))
        limit = max_items if fit >= max_items else 1 << (max(fit, 1).bit_length() - 1)
        chunks.append((list(items[start: start + limit]), limit))
        start += limit
    return chunks


def _place(arrays: Iterable[np.ndarray], mesh) -> list[jax.Array]:
    if mesh is None:
        return [jnp.asarray(a) for a in arrays]
    sharding = batch_sharding(mesh)
    return [to_global(a, sharding) for a in arrays]  # every process holds the full host arrays


def _to_host(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _on_device(params: Any) -> Any:
    """Host (numpy) leaves are moved to the device once per call, not once per batch; device arrays are kept
    where the caller placed them."""
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), params)


def _left_pad(rows: Sequence[np.ndarray], n_rows: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((n_rows, length), pad_id, np.int32)
    mask = np.zeros((n_rows, length), np.int32)
    for r, seq in enumerate(rows):
        ids[r, length - len(seq):] = seq
        mask[r, length - len(seq):] = 1
    for r in range(len(rows), n_rows):  # dummy rows: one valid token, so no row is fully masked
        mask[r, -1] = 1
    return ids, mask


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    enabled = enabled and jax.process_index() == 0  # one bar per run, not one per host
    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------- generate


def generate(model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, num_samples: int = 1, eos_token_ids: Sequence[int],
             pad_token_id: int, seed: int = 0, batch_size: int = 32, max_batch_tokens: int = 65536, mesh=None,
             progress: bool = True, first_prompt_index: int = 0) -> list[list[Generation]]:
    """Samples `num_samples` responses for every prompt: `out[prompt][sample]`.

    Args:
      model: a `CausalLM`; params: its parameter tree (used where the caller placed it).
      prompts: token ids per prompt (no padding).
      max_new_tokens: generation budget per response (>= 1).
      temperature: 0 = greedy; top_p in (0, 1]; top_k >= 0 (0 = off).
      eos_token_ids: stop ids (any of them ends a response; may be empty).
      pad_token_id: fills prompt padding and the slots after a stop.
      seed: with (prompt index, sample index) decides every draw.
      first_prompt_index: the index of `prompts[0]` in a larger list sampled piece by piece, so that each
        piece uses the random draws one call over the whole list would (prompt i uses index
        first_prompt_index + i).
      batch_size: at most this many rows (prompt x sample) per jitted call. With `num_samples=K <= batch_size`
        a batch holds `batch_size // K` whole prompts (all their samples, sharing one prefill), i.e.
        `batch_size` is rounded down to a multiple of K; with K > batch_size a prompt's samples are split into
        even groups of at most `batch_size` rows (one prompt per batch). Results do not depend on it.
      max_batch_tokens: at most this many tokens of KV cache per jitted call, rows x (prompt bucket +
        max_new_tokens): batches of long prompts hold fewer rows (a power of two, so few shapes compile).
      mesh: optional `Mesh` with axes ('data', 'fsdp', ...): the batch is split over ('data', 'fsdp').
      progress: a tqdm bar over batches with generated tokens/s.
    """
    cfg = model.cfg
    SamplingConfig(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   top_k=top_k, batch_size=batch_size, max_batch_tokens=max_batch_tokens)  # checks every value
    seed = _check_int("seed", seed, 0)
    first_prompt_index = _check_int("first_prompt_index", first_prompt_index, 0)
    if seed >= 2**32:
        raise ValueError(f"seed must be < 2**32, got {seed}")
    pad_token_id = _check_int("pad_token_id", pad_token_id, 0)
    if isinstance(eos_token_ids, (int, np.integer)):
        raise ValueError("eos_token_ids must be a sequence of ints (e.g. [eos_id]), got a single int")
    eos = tuple(_check_int("eos_token_ids[]", int(e) if isinstance(e, np.integer) else e, 0) for e in eos_token_ids)
    if pad_token_id >= cfg.vocab_size or any(e >= cfg.vocab_size for e in eos):
        raise ValueError(f"pad_token_id / eos_token_ids must be < vocab_size={cfg.vocab_size}")
    divisor = batch_divisor(mesh)
    if batch_size % divisor:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the mesh's data*fsdp size {divisor}")
    rows = _check_ids("prompts", prompts, cfg.vocab_size, allow_empty=False)
    limit = cfg.max_position_embeddings
    for i, p in enumerate(rows):
        if len(p) + max_new_tokens > limit:
            raise ValueError(f"prompts[{i}] has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                             f"the model's max_position_embeddings={limit}")
    if not rows:
        return []

    greedy = float(temperature) == 0.0
    use_top_p = not greedy and top_p < 1.0
    program = _generate_program(type(model), cfg, max_new_tokens, greedy, top_k if not greedy else 0, use_top_p)
    params = _on_device(params)
    group, prompts_per_batch = _plan_groups(num_samples, batch_size, divisor)
    # (prompt, its sample indices) groups, longest prompts first; output order is restored at the end
    jobs = [(p, tuple(range(s, min(s + group, num_samples))))
            for p in sorted(range(len(rows)), key=lambda p: -len(rows[p])) for s in range(0, num_samples, group)]
    scalars = (jnp.asarray(seed, jnp.uint32), jnp.asarray(temperature if not greedy else 1.0, jnp.float32),
               jnp.asarray(top_p, jnp.float32), jnp.asarray(eos, jnp.int32).reshape(-1),
               jnp.asarray(pad_token_id, jnp.int32))
    results: list[list[Generation | None]] = [[None] * num_samples for _ in rows]
    eos_set = set(eos)
    n_tokens, start = 0, time.perf_counter()

    def collect(pending):
        nonlocal n_tokens
        chunk, out = pending
        tokens = _to_host(out[0])
        for j, (p, samples) in enumerate(chunk):
            for k, s in enumerate(samples):
                row = tokens[j * group + k].tolist()
                stop_at = next((i for i, t in enumerate(row) if t in eos_set), None)
                if stop_at is None:
                    results[p][s] = Generation(tuple(row), "length")
                else:
                    results[p][s] = Generation(tuple(row[: stop_at + 1]), "stop")
                n_tokens += results[p][s].length

    chunks = _budget_chunks(jobs, lambda job: group * (bucket_length(len(rows[job[0]])) + max_new_tokens),
                            prompts_per_batch, max_batch_tokens)
    pending = None
    with _progress(len(chunks), "generate", progress) as bar:
        for chunk, limit in chunks:
            n_prompts = _padded_rows(len(chunk), limit, divisor)
            length = bucket_length(max(len(rows[p]) for p, _ in chunk))
            ids, mask = _left_pad([rows[p] for p, _ in chunk], n_prompts, length, pad_token_id)
            # group j owns rows [j * group, (j + 1) * group); a short group repeats its last sample (same key:
            # it finishes with it), dummy prompts get (0, 0)
            prompt_idx = np.zeros(n_prompts * group, np.int32)
            sample_idx = np.zeros(n_prompts * group, np.int32)
            for j, (p, samples) in enumerate(chunk):
                prompt_idx[j * group: (j + 1) * group] = first_prompt_index + p
                sample_idx[j * group: (j + 1) * group] = samples[-1]
                sample_idx[j * group: j * group + len(samples)] = samples
            batch = _place([ids, mask, prompt_idx, sample_idx], mesh)
            working_on("sampling", (n_prompts * group, length + max_new_tokens), _BATCH_SETTINGS)
            out = program(params, *batch, *scalars)  # dispatched asynchronously
            if pending is not None:  # sync on the previous batch while this one runs
                collect(pending)
                bar.update(1)
                bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - start):.1f}")
            pending = (chunk, out)
        collect(pending)
        bar.update(1)
        bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - start):.1f}")
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- score


def score(reward_model, params, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
          batch_size: int = 32, max_batch_tokens: int = 65536, pad_token_id: int, mesh=None,
          progress: bool = True) -> np.ndarray:
    """Rewards `[N]` float32 of `reward_model` for each (prompt, response) pair, input = prompt + response ids.

    Pairs are sorted by length, left-padded to `bucket_length` buckets and batched: at most `batch_size`
    rows and `max_batch_tokens` padded tokens per call (fewer rows for long sequences); the reward is read
    at the last real token (by mask). Responses may be empty; prompts may not.
    """
    cfg = reward_model.cfg
    batch_size = _check_int("batch_size", batch_size, 1)
    max_batch_tokens = _check_int("max_batch_tokens", max_batch_tokens, 1)
    pad_token_id = _check_int("pad_token_id", pad_token_id, 0)
    p_rows = _check_ids("prompts", prompts, cfg.vocab_size, allow_empty=False)
    r_rows = _check_ids("responses", responses, cfg.vocab_size, allow_empty=True)
    if len(p_rows) != len(r_rows):
        raise ValueError(f"prompts and responses must pair up: {len(p_rows)} prompts vs {len(r_rows)} responses")
    divisor = batch_divisor(mesh)
    if batch_size % divisor:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the mesh's data*fsdp size {divisor}")
    seqs = [np.concatenate([p, r]) for p, r in zip(p_rows, r_rows, strict=True)]
    for i, s in enumerate(seqs):
        if len(s) > cfg.max_position_embeddings:
            raise ValueError(f"prompts[{i}] + responses[{i}] has {len(s)} tokens, more than the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
    program = _score_program(type(reward_model), cfg)
    params = _on_device(params)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    chunks = _budget_chunks(order, lambda i: bucket_length(len(seqs[i])), batch_size, max_batch_tokens)
    rewards = np.zeros(len(seqs), np.float32)
    pending = None
    with _progress(len(chunks), "score", progress) as bar:
        for chunk, limit in chunks + [(None, 0)]:
            out = None
            if chunk is not None:
                n_rows = _padded_rows(len(chunk), limit, divisor)
                ids, mask = _left_pad([seqs[i] for i in chunk], n_rows, bucket_length(len(seqs[chunk[0]])),
                                      pad_token_id)
                working_on("reward scoring", ids.shape, _BATCH_SETTINGS)
                out = program(params, *_place([ids, mask], mesh))
            if pending is not None:
                prev_chunk, prev_out = pending
                rewards[prev_chunk] = _to_host(prev_out)[: len(prev_chunk)].reshape(len(prev_chunk), -1)[:, 0]
                bar.update(1)
            pending = (chunk, out)
    return rewards


# ----------------------------------------------------------------------------- hygiene


def _ids_of(item: Any) -> tuple[int, ...]:
    return tuple(int(t) for t in (item.token_ids if isinstance(item, Generation) else item))


def strip_stop(ids: Sequence[int] | Generation, stop_ids: Iterable[int]) -> tuple[int, ...]:
    """The ids without their trailing stop ids (e.g. for decoding to text)."""
    ids, stops = _ids_of(ids), {int(s) for s in stop_ids}
    end = len(ids)
    while end and ids[end - 1] in stops:
        end -= 1
    return ids[:end]


def decode(tokenizer: Any, ids: Sequence[int] | Generation, stop_ids: Iterable[int] = (),
           skip_special_tokens: bool = True) -> str:
    """Text of a response, trailing stop ids removed."""
    return tokenizer.decode(list(strip_stop(ids, stop_ids)), skip_special_tokens=skip_special_tokens)


def count_truncated(generations: Iterable[Any]) -> int:
    """Number of generations that hit `max_new_tokens` (finish_reason "length"); flat or nested lists."""
    n = 0
    for g in generations:
        if isinstance(g, Generation):
            n += g.finish_reason == "length"
        else:
            n += count_truncated(g)
    return n
