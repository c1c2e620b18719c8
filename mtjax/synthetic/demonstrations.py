"""Imperfect demonstrations for the supervised phase that makes the base policy π0 of the synthetic task.

Each demonstration comes from a demonstrator of random skill s ~ U(0, 1): it mentions each prompt item
with a probability rising with s, keeps the prompt's order only with probability s, scatters distractor
words (fewer as s rises) and ends with the decoy ``!`` with a probability rising with the fraction of
the prompt's items it mentioned. A policy trained on them is diverse and mediocre (room to improve), and
in its samples the spurious features (length, the decoy) correlate with gold, as in human preference
data where longer or more emphatic answers tend to be the better ones. The decoy depends on what the
response itself contains (not on the hidden skill), so a policy can learn the correlation, and does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mtjax import data
from mtjax.synthetic.task import DECOY, FILLERS, ITEMS, prompt_items


@dataclasses.dataclass(frozen=True)
class DemonstratorConfig:
    """Per-skill probabilities and counts, linear in the skill s between the `_low` (s = 0) and `_high`
    (s = 1) values. Defaults are the calibrated testbed (docs/synthetic.md)."""

    keep_low: float = 0.3  # P(mention a prompt item)
    keep_high: float = 0.9
    distractors_low: float = 2.0  # mean (Poisson) number of distractor words
    distractors_high: float = 0.8
    decoy_low: float = 0.1  # P(end with the decoy) with no prompt item mentioned ...
    decoy_high: float = 0.8  # ... and with all of them (linear in the fraction mentioned)
    max_words: int = 10

    def __post_init__(self) -> None:
        for name in ("keep_low", "keep_high", "decoy_low", "decoy_high"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DemonstratorConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if min(self.distractors_low, self.distractors_high) < 0 or self.max_words < 1:
            raise ValueError("DemonstratorConfig needs distractor means >= 0 and max_words >= 1")


def demonstration(prompt: str, rng: np.random.Generator, config: DemonstratorConfig = DemonstratorConfig()) -> str:
    """One demonstration (space-separated words, possibly empty) for `prompt`, drawn with `rng`."""
    items = prompt_items(prompt)
    skill = rng.uniform()

    def at_skill(low: float, high: float) -> float:
        return low + (high - low) * skill

    words = [item for item in items if rng.uniform() < at_skill(config.keep_low, config.keep_high)]
    if rng.uniform() >= skill:
        rng.shuffle(words)
    pool = [w for w in (*ITEMS, *FILLERS) if w not in items]
    for _ in range(rng.poisson(at_skill(config.distractors_low, config.distractors_high))):
        words.insert(int(rng.integers(0, len(words) + 1)), pool[int(rng.integers(len(pool)))])
    words = words[: config.max_words - 1]
    covered = len(set(words) & set(items)) / len(items)
    if rng.uniform() < config.decoy_low + (config.decoy_high - config.decoy_low) * covered:
        words.append(DECOY)
    return " ".join(words)


def demonstrations(prompts: Sequence[str], per_prompt: int, seed: int,
                   config: DemonstratorConfig = DemonstratorConfig()) -> list[tuple[str, str]]:
    """`per_prompt` demonstrations of every prompt as (prompt, response) rows, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return [(p, demonstration(p, rng, config)) for p in prompts for _ in range(per_prompt)]


def sft_completions(tokenizer, rows: Sequence[tuple[str, str]], max_length: int) -> list[data.Completion]:
    """Chat-rendered (prompt, response + EOS) completions for `mtjax.train.make_sft_step` (collate them with
    `mtjax.data.collate`); the loss mask covers the response and its EOS."""
    out = []
    for prompt, response in rows:
        completion = data.encode_completion(data.chat_prompt_ids(tokenizer, prompt),
                                            data.response_ids(tokenizer, response, tokenizer.eos_token_id),
                                            max_length)
        if completion is None or completion.truncated:
            raise ValueError(f"demonstration ({prompt!r}, {response!r}) does not fit max_length={max_length}")
        out.append(completion)
    return out
