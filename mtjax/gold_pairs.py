"""Gold-labelled preference pairs among several responses per prompt, for any task with a known gold
reward (`mtjax.tasks`): the "human" labels of r0's budget and the yardstick of reward-model accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Pair = tuple[int, int, int]  # (prompt index, index of the higher-gold response, index of the lower)


def untied_pairs(rewards: Sequence[Sequence[float]], responses: Sequence[Sequence[str]] | None = None
                 ) -> tuple[list[Pair], int]:
    """Every two responses of a prompt with different rewards, as (prompt, higher, lower) indices in prompt
    order (i < j within a prompt), and how many pairs were skipped as tied: equal reward, a reward that is
    NaN (unscorable), or the same response text when `responses` is given."""
    pairs, tied = [], 0
    for p, group in enumerate(rewards):
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                same_text = responses is not None and responses[p][i] == responses[p][j]
                if same_text or math.isnan(group[i]) or math.isnan(group[j]) or group[i] == group[j]:
                    tied += 1
                    continue
                pairs.append((p, i, j) if group[i] > group[j] else (p, j, i))
    return pairs, tied


def pairs_per_prompt(rewards: Sequence[Sequence[float]], responses: Sequence[Sequence[str]], per_prompt: int,
                     seed: int) -> list[Pair]:
    """At most `per_prompt` random untied pairs of each prompt (0 = all of them), in prompt order: a
    labelling budget spread over as many prompts as possible, as one human comparison per prompt."""
    rng = np.random.default_rng(seed)
    chosen = []
    for p in range(len(rewards)):
        pairs, _ = untied_pairs([rewards[p]], [responses[p]])
        if per_prompt == 1 and pairs:
            picked = [int(rng.integers(len(pairs)))]
        elif per_prompt and len(pairs) > per_prompt:
            picked = sorted(int(i) for i in rng.choice(len(pairs), per_prompt, replace=False))
        else:
            picked = range(len(pairs))
        chosen += [(p, pairs[i][1], pairs[i][2]) for i in picked]
    return chosen


def one_pair_per_prompt(rewards: Sequence[Sequence[float]], responses: Sequence[Sequence[str]], seed: int
                        ) -> list[Pair]:
    """One random untied pair per prompt (prompts whose responses all tie give none)."""
    return pairs_per_prompt(rewards, responses, 1, seed)


def pairwise_accuracy(scores: Sequence[Sequence[float]], pairs: Sequence[Pair]) -> float:
    """Fraction of (prompt, higher, lower) pairs whose higher-gold response also scores higher (ties: 1/2)."""
    if not pairs:
        raise ValueError("pairwise_accuracy needs at least one pair")
    hits = [1.0 if scores[p][hi] > scores[p][lo] else 0.5 if scores[p][hi] == scores[p][lo] else 0.0
            for p, hi, lo in pairs]
    return float(np.mean(hits))
