"""Gold-labelled preference pairs among several responses per prompt (the synthetic task's "human" labels
and the yardstick of reward-model accuracy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def untied_pairs(rewards: Sequence[Sequence[float]], responses: Sequence[Sequence[str]] | None = None
                 ) -> tuple[list[tuple[int, int, int]], int]:
    """Every two responses of a prompt with different rewards, as (prompt, higher, lower) indices, and how
    many pairs were skipped as tied (equal reward, or the same response text when `responses` is given)."""
    pairs, tied = [], 0
    for p, group in enumerate(rewards):
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                same_text = responses is not None and responses[p][i] == responses[p][j]
                if same_text or group[i] == group[j]:
                    tied += 1
                    continue
                pairs.append((p, i, j) if group[i] > group[j] else (p, j, i))
    return pairs, tied


def one_pair_per_prompt(rewards: Sequence[Sequence[float]], responses: Sequence[Sequence[str]], seed: int
                        ) -> list[tuple[int, int, int]]:
    """One random untied pair per prompt (prompts whose responses all tie give none): a labelling budget
    spread over as many prompts as possible, as one human comparison per prompt."""
    rng = np.random.default_rng(seed)
    chosen = []
    for p in range(len(rewards)):
        pairs, _ = untied_pairs([rewards[p]], [responses[p]])
        if pairs:
            _, hi, lo = pairs[int(rng.integers(len(pairs)))]
            chosen.append((p, hi, lo))
    return chosen


def pairwise_accuracy(scores: Sequence[Sequence[float]], pairs: Sequence[tuple[int, int, int]]) -> float:
    """Fraction of (prompt, higher, lower) pairs whose higher-gold response also scores higher (ties: 1/2)."""
    if not pairs:
        raise ValueError("pairwise_accuracy needs at least one pair")
    hits = [1.0 if scores[p][hi] > scores[p][lo] else 0.5 if scores[p][hi] == scores[p][lo] else 0.0
            for p, hi, lo in pairs]
    return float(np.mean(hits))
