"""Preference pairs: the E-step's (one per prompt by reward, `policy_pairs`), the M-step's (contrastive: new
policy vs old; self: the new policy's samples by the RM; oriented by gold or a coin), and their encoding and
shuffled batches for training (`mtjax.training_loops`)."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from mtjax import data
from mtjax.stored_samples import Sample


@dataclasses.dataclass
class PairSet:
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    counts: Counter
    # per-pair numbers the training step reads besides the tokens (SPPO's `train.WIN_PROB_KEYS`)
    values: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.chosen)

    def append(self, prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], **values: float) -> None:
        self.prompts.append(list(prompt))
        self.chosen.append(list(chosen))
        self.rejected.append(list(rejected))
        for name, value in values.items():
            self.values.setdefault(name, []).append(float(value))

    def extended(self, other: PairSet) -> PairSet:
        """Both sets' pairs in one (this one's first), counts added; per-pair values must be the same kinds."""
        if set(self.values) != set(other.values):
            raise ValueError(f"cannot join pairs carrying {sorted(self.values)} with pairs carrying "
                             f"{sorted(other.values)}")
        counts = Counter(self.counts)
        counts.update(other.counts)  # `+` would drop the zero counts (a phase reports "pairs": 0)
        return PairSet(self.prompts + other.prompts, self.chosen + other.chosen, self.rejected + other.rejected,
                       counts, {k: v + other.values[k] for k, v in self.values.items()})

    def rows(self, kind: str) -> list[dict]:
        return [{"kind": kind, "prompt_ids": p, "chosen_ids": c, "rejected_ids": r,
                 **{name: values[i] for name, values in self.values.items()}}
                for i, (p, c, r) in enumerate(zip(self.prompts, self.chosen, self.rejected, strict=True))]


def pairable(per_prompt: Sequence[Sample], per_rewards: Sequence[float] | None, drop_truncated: bool,
             counts: Counter) -> list[int]:
    """Indices of a prompt's samples that may enter a pair: the first of each distinct response, stopped ones
    only with `drop_truncated`, scored ones only (a judge may leave a response without a reward); every
    sample left out is counted by reason."""
    keep, dropped = data.drop_duplicate_responses([s.ids for s in per_prompt])
    counts["duplicate_responses"] += dropped
    if drop_truncated:
        counts["truncated_responses"] += sum(not per_prompt[i].stopped for i in keep)
        keep = [i for i in keep if per_prompt[i].stopped]
    if per_rewards is not None and (unscored := sum(not math.isfinite(per_rewards[i]) for i in keep)):
        counts["unscored_responses"] += unscored
        keep = [i for i in keep if math.isfinite(per_rewards[i])]
    return keep


def policy_pairs(prompt_ids: Sequence[Sequence[int]], samples: Sequence[Sequence[Sample]],
                 rewards: Sequence[Sequence[float]], drop_truncated: bool, rule: str = "length_controlled",
                 win_probs: bool = False) -> PairSet:
    """One pair per prompt by `rule` (`settings.POLICY_PAIRS`: `data.select_length_controlled_pair`, or the
    highest- against the lowest-reward response); every skip is counted by reason. `win_probs`: each pair
    carries its responses' estimated win probabilities against the policy (`losses.sppo_win_probabilities`
    over all of the prompt's scored samples, duplicates included, as SPPO estimates them)."""
    from mtjax.losses import sppo_win_probabilities
    from mtjax.train import WIN_PROB_KEYS

    pairs = PairSet([], [], [], Counter())
    for prompt, per_prompt, per_rewards in zip(prompt_ids, samples, rewards, strict=True):
        keep = pairable(per_prompt, per_rewards, drop_truncated, pairs.counts)
        kept_rewards = [per_rewards[i] for i in keep]
        if rule == "best_worst":
            choice = data.select_best_worst_pair(kept_rewards)
        else:
            choice = data.select_length_controlled_pair(kept_rewards, [len(per_prompt[i].ids) for i in keep])
        if isinstance(choice, str):
            pairs.counts[f"skipped_{choice}"] += 1
            continue
        chosen, rejected = keep[choice.chosen], keep[choice.rejected]
        values = {}
        if win_probs:
            scored = [i for i, r in enumerate(per_rewards) if math.isfinite(r)]
            p = np.asarray(sppo_win_probabilities(np.asarray([per_rewards[i] for i in scored])))
            values = dict(zip(WIN_PROB_KEYS, (p[scored.index(chosen)], p[scored.index(rejected)]), strict=True))
        pairs.append(prompt, per_prompt[chosen].ids, per_prompt[rejected].ids, **values)
    pairs.counts["pairs"] = len(pairs)
    return pairs


def length_controlled_pairs(prompt_ids: Sequence[Sequence[int]], samples: Sequence[Sequence[Sample]],
                            rewards: Sequence[Sequence[float]], drop_truncated: bool) -> PairSet:
    """One pair per prompt by `data.select_length_controlled_pair`; every skip is counted by reason."""
    return policy_pairs(prompt_ids, samples, rewards, drop_truncated)


def contrastive_pairs(prompts, new_samples, new_rewards, old_samples, old_rewards, filter_by_std: bool,
                      drop_truncated: bool) -> PairSet:
    """D(PM_new, PM_old): the new policy's first sample chosen over the old policy's first sample.

    With `filter_by_std`, pairs whose Δr = r(y_new) − r(y_old) is below −std(r on old samples) are
    dropped (the paper's later revision): the RM strongly disagrees that the new policy improved."""
    pairs = PairSet([], [], [], Counter())
    old_std = float(np.std([r for rs in old_rewards for r in rs])) if filter_by_std else 0.0
    for p, ns, nr, os_, or_ in zip(prompts, new_samples, new_rewards, old_samples, old_rewards, strict=True):
        new, old = ns[0], os_[0]
        if drop_truncated and not (new.stopped and old.stopped):
            pairs.counts["skipped_truncated"] += 1
            continue
        if new.ids == old.ids:
            pairs.counts["skipped_identical"] += 1
            continue
        if filter_by_std and nr[0] - or_[0] < -old_std:
            pairs.counts["filtered_by_reward_gap"] += 1
            continue
        pairs.prompts.append(list(p))
        pairs.chosen.append(list(new.ids))
        pairs.rejected.append(list(old.ids))
    pairs.counts["pairs"] = len(pairs)
    return pairs


def oriented_pairs(pairs: PairSet, keep: Sequence[bool | None], label: str) -> PairSet:
    """`pairs` with each pair kept as it is (True), swapped (False) or dropped (None: a tie); the swaps and
    drops are counted as `{label}_swapped` and `{label}_ties_dropped`."""
    out = PairSet([], [], [], Counter(pairs.counts))
    out.counts.update({f"{label}_swapped": 0, f"{label}_ties_dropped": 0})
    for prompt, chosen, rejected, k in zip(pairs.prompts, pairs.chosen, pairs.rejected, keep, strict=True):
        if k is None:
            out.counts[f"{label}_ties_dropped"] += 1
            continue
        if not k:
            chosen, rejected = rejected, chosen
            out.counts[f"{label}_swapped"] += 1
        out.prompts.append(prompt)
        out.chosen.append(chosen)
        out.rejected.append(rejected)
    out.counts["pairs"] = len(out)
    return out


def length_summary(pairs: PairSet) -> dict[str, float]:
    if not len(pairs):
        return {}
    chosen = np.asarray([len(c) for c in pairs.chosen])
    rejected = np.asarray([len(r) for r in pairs.rejected])
    return {"chosen_len_mean": float(chosen.mean()), "chosen_len_p95": float(np.percentile(chosen, 95)),
            "rejected_len_mean": float(rejected.mean()), "rejected_len_p95": float(np.percentile(rejected, 95))}


def encode_pairs(pairs: PairSet, max_length: int) -> tuple[list, list, Counter, dict[str, np.ndarray]]:
    """The pairs as `data.Completion`s cut to `max_length`, and their per-pair values; a pair whose prompt
    alone fills `max_length` is dropped (counted)."""
    chosen, rejected, counts, kept = [], [], Counter(), []
    for i, (p, c, r) in enumerate(zip(pairs.prompts, pairs.chosen, pairs.rejected, strict=True)):
        ec, er = data.encode_completion(p, c, max_length), data.encode_completion(p, r, max_length)
        if ec is None or er is None:
            counts["dropped_prompt_too_long"] += 1
            continue
        counts["truncated_to_max_length"] += int(ec.truncated or er.truncated)
        chosen.append(ec)
        rejected.append(er)
        kept.append(i)
    values = {name: np.asarray(v, np.float32)[kept] for name, v in pairs.values.items()}
    return chosen, rejected, counts, values


def _shuffled_batches(num_rows: int, batch_size: int, seed: int):
    """(row indices, weights) of shuffled batches of exactly `batch_size` rows (one compiled shape per length
    bucket); the last is padded with repeats of weight 0, never dropped."""
    order = np.random.default_rng(seed).permutation(num_rows)
    for start in range(0, len(order), batch_size):
        idx = list(order[start:start + batch_size])
        real = len(idx)
        yield idx + [idx[0]] * (batch_size - real), (np.arange(batch_size) < real).astype(np.float32)


def pair_batches(chosen, rejected, pad_id: int, batch_size: int, max_length: int, seed: int,
                 per_pair: Mapping[str, np.ndarray] | None = None):
    """Shuffled pair batches (see `_shuffled_batches`) with `pair_weight`; `per_pair` arrays (e.g. reference
    log-probs) follow the same shuffle."""
    for idx, weights in _shuffled_batches(len(chosen), batch_size, seed):
        batch = data.collate_pairs([chosen[i] for i in idx], [rejected[i] for i in idx], pad_id, max_length)
        batch["pair_weight"] = weights
        for name, values in (per_pair or {}).items():
            batch[name] = np.asarray(values)[idx]
        yield batch


def sequence_batches(completions: Sequence[data.Completion], pad_id: int, batch_size: int, max_length: int,
                     seed: int):
    """Shuffled batches of single sequences (see `_shuffled_batches`) with `sequence_weight`, for SFT."""
    for idx, weights in _shuffled_batches(len(completions), batch_size, seed):
        rows = [completions[i] for i in idx]
        length = data.padded_length([len(c.input_ids) for c in rows], 64, max_length)
        yield {**data.collate(rows, pad_id, length), "sequence_weight": weights}
