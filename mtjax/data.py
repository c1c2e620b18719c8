"""Prompts, responses and preference pairs as token arrays: the glue between sampler and train steps.

Data flow: prompt text → `chat_prompt_ids` → sampler → responses (token ids) → rewards →
`select_length_controlled_pair` → `encode_completion` → `collate_pairs` → DPO / reward-model steps.
Masking convention (one place, used by every loss): `loss_mask` is aligned with `input_ids` and is 1
exactly on response tokens, the EOS included; prompt and padding tokens are 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------- prompts


def chat_prompt_ids(tokenizer: Any, prompt: str | Sequence[Mapping[str, str]], system: str | None = None) -> list[int]:
    """Token ids of a chat prompt ending with the assistant header, ready for generation.

    The template already carries any BOS token, so the rendered text is tokenized without adding
    special tokens again (a second BOS shifts every logit of Llama-3 models)."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    if not messages or messages[-1].get("role") != "user":
        raise ValueError(f"a chat prompt must end with a user message; got roles {[m.get('role') for m in messages]}")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def response_ids(tokenizer: Any, response: str, eos_id: int) -> list[int]:
    """Ids of a text response (e.g. a reference answer) as the policy would emit it: text then EOS."""
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], eos_id]


# ----------------------------------------------------------------------------- pair selection


@dataclasses.dataclass(frozen=True)
class PairChoice:
    chosen: int
    rejected: int


SKIP_TOO_FEW = "fewer_than_two_responses"
SKIP_ALL_TIED = "all_rewards_equal"


def select_length_controlled_pair(rewards: Sequence[float], lengths: Sequence[int]) -> PairChoice | str:
    """The Mutual-Taught pair rule: among responses whose reward is strictly above the prompt's mean,
    the *shortest* is chosen (ties: higher reward, then lower index); the lowest-reward response is
    rejected (ties: the longer, then lower index). Returns a skip reason when no valid pair exists.

    Choosing the shortest above-average response counters DPO's drift towards longer answers."""
    if len(rewards) != len(lengths):
        raise ValueError(f"rewards ({len(rewards)}) and lengths ({len(lengths)}) must have the same length")
    if len(rewards) < 2:
        return SKIP_TOO_FEW
    r = np.asarray(rewards, np.float64)
    above = np.flatnonzero(r > r.mean())
    if above.size == 0:
        return SKIP_ALL_TIED
    chosen = min(above, key=lambda i: (lengths[i], -r[i], i))
    rejected = min(range(len(r)), key=lambda i: (r[i], -lengths[i], i))
    return PairChoice(int(chosen), int(rejected))


def select_best_worst_pair(rewards: Sequence[float]) -> PairChoice | str:
    """The highest-reward response chosen, the lowest-reward one rejected (ties: the lower index), as SPPO and
    Self-Rewarding build their pairs. Returns a skip reason when no valid pair exists."""
    if len(rewards) < 2:
        return SKIP_TOO_FEW
    r = np.asarray(rewards, np.float64)
    if r.max() == r.min():
        return SKIP_ALL_TIED
    return PairChoice(int(np.argmax(r)), int(np.argmin(r)))


@dataclasses.dataclass(frozen=True)
class SelfLabels:
    """Pairs a reward model labelled itself (`self_labelled_pairs`): `keep[i]` whether pair i is confident
    enough to train on, `swap[i]` whether its second response is the preferred one, `confidence[i]` the
    model's probability for the label it gave."""

    keep: np.ndarray
    swap: np.ndarray
    confidence: np.ndarray


def self_labelled_pairs(first_rewards: Sequence[float], second_rewards: Sequence[float],
                        threshold: float) -> SelfLabels:
    """Self-Evolved Reward learning's selection (Huang et al. 2024): the reward model labels each unlabelled
    pair (a, b) by its own Bradley-Terry preference P(a ≻ b) = σ(r_a − r_b), the preferred response first,
    and keeps only the pairs whose label it is at least `threshold` sure of (`threshold` in [0.5, 1))."""
    if not 0.5 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0.5, 1), got {threshold}")
    a, b = np.asarray(first_rewards, np.float64), np.asarray(second_rewards, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{a.shape[0]} first rewards but {b.shape[0]} second rewards")
    confidence = 1.0 / (1.0 + np.exp(-np.abs(a - b)))
    return SelfLabels(keep=np.isfinite(confidence) & (confidence >= threshold), swap=b > a, confidence=confidence)


def drop_duplicate_responses(responses: Sequence[Sequence[int]]) -> tuple[list[int], int]:
    """Indices of the first occurrence of each distinct response, and how many were dropped."""
    seen: set[tuple[int, ...]] = set()
    keep = []
    for i, r in enumerate(responses):
        key = tuple(r)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep, len(responses) - len(keep)


# ----------------------------------------------------------------------------- encoding and batching


@dataclasses.dataclass(frozen=True)
class Completion:
    """A prompt + response as one sequence; `truncated` if the response was cut to fit."""

    input_ids: np.ndarray  # [L] int32
    loss_mask: np.ndarray  # [L] int32, 1 on response tokens
    truncated: bool


def encode_completion(prompt: Sequence[int], response: Sequence[int], max_length: int) -> Completion | None:
    """Concatenates ids; cuts the response's tail if the whole exceeds `max_length`.

    Returns None when the prompt alone leaves no room for a response token — the caller counts it."""
    if len(prompt) >= max_length:
        return None
    if len(response) == 0:
        raise ValueError("empty response: a response must hold at least one token (its EOS if nothing else)")
    kept = list(response)[: max_length - len(prompt)]
    ids = np.asarray([*prompt, *kept], np.int32)
    mask = np.zeros(len(ids), np.int32)
    mask[len(prompt):] = 1
    return Completion(ids, mask, truncated=len(kept) < len(response))


def padded_length(lengths: Sequence[int], multiple: int, max_length: int) -> int:
    """Longest length rounded up to `multiple` (fewer distinct shapes → fewer recompilations)."""
    longest = max(lengths)
    return min(max_length, -(-longest // multiple) * multiple) if multiple > 0 else longest


def collate(completions: Sequence[Completion], pad_id: int, length: int, prefix: str = "") -> dict[str, np.ndarray]:
    """Right-pads completions into `{prefix}input_ids`, `attention_mask`, `loss_mask` arrays `[B, length]`."""
    batch = len(completions)
    ids = np.full((batch, length), pad_id, np.int32)
    attn = np.zeros((batch, length), np.int32)
    loss = np.zeros((batch, length), np.int32)
    for row, c in enumerate(completions):
        n = len(c.input_ids)
        if n > length:
            raise ValueError(f"completion {row} has {n} tokens, more than the batch length {length}")
        ids[row, :n], attn[row, :n], loss[row, :n] = c.input_ids, 1, c.loss_mask
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": attn, f"{prefix}loss_mask": loss}


def collate_pairs(chosen: Sequence[Completion], rejected: Sequence[Completion], pad_id: int, max_length: int,
                  length_multiple: int = 64) -> dict[str, np.ndarray]:
    """A DPO / Bradley-Terry batch: `chosen_*` and `rejected_*` arrays of one shared length."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected completions")
    length = padded_length([len(c.input_ids) for c in [*chosen, *rejected]], length_multiple, max_length)
    return {**collate(chosen, pad_id, length, "chosen_"), **collate(rejected, pad_id, length, "rejected_")}


# ----------------------------------------------------------------------------- prompt partition
