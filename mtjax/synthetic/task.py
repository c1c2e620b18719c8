"""The synthetic task: ordered keyword coverage with a known, continuous gold reward.

A prompt lists 3-5 distinct *items* (``c k a``); a response is a sequence of words. The gold reward
pays for each prompt item the response mentions, more for items listed earlier in the prompt and for
mentions placed earlier in the response, and charges every other word (an item not in the prompt, a
filler word, a repeat, the decoy ``!``) a small word-specific cost that grows slightly with position:

    gold(x, y) = [ sum_{first mention of item j at position p} w_j * gamma**p
                   - sum_{other words v at position p} c(v) * (1 + jitter * p) ] / sum_j w_j * gamma**j

with w_j = 1 - weight_step * j for the j-th prompt item (0-based). The denominator is the best
attainable gain, so gold = 1 exactly for the prompt's items in prompt order and nothing else (the
rearrangement inequality: the largest weights take the least-discounted positions), and it is
comparable across prompts. Word-specific costs and the position jitter make ties between distinct
responses rare (they need the same words at the same positions up to swapping items of equal cost).

Spurious features, by construction not rewarded: *length* (more words never pays by itself: every word
that is not a new prompt item costs) and the *decoy* ``!`` (it costs `decoy_cost` >= 0; 0 = neutral).
In imperfect demonstrations both correlate with gold (better demonstrators mention more items and end
with ``!`` more often, see `mtjax.synthetic.demonstrations`), so a reward model trained on the base
policy's samples can latch onto them: the premise the testbed measures.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np

ITEMS = tuple("abcdefghijklmnop")  # 16 item words
FILLERS = ("um", "so", "and", "the")
DECOY = "!"
WORDS = (*ITEMS, *FILLERS, DECOY)  # the synthetic vocabulary (after the tokenizer's special tokens)

# Word-specific cost multipliers in [1, 1.5): a fixed low-discrepancy sequence (golden-ratio steps), so
# two distractors almost never cost the same.
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_COST_FACTOR = {word: 1.0 + 0.5 * ((index + 1) * _GOLDEN % 1.0) for index, word in enumerate(WORDS)}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The task's difficulty and gold reward. Defaults are the calibrated testbed (docs/synthetic.md)."""

    min_items: int = 3
    max_items: int = 5
    gamma: float = 0.9  # position discount of a mention
    weight_step: float = 0.1  # w_j = 1 - weight_step * j
    distractor_cost: float = 0.15  # items not in the prompt and fillers: this times the word's factor
    repeat_cost: float = 0.15  # a second mention of a prompt item
    decoy_cost: float = 0.05  # the decoy "!" (spurious: never rewarded; 0 = neutral given the content)
    position_jitter: float = 0.01  # costs grow by this fraction per position (breaks ties)

    def __post_init__(self) -> None:
        if not 1 <= self.min_items <= self.max_items <= len(ITEMS):
            raise ValueError(f"TaskConfig needs 1 <= min_items <= max_items <= {len(ITEMS)}; "
                             f"got min_items={self.min_items}, max_items={self.max_items}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"TaskConfig.gamma must be in (0, 1], got {self.gamma}")
        if not 0.0 <= self.weight_step * (self.max_items - 1) < 1.0:
            raise ValueError(f"TaskConfig.weight_step={self.weight_step} must keep every item weight "
                             f"1 - weight_step * j positive for j < max_items={self.max_items}")
        for name in ("distractor_cost", "repeat_cost", "decoy_cost", "position_jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"TaskConfig.{name} must be >= 0, got {getattr(self, name)}")


def prompt_stream(seed: int | Sequence[int], task: TaskConfig = TaskConfig()) -> Iterator[str]:
    """An endless stream of prompt texts (distinct items each, space-separated; a prompt may recur),
    reproducible from `seed` (an int or a sequence of ints, as numpy's `default_rng` takes)."""
    rng = np.random.default_rng(seed)
    while True:
        size = int(rng.integers(task.min_items, task.max_items + 1))
        yield " ".join(ITEMS[i] for i in rng.choice(len(ITEMS), size, replace=False))


def make_prompts(num_prompts: int, seed: int, task: TaskConfig = TaskConfig()) -> list[str]:
    """The first `num_prompts` prompts of `prompt_stream(seed, task)`."""
    return list(itertools.islice(prompt_stream(seed, task), num_prompts))


def prompt_items(prompt: str) -> list[str]:
    """The items of a prompt text, validated (known items, no repeats)."""
    items = prompt.split()
    unknown = [w for w in items if w not in ITEMS]
    if not items or unknown or len(set(items)) != len(items):
        raise ValueError(f"prompt {prompt!r} must list distinct items from {''.join(ITEMS)}; "
                         f"unknown: {unknown}, repeated: {sorted({w for w in items if items.count(w) > 1})}")
    return items


def _word_cost(word: str, is_repeat: bool, task: TaskConfig) -> float:
    if word == DECOY:
        return task.decoy_cost
    if is_repeat:
        return task.repeat_cost
    if word not in _COST_FACTOR:
        raise ValueError(f"response word {word!r} is outside the synthetic vocabulary {WORDS}")
    return task.distractor_cost * _COST_FACTOR[word]


def best_gain(num_items: int, task: TaskConfig = TaskConfig()) -> float:
    """The gain of the optimal response (all items, in prompt order, nothing else)."""
    return sum((1.0 - task.weight_step * j) * task.gamma**j for j in range(num_items))


def gold_reward(prompt: str, response: str, task: TaskConfig = TaskConfig()) -> float:
    """The gold reward of `response` (space-separated words, no special tokens) to `prompt` (see module doc)."""
    items = prompt_items(prompt)
    weight = {item: 1.0 - task.weight_step * j for j, item in enumerate(items)}
    gain = cost = 0.0
    mentioned: set[str] = set()
    for position, word in enumerate(response.split()):
        if word in weight and word not in mentioned:
            gain += weight[word] * task.gamma**position
            mentioned.add(word)
        else:
            cost += _word_cost(word, word in mentioned, task) * (1.0 + task.position_jitter * position)
    return (gain - cost) / best_gain(len(items), task)


def gold_rewards(prompts: Sequence[str], responses: Sequence[str], task: TaskConfig = TaskConfig()) -> np.ndarray:
    """`gold_reward` of aligned prompts and responses, `[N]` float64."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return np.asarray([gold_reward(p, r, task) for p, r in zip(prompts, responses, strict=True)], np.float64)


def spurious_features(response: str) -> dict[str, int]:
    """The features gold does not reward: the number of words and of decoys."""
    words = response.split()
    return {"length": len(words), "decoys": words.count(DECOY)}


def coverage(prompt: str, response: str) -> float:
    """Fraction of the prompt's items the response mentions (a readable summary next to gold)."""
    items = prompt_items(prompt)
    return len(set(items) & set(response.split())) / len(items)
