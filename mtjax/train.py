"""Optimizer, train state and the jitted, sharded DPO-family and reward-model train steps.

The last stage of the data flow (pairs → train step → checkpoint): the EM loop builds a step once per
phase with `make_dpo_step` (policy, E-step) or `make_reward_model_step` (reward model, M-step) and feeds
it batches of token-id pairs. Steps are exact under gradient accumulation: each micro-batch contributes
the SUM of its per-pair losses, and the total is divided by the global number of pairs, so 4 micro-batches
of 2 pairs give the same update as one batch of 8. The step metrics follow the same rule (sums over pairs
or tokens divided by whole-batch totals; minima and maxima over real pairs), so they too are independent of
the micro-batch split and of weight-0 padding rows. Layout comes from `mtjax.sharding`; numerics (bf16
compute over float32 master weights, remat) come from the model config (`dtype`, `param_dtype`, `remat`).

Batch layout (dicts of arrays, leading dim = pairs; chosen and rejected may have different lengths):

* DPO: ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_loss_mask`` and the same three for
  ``rejected_``; ``loss_mask`` is 1 on completion tokens (EOS included), 0 on prompt and padding.
  With `DPOConfig.reference="precomputed"` also ``reference_chosen_logps``, ``reference_rejected_logps``.
* Reward model: ``chosen_input_ids``, ``chosen_attention_mask``, ``rejected_input_ids``,
  ``rejected_attention_mask``, optionally ``margin``.
* Both: optional ``pair_weight`` (1 real pair, 0 padding row), so a short last batch is padded, not
  dropped, and still averages over its real pairs only.
* SFT (`make_sft_step`, rows are single sequences): ``input_ids``, ``attention_mask``, ``loss_mask`` (as
  `mtjax.data.collate` builds them) and optional ``sequence_weight`` (1 real row, 0 padding row).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtjax import losses
from mtjax.sharding import (
    BATCH_AXES,
    LLAMA_PARTITION_RULES,
    PartitionRules,
    batch_divisor,
    batch_sharding,
    micro_batches_split,
    path_to_str,
    replicated,
    shard_global_batch,
    tree_shardings,
)

DPO_LOSS_TYPES = ("dpo", "ipo", "hinge", "simpo", "sppo")
DPO_BATCH_KEYS = (
    "chosen_input_ids",
    "chosen_attention_mask",
    "chosen_loss_mask",
    "rejected_input_ids",
    "rejected_attention_mask",
    "rejected_loss_mask",
)
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")
# SPPO's per-pair targets: each response's estimated win probability against the reference policy.
WIN_PROB_KEYS = ("chosen_win_prob", "rejected_win_prob")
REWARD_BATCH_KEYS = ("chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask")
SFT_BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")
SFT_NORMALIZATIONS = ("token", "sequence")

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

# optax >= 0.2.5 has `optax.tree.norm` (and deprecates `global_norm`); older releases only the latter.
_tree_norm = optax.tree.norm if hasattr(optax, "tree") else optax.global_norm


# ----------------------------------------------------------------------------- optimizer


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup (to `learning_rate` over `warmup_ratio * total_steps`) then cosine decay
    to 0 at `total_steps` — the schedule of transformers' `get_cosine_schedule_with_warmup`."""

    learning_rate: float = 7e-7
    total_steps: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check_all(self, [
            (self.total_steps >= 1, f"total_steps must be >= 1, got {self.total_steps}"),
            (_finite(self.learning_rate) and self.learning_rate > 0,
             f"learning_rate must be a finite number > 0, got {self.learning_rate}"),
            (_finite(self.warmup_ratio) and 0.0 <= self.warmup_ratio <= 1.0,
             f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}"),
            (_finite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be a finite number >= 0, got {self.weight_decay}"),
            (self.max_grad_norm is None or (_finite(self.max_grad_norm) and self.max_grad_norm > 0),
             f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}"),
            (_finite(self.b1) and 0.0 <= self.b1 < 1.0 and _finite(self.b2) and 0.0 <= self.b2 < 1.0,
             f"b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}"),
            (_finite(self.eps) and self.eps > 0, f"eps must be a finite number > 0, got {self.eps}"),
        ])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_all(config: Any, checks: list[tuple[bool, str]]) -> None:
    """Raises one ValueError naming every failed check as `Class.message`, joined by '; '."""
    failed = [f"{type(config).__name__}.{message}" for ok, message in checks if not ok]
    if failed:
        raise ValueError("; ".join(failed))


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    warmup_steps = math.ceil(config.warmup_ratio * config.total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(config.total_steps, warmup_steps + 1),
        end_value=0.0,
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on weight matrices only, not on norm scales or biases (as transformers' Trainer)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not path_to_str(path).endswith(("scale", "bias")), params
    )


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=_decay_mask,
    )
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


# ----------------------------------------------------------------------------- train state


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: optax.OptState


def train_state_shardings(
    model: nn.Module, optimizer_config: OptimizerConfig, mesh: Mesh, rules: PartitionRules = LLAMA_PARTITION_RULES
) -> TrainState:
    """NamedShardings of the TrainState for `model` (computed from shapes only, nothing allocated)."""
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
    state = jax.eval_shape(
        lambda p: TrainState(jnp.zeros((), jnp.int32), p, make_optimizer(optimizer_config).init(p)), params
    )
    return tree_shardings(state, mesh, rules)


def init_train_state(
    params: Any, optimizer_config: OptimizerConfig, mesh: Mesh, rules: PartitionRules = LLAMA_PARTITION_RULES
) -> TrainState:
    """Places a copy of `params` on `mesh` and creates the optimizer state there, sharded like the params.

    The state never aliases the caller's buffers (`may_alias=False`), so steps that donate the state
    leave `params` usable, e.g. as the frozen reference or the next iteration's starting point.
    """
    params = jax.device_put(params, tree_shardings(params, mesh, rules), may_alias=False)
    optimizer = make_optimizer(optimizer_config)
    opt_shardings = tree_shardings(jax.eval_shape(optimizer.init, params), mesh, rules)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))
    return TrainState(step=step, params=params, opt_state=opt_state)


# ----------------------------------------------------------------------------- shared pieces


def _check_keys(batch: Batch, required: tuple[str, ...], what: str) -> None:
    missing = [key for key in required if key not in batch]
    if missing:
        raise KeyError(f"{what} batch is missing {missing}; it has {sorted(batch)}")


def _pad_time(x: jax.Array, length: int) -> jax.Array:
    return x if x.shape[1] == length else jnp.pad(x, ((0, 0), (0, length - x.shape[1])))


def _interleave_pairs(chosen: jax.Array, rejected: jax.Array) -> jax.Array:
    """`[B, Tc]`, `[B, Tr]` → `[2B, max(Tc, Tr)]` with rows (c0, r0, c1, r1, ...).

    One forward pass over both halves; interleaving (not concatenating) keeps each device's rows on
    that device under a batch-sharded layout, so no resharding is needed.
    """
    length = max(chosen.shape[1], rejected.shape[1])
    stacked = jnp.stack([_pad_time(chosen, length), _pad_time(rejected, length)], axis=1)
    return stacked.reshape(-1, length)


def _split_pairs(values_2b: jax.Array) -> tuple[jax.Array, jax.Array]:
    pairs = values_2b.reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def _pair_weights(batch: Batch) -> jax.Array:
    num_pairs = batch["chosen_input_ids"].shape[0]
    if "pair_weight" in batch:
        return batch["pair_weight"].astype(jnp.float32)
    return jnp.ones((num_pairs,), jnp.float32)


def _split_micro_batches(batch: Batch, num_micro_batches: int, mesh: Mesh) -> dict[str, jax.Array]:
    """`[B, ...]` → `[M, B/M, ...]`, micro-batch m = rows m, m+M, m+2M, ...

    Strided rows keep every micro-batch spread over all devices of a batch-sharded layout, so the split
    is local. (Which rows share a micro-batch does not matter: the loss is a sum over pairs.)
    """
    out = {}
    for name, x in batch.items():
        if x.shape[0] % num_micro_batches:
            raise ValueError(
                f"batch[{name!r}] has {x.shape[0]} pairs, not divisible into {num_micro_batches} micro-batches"
            )
        x = x.reshape(x.shape[0] // num_micro_batches, num_micro_batches, *x.shape[1:]).swapaxes(0, 1)
        out[name] = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES)))
    return out


def _check_micro_batch_size(batch: Batch, num_micro_batches: int, mesh: Mesh, rows: str = "chosen_input_ids",
                            unit: str = "pairs") -> None:
    num_rows = batch[rows].shape[0]
    if not micro_batches_split(num_rows, num_micro_batches, mesh):
        raise ValueError(
            f"{num_rows} {unit} in {num_micro_batches} micro-batches: each micro-batch must be a whole multiple "
            f"of the data*fsdp mesh size {batch_divisor(mesh)}"
        )


_EXTREME_START = {"max_": -jnp.inf, "min_": jnp.inf}


def _combine(name: str, total: jax.Array, value: jax.Array) -> jax.Array:
    if name.startswith("max_"):
        return jnp.maximum(total, value)
    if name.startswith("min_"):
        return jnp.minimum(total, value)
    return total + value


def _accumulate(
    micro_step: Callable[[Any, Batch], tuple[Any, Metrics]],
    params: Any,
    batch: Batch,
    num_micro_batches: int,
    mesh: Mesh,
    rules: PartitionRules,
) -> tuple[Any, Metrics]:
    """Sums `(grads, metric sums)` of `micro_step` over micro-batches with `lax.scan` (float32 grads).

    Metrics whose name starts with "max_" are maxima, "min_" minima, the rest sums.
    """
    if num_micro_batches == 1:
        return micro_step(params, batch)
    micro_batches = _split_micro_batches(batch, num_micro_batches, mesh)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    grads_shape, metrics_shape = jax.eval_shape(micro_step, params, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (grads_shape, metrics_shape))
    zeros = (
        jax.lax.with_sharding_constraint(zeros[0], tree_shardings(zeros[0], mesh, rules)),
        {k: jnp.full((), _EXTREME_START.get(k[:4], 0.0)) for k in zeros[1]},
    )

    def body(carry, micro):
        grads, metrics = micro_step(params, micro)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry[0], grads)
        metric_sum = {k: _combine(k, carry[1][k], v) for k, v in metrics.items()}
        return (grad_sum, metric_sum), None

    (grads, metrics), _ = jax.lax.scan(body, zeros, micro_batches)
    return grads, metrics


def _apply_update(
    state: TrainState, grads: Any, optimizer: optax.GradientTransformation, schedule: optax.Schedule
) -> tuple[TrainState, Metrics]:
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {"grad_norm": _tree_norm(grads), "learning_rate": schedule(state.step)}


def _weighted_sums(per_pair: Mapping[str, jax.Array], weights: jax.Array) -> Metrics:
    return {name: jnp.sum(value * weights) for name, value in per_pair.items()}


def _extremes(per_pair: Mapping[str, jax.Array], weights: jax.Array) -> Metrics:
    """`min_NAME` and `max_NAME` of each `[B]` value over the real pairs (weight > 0) of a micro-batch."""
    real = weights > 0
    out = {}
    for name, value in per_pair.items():
        out[f"min_{name}"] = jnp.min(jnp.where(real, value, jnp.inf))
        out[f"max_{name}"] = jnp.max(jnp.where(real, value, -jnp.inf))
    return out


# Per-token means over the chosen responses' completion tokens: their sums are divided by CHOSEN_TOKENS.
TOKEN_MEAN_METRICS = ("entropy", "mean_token_accuracy")
CHOSEN_TOKENS = "num_chosen_completion_tokens"


def _finalize_metrics(sums: Metrics, num_pairs: jax.Array) -> Metrics:
    """Turns accumulated sums into logged values: weighted sums become means over the real pairs,
    `TOKEN_MEAN_METRICS` means over the chosen completion tokens; maxima, minima and counts pass through.
    Both denominators are totals of the whole batch, so the means are exact under accumulation."""
    out = {}
    for name, value in sums.items():
        if name.startswith(("max_", "min_", "num_")):
            out[name] = value
        elif name in TOKEN_MEAN_METRICS:
            out[name] = value / jnp.maximum(sums[CHOSEN_TOKENS], 1.0)
        else:
            out[name] = value / num_pairs
    return out


def _input_tokens(batch: Batch) -> jax.Array:
    """Non-padding tokens (prompt and completion, chosen and rejected) of each pair, `[B]` float32:
    the per-pair count behind TRL's cumulative `num_tokens`."""
    return (jnp.sum(batch["chosen_attention_mask"], axis=-1) + jnp.sum(batch["rejected_attention_mask"], axis=-1)
            ).astype(jnp.float32)


# ----------------------------------------------------------------------------- DPO family


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Objective and execution of the policy step.

    `loss_type="sppo"` (`losses.sppo_loss`) reads each pair's `chosen_win_prob` / `rejected_win_prob` from the
    batch (`losses.sppo_win_probabilities` of the reward model's scores over a prompt's K samples).

    `average_logprobs=None` picks the paper's choice: SimPO length-averages, DPO/IPO/hinge/SPPO sum (TRL's
    IPO averages: set True to match it). `reference="model"` computes reference log-probs inside the step
    from frozen reference params; `"precomputed"` reads them from the batch (see
    `precompute_reference_logprobs`). SimPO needs no reference.
    """

    loss_type: str = "dpo"
    beta: float = 0.01
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    average_logprobs: bool | None = None
    num_micro_batches: int = 1
    reference: str = "model"
    logits_chunk: int | None = None

    def __post_init__(self) -> None:
        _check_all(self, [
            (self.logits_chunk is None or self.logits_chunk >= 1,
             f"logits_chunk must be None or >= 1, got {self.logits_chunk}"),
            (self.loss_type in DPO_LOSS_TYPES, f"loss_type={self.loss_type!r} is not one of {DPO_LOSS_TYPES}"),
            (self.reference in ("model", "precomputed"),
             f"reference={self.reference!r} is not 'model' or 'precomputed'"),
            (_finite(self.beta) and self.beta > 0, f"beta must be a finite number > 0, got {self.beta}"),
            (_finite(self.label_smoothing) and 0.0 <= self.label_smoothing < 0.5,
             f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}"),
            (_finite(self.simpo_gamma), f"simpo_gamma must be a finite number, got {self.simpo_gamma}"),
            (self.num_micro_batches >= 1, f"num_micro_batches must be >= 1, got {self.num_micro_batches}"),
        ])

    @property
    def uses_reference(self) -> bool:
        return self.loss_type != "simpo"

    @property
    def averages_logprobs(self) -> bool:
        return self.loss_type == "simpo" if self.average_logprobs is None else self.average_logprobs


def pair_logprobs(
    model: nn.Module, params: Any, batch: Batch, average: bool = False, logits_chunk: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Completion log-probs of chosen and rejected (`[B]` each) from one forward pass over both, and the
    number of completion tokens per pair `[B]`. The one code path for policy and reference.

    `logits_chunk=None` materialises the full `[2B, T, V]` float32 logits. An int c instead projects the
    final hidden states onto the vocabulary c positions at a time inside a rematerialised `lax.scan`, so
    only `[2B, c, V]` logits are ever live (forward and backward): the memory-lean path for long
    sequences and large vocabularies. Same values up to float32 summation order.
    """
    chosen, rejected, tokens, _ = _pair_forward(model, params, batch, average, logits_chunk, token_stats=False)
    return chosen, rejected, tokens


def _pair_forward(model: nn.Module, params: Any, batch: Batch, average: bool, logits_chunk: int | None,
                  token_stats: bool) -> tuple[jax.Array, jax.Array, jax.Array, Metrics | None]:
    """`pair_logprobs`, and with `token_stats` also the chosen responses' `losses.completion_token_stats`
    (`[B]` sums), taken from the same logits: no second vocabulary projection, no gradient through them."""
    input_ids = _interleave_pairs(batch["chosen_input_ids"], batch["rejected_input_ids"])
    attention_mask = _interleave_pairs(batch["chosen_attention_mask"], batch["rejected_attention_mask"])
    loss_mask = _interleave_pairs(batch["chosen_loss_mask"], batch["rejected_loss_mask"])
    logps, tokens, stats = completion_logprobs(model, params, input_ids, attention_mask, loss_mask, average,
                                               logits_chunk, token_stats)
    chosen, rejected = _split_pairs(logps)
    return chosen, rejected, tokens.reshape(-1, 2).sum(-1), stats


def completion_logprobs(
    model: nn.Module,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    loss_mask: jax.Array,
    average: bool = False,
    logits_chunk: int | None = None,
    token_stats: bool = False,
) -> tuple[jax.Array, jax.Array, Metrics | None]:
    """Log-prob of each row's completion tokens `[B]` (summed, or length-averaged with `average`), the
    number of completion tokens counted per row `[B]`, and with `token_stats` the even rows' (a pair batch's
    chosen responses') `losses.completion_token_stats` from the same logits: the forward pass shared by DPO
    and SFT.

    `loss_mask` is 1 on the completion tokens (EOS included); each is predicted from the position before
    it. `logits_chunk`: see `pair_logprobs`.
    """
    labels, label_mask = losses.shift_for_next_token(input_ids, loss_mask)
    if logits_chunk is None or logits_chunk >= input_ids.shape[1]:
        logits = model.apply({"params": params}, input_ids, attention_mask=attention_mask)
        logps = losses.sequence_logprobs(logits, labels, label_mask, average=average)
        stats = _chosen_token_stats(logits, labels, label_mask) if token_stats else None
    else:
        logps, stats = _chunked_sequence_logprobs(model, params, input_ids, attention_mask, labels, label_mask,
                                                  average, logits_chunk, token_stats)
    return logps, jnp.sum(label_mask, axis=-1), stats


# Positions per reduction of the chosen-token statistics: a softmax over the vocabulary taken over all
# positions at once makes XLA hold one more [B, T, V] float32 buffer; in pieces it holds [B, 128, V].
TOKEN_STATS_CHUNK = 128


def _chosen_token_stats(logits: jax.Array, labels: jax.Array, label_mask: jax.Array,
                        in_pieces: bool = True) -> Metrics:
    """`losses.completion_token_stats` of the chosen rows (the even rows of `_interleave_pairs`) plus their
    token count, outside autodiff, from logits the loss already holds. `in_pieces`: `TOKEN_STATS_CHUNK`
    positions at a time (the last piece shifted back to end at T, positions an earlier piece counted
    masked); the chunked-logits path passes pieces that are small already."""
    logits = jax.lax.stop_gradient(logits)
    tokens = jnp.sum(label_mask[0::2], axis=-1)
    length, chunk = logits.shape[1], min(TOKEN_STATS_CHUNK, logits.shape[1])
    if not in_pieces or chunk == length:
        return {**losses.completion_token_stats(logits[0::2], labels[0::2], label_mask[0::2]), "tokens": tokens}

    def add_piece(index, totals):
        start = jnp.minimum(index * chunk, length - chunk)
        piece = [jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)[0::2] for x in (logits, labels, label_mask)]
        fresh = start + jnp.arange(chunk) >= index * chunk
        stats = losses.completion_token_stats(piece[0], piece[1], piece[2] * fresh)
        return {name: totals[name] + stats[name] for name in totals}

    zeros = jnp.zeros((logits.shape[0] // 2,), jnp.float32)
    totals = jax.lax.fori_loop(0, -(-length // chunk), add_piece, {"entropy": zeros, "correct": zeros})
    return {**totals, "tokens": tokens}


def _chunked_sequence_logprobs(model, params, input_ids, attention_mask, labels, label_mask, average, chunk,
                               token_stats=False):
    """`losses.sequence_logprobs` of the model's logits, computed `chunk` positions at a time, and (with
    `token_stats`) the chosen rows' token statistics summed over the chunks."""
    if not (hasattr(model, "hidden_states") and hasattr(model, "logits_from_hidden")):
        raise TypeError(f"logits_chunk needs a causal LM with hidden_states/logits_from_hidden, got {type(model)}")
    hidden = model.apply({"params": params}, input_ids, attention_mask=attention_mask,
                         method=type(model).hidden_states)
    batch, length = labels.shape
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    if pad:  # padded positions carry mask 0: they add exactly nothing
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        label_mask = jnp.pad(label_mask, ((0, 0), (0, pad)))

    def to_chunks(x):  # [B, n*c, ...] -> [n, B, c, ...]
        return jnp.moveaxis(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(total, xs):
        hidden_chunk, labels_chunk, mask_chunk = xs
        logits = model.apply({"params": params}, hidden_chunk, method=type(model).logits_from_hidden)
        stats = _chosen_token_stats(logits, labels_chunk, mask_chunk, in_pieces=False) if token_stats else None
        return total + losses.sequence_logprobs(logits, labels_chunk, mask_chunk), stats

    total, stats = jax.lax.scan(body, jnp.zeros((batch,), jnp.float32),
                                (to_chunks(hidden), to_chunks(labels), to_chunks(label_mask)))
    if average:
        total = total / jnp.maximum(jnp.sum(label_mask, axis=-1), 1.0)
    return total, (jax.tree.map(lambda per_chunk: per_chunk.sum(0), stats) if token_stats else None)


def _dpo_family_loss(config: DPOConfig, pc, pr, rc, rr, micro: Batch) -> jax.Array:
    if config.loss_type == "sppo":
        return losses.sppo_loss(pc, pr, rc, rr, micro["chosen_win_prob"], micro["rejected_win_prob"], config.beta)
    if config.loss_type == "dpo":
        return losses.dpo_loss(pc, pr, rc, rr, config.beta, config.label_smoothing)
    if config.loss_type == "ipo":
        return losses.ipo_loss(pc, pr, rc, rr, config.beta)
    if config.loss_type == "hinge":
        return losses.hinge_loss(pc, pr, rc, rr, config.beta)
    return losses.simpo_loss(pc, pr, config.beta, config.simpo_gamma, config.label_smoothing)


def _dpo_loss_and_grads(model: nn.Module, config: DPOConfig, mesh: Mesh, rules: PartitionRules) -> Callable:
    """`(params, reference_params | None, batch) -> (grads, metric sums)`, exact under accumulation."""
    average = config.averages_logprobs

    def loss_and_grads(params, reference_params, batch):
        weights_all = _pair_weights(batch)
        num_pairs = jnp.maximum(jnp.sum(weights_all), 1.0)
        batch = {**batch, "pair_weight": weights_all}

        def micro_step(params, micro):
            weights = micro["pair_weight"]
            if not config.uses_reference:
                rc = rr = None
            elif config.reference == "precomputed":
                rc, rr = micro["reference_chosen_logps"], micro["reference_rejected_logps"]
            else:
                rc, rr, _ = jax.lax.stop_gradient(
                    pair_logprobs(model, reference_params, micro, average, config.logits_chunk)
                )

            def summed_loss(params):
                pc, pr, tokens, chosen_tokens = _pair_forward(model, params, micro, average, config.logits_chunk,
                                                              token_stats=True)
                per_pair = _dpo_family_loss(config, pc, pr, rc, rr, micro)
                return jnp.sum(per_pair * weights) / num_pairs, (pc, pr, tokens, chosen_tokens, per_pair)

            grads, (pc, pr, tokens, chosen_tokens, per_pair) = jax.grad(summed_loss, has_aux=True)(params)
            stats = losses.preference_metrics(pc, pr, rc, rr, config.beta)
            stats["loss"] = per_pair
            if config.uses_reference and not average:  # KL needs whole-sequence log-ratios
                stats["kl"] = 0.5 * (losses.sampled_kl(pc, rc) + losses.sampled_kl(pr, rr))
            stats["entropy"] = chosen_tokens["entropy"]  # token sums: _finalize_metrics divides by CHOSEN_TOKENS
            stats["mean_token_accuracy"] = chosen_tokens["correct"]
            sums = _weighted_sums(stats, weights)
            delta = pc - pr if rc is None else (pc - rc) - (pr - rr)
            sums["max_abs_logratio_margin"] = jnp.max(jnp.where(weights > 0, jnp.abs(delta), -jnp.inf))
            sums["num_pairs"] = jnp.sum(weights)
            sums["num_completion_tokens"] = jnp.sum(tokens * weights)
            sums[CHOSEN_TOKENS] = jnp.sum(chosen_tokens["tokens"] * weights)
            sums["num_input_tokens"] = jnp.sum(_input_tokens(micro) * weights)
            return grads, sums

        grads, sums = _accumulate(micro_step, params, batch, config.num_micro_batches, mesh, rules)
        return grads, _finalize_metrics(sums, num_pairs)

    return loss_and_grads


def make_dpo_step(
    model: nn.Module,
    config: DPOConfig,
    optimizer_config: OptimizerConfig,
    mesh: Mesh,
    rules: PartitionRules = LLAMA_PARTITION_RULES,
    donate_state: bool = True,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """The jitted policy step.

    Returns `step(state, reference_params, batch)` for `config.reference == "model"` and
    `step(state, batch)` otherwise (precomputed reference log-probs, or SimPO). Inputs are placed on
    `mesh` by `in_shardings` (host arrays are sharded on the way in; device arrays must already carry
    the shardings of `init_train_state` / `shard_batch`). Metrics are float32 scalars under TRL's names:
    `loss`, `rewards/{chosen,rejected,margins,accuracies}`, `logps/{chosen,rejected}` (means over real
    pairs); `kl` (mean `losses.sampled_kl` over both responses; only with a reference and summed
    log-probs); `entropy` and `mean_token_accuracy` (per-token means over the chosen completions, from the
    step's own logits); `max_abs_logratio_margin` (max |Δ| over real pairs), `grad_norm` (before clipping),
    `learning_rate`; counts `num_pairs`, `num_completion_tokens` (chosen + rejected),
    `num_chosen_completion_tokens` and `num_input_tokens` (non-padding tokens, prompts included: the
    step's share of TRL's cumulative `num_tokens`, which `mtjax.tracking` sums up).
    """
    optimizer = make_optimizer(optimizer_config)
    schedule = learning_rate_schedule(optimizer_config)
    loss_and_grads = _dpo_loss_and_grads(model, config, mesh, rules)
    required = DPO_BATCH_KEYS + (REFERENCE_KEYS if config.uses_reference and config.reference == "precomputed" else ())
    required += WIN_PROB_KEYS if config.loss_type == "sppo" else ()

    def step(state: TrainState, reference_params: Any, batch: Batch) -> tuple[TrainState, Metrics]:
        _check_keys(batch, required, "DPO")
        _check_micro_batch_size(batch, config.num_micro_batches, mesh)
        grads, metrics = loss_and_grads(state.params, reference_params, batch)
        state, update_metrics = _apply_update(state, grads, optimizer, schedule)
        return state, {**metrics, **update_metrics}

    state_shardings = train_state_shardings(model, optimizer_config, mesh, rules)
    out_shardings = (state_shardings, replicated(mesh))
    donate = (0,) if donate_state else ()
    if config.uses_reference and config.reference == "model":
        return jax.jit(
            step,
            in_shardings=(state_shardings, state_shardings.params, batch_sharding(mesh)),
            out_shardings=out_shardings,
            donate_argnums=donate,
        )
    return jax.jit(
        lambda state, batch: step(state, None, batch),
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=out_shardings,
        donate_argnums=donate,
    )


# ----------------------------------------------------------------------------- reference log-probs


def make_reference_logprobs_fn(
    model: nn.Module,
    mesh: Mesh,
    average: bool = False,
    rules: PartitionRules = LLAMA_PARTITION_RULES,
    logits_chunk: int | None = None,
) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """Jitted `(params, batch) -> (chosen_logps [B], rejected_logps [B])` on the step's code path
    (pass the step's `DPOConfig.logits_chunk` for identical arithmetic)."""
    params_shardings = tree_shardings(
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]),
        mesh,
        rules,
    )

    def logprobs(params, batch):
        chosen, rejected, _ = pair_logprobs(model, params, batch, average, logits_chunk)
        return chosen, rejected

    return jax.jit(
        logprobs, in_shardings=(params_shardings, batch_sharding(mesh)), out_shardings=replicated(mesh)
    )


def fingerprint_arrays(arrays: Mapping[str, Any]) -> str:
    """sha256 over names, shapes, dtypes and bytes of a dict of host arrays."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(np.asarray(arrays[name]))
        digest.update(f"{name}:{value.shape}:{value.dtype};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _leaf_checksums(leaf: jax.Array) -> jax.Array:
    x = leaf.astype(jnp.float32).reshape(-1)
    position_weights = (jnp.arange(x.shape[0], dtype=jnp.int32) % 7 - 3).astype(jnp.float32)
    return jnp.stack([jnp.sum(x), jnp.sum(x * x), jnp.sum(x * position_weights)])


@jax.jit
def _tree_checksums(tree: Any) -> Any:
    return jax.tree.map(_leaf_checksums, tree)


def fingerprint_params(params: Any) -> str:
    """A cheap identity for a parameter pytree: sha256 over each leaf's path, shape, dtype, and three
    on-device float32 checksums (sum, sum of squares, a position-weighted sum).

    Any training step changes it; it is not a hash of the raw bytes, so two different checkpoints
    colliding is (vanishingly) possible — pass an explicit `reference_id` where that matters.
    """

    checksums = jax.device_get(_tree_checksums(params))
    digest = hashlib.sha256()
    for (path, leaf), sums in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(checksums), strict=True
    ):
        digest.update(f"{path_to_str(path)}:{np.shape(leaf)}:{leaf.dtype};".encode())
        digest.update(np.asarray(sums).tobytes())
    return digest.hexdigest()


class ReferenceLogprobCache:
    """Reference log-probs keyed by (data, reference params, model config, averaging), in memory and
    optionally as `.npz` files under `directory` so a resumed run does not recompute them. Each file holds
    a SHA-256 of its key and values: a file that does not match (damaged, or other values put in its place)
    is reported and recomputed, never used."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self._memory: dict[str, dict[str, np.ndarray]] = {}
        self._directory = Path(directory) if directory is not None else None

    def _path(self, key: str) -> Path | None:
        return None if self._directory is None else self._directory / f"reference_logps_{key}.npz"

    @staticmethod
    def _checksum(key: str, value: Mapping[str, np.ndarray]) -> str:
        digest = hashlib.sha256(key.encode())
        for name in REFERENCE_KEYS:
            array = np.ascontiguousarray(value[name], np.float32)
            digest.update(f"{name}{array.shape}".encode() + array.tobytes())
        return digest.hexdigest()

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        if key in self._memory:
            return self._memory[key]
        path = self._path(key)
        if path is not None and path.exists():
            try:
                with np.load(path) as stored:
                    value = {name: stored[name] for name in REFERENCE_KEYS}
                    intact = str(stored["checksum"]) == self._checksum(key, value)
            except (OSError, ValueError, KeyError, EOFError):
                intact = False
            if not intact:
                print(f"mtjax: {path} does not match its checksum (damaged or replaced); recomputing it", flush=True)
                return None
            self._memory[key] = value
            return value
        return None

    def put(self, key: str, value: dict[str, np.ndarray]) -> None:
        self._memory[key] = value
        path = self._path(key)
        if path is not None and jax.process_index() == 0:  # every process holds the same values
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, checksum=np.asarray(self._checksum(key, value)), **value)
            os.replace(tmp, path)


def _padded_batches(data: Mapping[str, np.ndarray], batch_size: int) -> Iterator[tuple[dict, int]]:
    """Fixed-size batches over all rows; the last is padded by repeating its final row (never dropped)."""
    num_rows = len(next(iter(data.values())))
    for start in range(0, num_rows, batch_size):
        stop = min(start + batch_size, num_rows)
        index = np.minimum(np.arange(start, start + batch_size), stop - 1)
        yield {name: np.asarray(value)[index] for name, value in data.items()}, stop - start


def precompute_reference_logprobs(
    model: nn.Module,
    reference_params: Any,
    data: Mapping[str, np.ndarray],
    mesh: Mesh,
    batch_size: int,
    average: bool = False,
    cache: ReferenceLogprobCache | None = None,
    reference_id: str | None = None,
    rules: PartitionRules = LLAMA_PARTITION_RULES,
    logits_chunk: int | None = None,
) -> dict[str, np.ndarray]:
    """Reference log-probs for every pair of a dataset, once: `{"reference_chosen_logps": [N], ...}`.

    `data` holds the DPO batch keys over the whole dataset (host arrays, N rows). Results are looked up
    in / stored to `cache` under a key of the data bytes, the reference params (`reference_id` if given,
    else `fingerprint_params`), the model config and `average`. Merge the result into the dataset and
    train with `DPOConfig(reference="precomputed")`.
    """
    _check_keys(data, DPO_BATCH_KEYS, "reference log-prob")
    inputs = {name: np.asarray(data[name]) for name in DPO_BATCH_KEYS}
    if batch_size % batch_divisor(mesh):
        raise ValueError(f"batch_size={batch_size} must be a multiple of the data*fsdp mesh size {batch_divisor(mesh)}")
    key = None
    if cache is not None:
        params_id = reference_id if reference_id is not None else fingerprint_params(reference_params)
        key = hashlib.sha256(
            f"{fingerprint_arrays(inputs)}|{params_id}|{getattr(model, 'cfg', model)!r}|{average}".encode()
        ).hexdigest()[:32]
        cached = cache.get(key)
        if cached is not None:
            return cached
    logprobs_fn = make_reference_logprobs_fn(model, mesh, average, rules, logits_chunk)
    chosen, rejected = [], []
    for batch, num_real in _padded_batches(inputs, batch_size):
        c, r = logprobs_fn(reference_params, shard_global_batch(batch, mesh))
        chosen.append(np.asarray(c)[:num_real])
        rejected.append(np.asarray(r)[:num_real])
    result = {
        "reference_chosen_logps": np.concatenate(chosen).astype(np.float32),
        "reference_rejected_logps": np.concatenate(rejected).astype(np.float32),
    }
    if cache is not None:
        cache.put(key, result)
    return result


# ----------------------------------------------------------------------------- reward model


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Bradley-Terry reward-model training; a `margin` batch entry, if present, is subtracted."""

    num_micro_batches: int = 1

    def __post_init__(self) -> None:
        _check_all(self, [(self.num_micro_batches >= 1,
                           f"num_micro_batches must be >= 1, got {self.num_micro_batches}")])


def pair_rewards(model: nn.Module, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Scalar rewards of chosen and rejected (`[B]` each) from one forward pass over both."""
    input_ids = _interleave_pairs(batch["chosen_input_ids"], batch["rejected_input_ids"])
    attention_mask = _interleave_pairs(batch["chosen_attention_mask"], batch["rejected_attention_mask"])
    rewards = model.apply({"params": params}, input_ids, attention_mask=attention_mask)
    if rewards.ndim != 1:
        raise ValueError(f"the reward model must return [B] rewards (num_labels=1), got shape {rewards.shape}")
    return _split_pairs(rewards)


def make_reward_model_step(
    model: nn.Module,
    config: RewardConfig,
    optimizer_config: OptimizerConfig,
    mesh: Mesh,
    rules: PartitionRules = LLAMA_PARTITION_RULES,
    donate_state: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The jitted reward-model step `step(state, batch) -> (state, metrics)` with the Bradley-Terry loss.

    Metrics under TRL RewardTrainer's names, split into chosen and rejected: `loss`, `accuracy`, `margin`,
    `mean_reward/{chosen,rejected}` (means over real pairs), `min_reward/...` and `max_reward/...` (over
    real pairs, exact under accumulation), `grad_norm`, `learning_rate`, `num_pairs`, `num_input_tokens`.
    """
    optimizer = make_optimizer(optimizer_config)
    schedule = learning_rate_schedule(optimizer_config)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        _check_keys(batch, REWARD_BATCH_KEYS, "reward-model")
        _check_micro_batch_size(batch, config.num_micro_batches, mesh)
        weights_all = _pair_weights(batch)
        num_pairs = jnp.maximum(jnp.sum(weights_all), 1.0)
        batch = {**batch, "pair_weight": weights_all}

        def micro_step(params, micro):
            weights = micro["pair_weight"]

            def summed_loss(params):
                chosen, rejected = pair_rewards(model, params, micro)
                per_pair = losses.bradley_terry_loss(chosen, rejected, micro.get("margin"))
                return jnp.sum(per_pair * weights) / num_pairs, (chosen, rejected, per_pair)

            grads, (chosen, rejected, per_pair) = jax.grad(summed_loss, has_aux=True)(params)
            stats = losses.reward_model_metrics(chosen, rejected)
            stats["loss"] = per_pair
            sums = _weighted_sums(stats, weights)
            sums.update(_extremes({"reward/chosen": chosen, "reward/rejected": rejected}, weights))
            sums["num_pairs"] = jnp.sum(weights)
            sums["num_input_tokens"] = jnp.sum(_input_tokens(micro) * weights)
            return grads, sums

        grads, sums = _accumulate(micro_step, state.params, batch, config.num_micro_batches, mesh, rules)
        state, update_metrics = _apply_update(state, grads, optimizer, schedule)
        return state, {**_finalize_metrics(sums, num_pairs), **update_metrics}

    return _jit_state_batch_step(step, model, optimizer_config, mesh, rules, donate_state)


def _jit_state_batch_step(step: Callable, model: nn.Module, optimizer_config: OptimizerConfig, mesh: Mesh,
                          rules: PartitionRules, donate_state: bool) -> Callable:
    """`jax.jit` of a `step(state, batch)`: state laid out by the partition rules, batch split over the
    batch axes, metrics replicated; the state is donated unless `donate_state=False`."""
    state_shardings = train_state_shardings(model, optimizer_config, mesh, rules)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,) if donate_state else (),
    )


# ----------------------------------------------------------------------------- supervised fine-tuning


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Next-token cross-entropy on the response tokens only (prompt and padding masked, EOS kept).

    `normalization="token"` (default) divides the summed negative log-likelihood of the global batch by
    its number of response tokens, as transformers' Trainer and TRL's SFTTrainer do: every token weighs
    the same, so long responses weigh more. `"sequence"` averages each row's per-token NLL first and then
    the rows: every example weighs the same. Either denominator is counted over the whole batch before
    it is split into micro-batches, so accumulation is exact (unlike averaging per-micro-batch means).
    """

    normalization: str = "token"
    num_micro_batches: int = 1
    logits_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.normalization not in SFT_NORMALIZATIONS:
            raise ValueError(f"SFTConfig.normalization={self.normalization!r}; expected one of {SFT_NORMALIZATIONS}")
        if self.num_micro_batches < 1:
            raise ValueError(f"SFTConfig.num_micro_batches must be >= 1, got {self.num_micro_batches}")
        if self.logits_chunk is not None and self.logits_chunk < 1:
            raise ValueError(f"SFTConfig.logits_chunk must be None or >= 1, got {self.logits_chunk}")


def _sft_loss_and_grads(model: nn.Module, config: SFTConfig, mesh: Mesh, rules: PartitionRules) -> Callable:
    """`(params, batch) -> (grads, metrics)` of the SFT loss, exact under accumulation (see SFTConfig)."""
    per_token = config.normalization == "token"

    def loss_and_grads(params, batch):
        num_rows = batch["input_ids"].shape[0]
        weights_all = batch.get("sequence_weight", jnp.ones((num_rows,), jnp.float32)).astype(jnp.float32)
        # Response tokens that are predicted (each from the position before it), per row.
        tokens_all = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32), axis=-1)
        num_tokens = jnp.maximum(jnp.sum(weights_all * tokens_all), 1.0)
        num_sequences = jnp.maximum(jnp.sum(jnp.where(tokens_all > 0, weights_all, 0.0)), 1.0)
        denominator = num_tokens if per_token else num_sequences
        batch = {**batch, "sequence_weight": weights_all}

        def micro_step(params, micro):
            weights = micro["sequence_weight"]

            def summed_loss(params):
                logps, tokens, _ = completion_logprobs(model, params, micro["input_ids"], micro["attention_mask"],
                                                       micro["loss_mask"], average=False,
                                                       logits_chunk=config.logits_chunk)
                per_row = -logps if per_token else -logps / jnp.maximum(tokens, 1.0)
                return jnp.sum(per_row * weights) / denominator, (logps, tokens)

            grads, (logps, tokens) = jax.grad(summed_loss, has_aux=True)(params)
            sums = _weighted_sums({"summed_nll": -logps, "sequence_nll": -logps / jnp.maximum(tokens, 1.0),
                                   "completion_tokens": tokens}, weights)
            sums["num_sequences"] = jnp.sum(jnp.where(tokens > 0, weights, 0.0))
            sums["num_tokens"] = jnp.sum(tokens * weights)
            return grads, sums

        grads, sums = _accumulate(micro_step, params, batch, config.num_micro_batches, mesh, rules)
        token_nll = sums.pop("summed_nll") / num_tokens
        metrics = {**_finalize_metrics(sums, num_sequences), "token_nll": token_nll}
        metrics["loss"] = token_nll if per_token else metrics["sequence_nll"]
        return grads, metrics

    return loss_and_grads


def make_sft_step(
    model: nn.Module,
    config: SFTConfig,
    optimizer_config: OptimizerConfig,
    mesh: Mesh,
    rules: PartitionRules = LLAMA_PARTITION_RULES,
    donate_state: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The jitted supervised step `step(state, batch) -> (state, metrics)` for a causal LM.

    Metrics: loss (by `config.normalization`), token_nll (NLL per response token) and sequence_nll (mean
    over rows of the per-token NLL) whatever the normalisation, completion_tokens (mean per row),
    num_sequences, num_tokens, grad norm (before clipping), learning rate.
    """
    optimizer = make_optimizer(optimizer_config)
    schedule = learning_rate_schedule(optimizer_config)
    loss_and_grads = _sft_loss_and_grads(model, config, mesh, rules)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        _check_keys(batch, SFT_BATCH_KEYS, "SFT")
        _check_micro_batch_size(batch, config.num_micro_batches, mesh, rows="input_ids", unit="sequences")
        grads, metrics = loss_and_grads(state.params, batch)
        state, update_metrics = _apply_update(state, grads, optimizer, schedule)
        return state, {**metrics, **update_metrics}

    return _jit_state_batch_step(step, model, optimizer_config, mesh, rules, donate_state)
