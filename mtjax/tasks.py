"""The task a run optimises: where its prompt splits come from, and the known gold reward that labels r0's
"human" budget, orients the `oracle` M-step's pairs and scores every held-out evaluation.

    testbed    generated verifiable-instruction prompts (`mtjax.testbed`); gold = the IFEval-style strict
               checks; the held-out evaluation reports IFEval's accuracies too.
    synthetic  ordered keyword coverage (`mtjax.synthetic`); gold = `synthetic.gold_reward`; imperfect
               demonstrations for the `sft` phase that makes π0; the held-out evaluation reports gold with
               its per-prompt standard error, item coverage, length and the decoy rate, and r0's accuracy
               on π_t's samples next to r_t's (the premise of the method).

What the EM driver (`mtjax.em`) asks of a task:

    prompt_splits(prompts)              every split's rows (`testbed.prompts.PROMPT_FEATURES` layout) and
                                        the record of how they were drawn
    gold_rewards(rows, texts)           gold per response, grouped per prompt row (NaN: unscorable)
    demonstrations(prompts, n, seed, d) (prompt, response) rows for the sft phase (synthetic only)
    evaluate_heldout(run, phase, π, r)  the held-out split's metrics (nested, and flat for results.json)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtjax import layout

TASKS = ("testbed", "synthetic")
HELDOUT = "heldout_eval"


@dataclasses.dataclass(frozen=True)
class TaskChoice:
    """The run's task (`TASKS`). The `task` config section also holds `mtjax.synthetic.TaskConfig`'s fields:
    the synthetic task's difficulty and gold reward (unused by the testbed)."""

    name: str = "testbed"

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"TaskChoice.name={self.name!r} must be one of {TASKS}")


def make_task(cfg: Any) -> TestbedTask | SyntheticTask:
    """The task of a run config (its `task` section)."""
    from mtjax import settings, synthetic

    choice = settings.build(TaskChoice, cfg.task)
    if choice.name == "synthetic":
        return SyntheticTask(settings.build(synthetic.TaskConfig, cfg.task))
    return TestbedTask()


def _split_sizes(prompts: Any) -> dict[str, int]:
    """Split name -> size, in the order splits are filled (held-out first: its prompts depend only on the
    seed and its own size)."""
    sizes = {HELDOUT: prompts.heldout_eval, "base_rm_labels": prompts.base_rm_labels,
             "reward_model": prompts.reward_model}
    sizes.update({f"policy_{t}": n for t, n in enumerate(prompts.policy, start=1)})
    if prompts.sft:
        sizes["sft"] = prompts.sft
    return sizes


# ----------------------------------------------------------------------------- the testbed


class TestbedTask:
    """Generated verifiable-instruction prompts; gold = IFEval-style strict checks."""

    name = "testbed"
    has_demonstrations = False

    def prompt_splits(self, prompts: Any) -> tuple[Any, Any]:
        from mtjax.testbed.prompts import PromptGeneratorConfig, PromptSplitSizes, build_prompt_splits

        gen_cfg = PromptGeneratorConfig(seed=prompts.seed, sizes=PromptSplitSizes(
            policy=tuple(prompts.policy), reward_model=prompts.reward_model, base_rm_labels=prompts.base_rm_labels,
            heldout_eval=prompts.heldout_eval))
        return build_prompt_splits(gen_cfg), gen_cfg

    def gold_rewards(self, rows: Sequence[Mapping[str, Any]], texts: Sequence[Sequence[str]]) -> list[list[float]]:
        from mtjax.testbed.benchmarks import instruction_prompts_from_rows
        from mtjax.testbed.gold import check_response

        prompts = instruction_prompts_from_rows(list(rows), where="prompt rows")
        return [[check_response(p.instruction_id_list, p.kwargs, p.prompt, t).reward("strict") for t in group]
                for p, group in zip(prompts, texts, strict=True)]

    def demonstrations(self, prompts, per_prompt, seed, demonstrator):
        raise ValueError("the testbed task has no demonstrations for the sft phase (task.name='synthetic' has)")

    def evaluate_heldout(self, run: Any, phase: str, policy_params: Any, rm_params: Any) -> tuple[dict, dict]:
        """π_t's gold reward, IFEval-style accuracies and lengths; r_t's accuracy against gold labels on pairs
        of π_t's and of π0's samples."""
        from mtjax.distributed import is_primary
        from mtjax.evaluate import evaluate_instruction_following, gold_pairwise_accuracy
        from mtjax.testbed.benchmarks import instruction_prompts_from_rows

        split = HELDOUT
        ev = run.eval_cfg
        sampling = dataclasses.replace(run.sampling, temperature=ev.temperature)
        samples, _ = run.samples(phase, layout.SAMPLES, policy_params, split, ev.num_samples, sampling=sampling)
        prompts = instruction_prompts_from_rows(list(run.splits[split]), where=f"prompt split {split}")
        rows = run.sample_rows(layout.samples_file(phase, layout.SAMPLES), split)
        texts = [[r["text"] for r in group] for group in rows]
        flat_prompts = [p for p, s in zip(prompts, texts, strict=True) for _ in s]
        policy = evaluate_instruction_following(flat_prompts, responses=[x for s in texts for x in s],
                                                progress=False)
        policy.update(_token_lengths(samples))
        base_rows = run.sample_rows(layout.samples_file(layout.eval_phase(0), layout.SAMPLES), split)
        base_texts = [[r["text"] for r in group] for group in base_rows]
        # Score the sampled token ids themselves (a decode/re-encode round trip would, e.g., append
        # an EOS to truncated responses: not what the RM saw in training).
        score_fn = run.text_score_fn(rm_params, {**run.ids_by_text(split, rows), **run.ids_by_text(split, base_rows)})
        rm_current = _safe_accuracy(gold_pairwise_accuracy, score_fn, prompts, texts, progress=is_primary())
        rm_base = _safe_accuracy(gold_pairwise_accuracy, score_fn, prompts, base_texts, progress=is_primary())
        metrics = {
            layout.POLICY_METRICS: {"gold_reward": policy["gold_reward_strict"],
                                    "heldout": {k: policy[k] for k in _HELDOUT_KEYS},
                                    **{k: policy[k] for k in _LENGTH_KEYS}},
            layout.RM_METRICS: {"accuracy_current_policy": rm_current.get("accuracy", float("nan")),
                                "accuracy_base_policy": rm_base.get("accuracy", float("nan")),
                                "pairs_current_policy": rm_current.get("num_pairs", 0),
                                "pairs_base_policy": rm_base.get("num_pairs", 0)},
        }
        flat = {**_prefixed(layout.POLICY_METRICS, policy), **_prefixed("rm_acc_current_policy", rm_current),
                **_prefixed("rm_acc_base_policy", rm_base)}
        return metrics, flat


_HELDOUT_KEYS = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose",
                 "gold_reward_loose")
_LENGTH_KEYS = ("length_mean_tokens", "length_p95_tokens", "length_mean_words", "length_p95_words",
                "truncated_fraction")


def _token_lengths(samples: Sequence[Sequence[Any]]) -> dict[str, float]:
    tokens = np.asarray([len(x.ids) for s in samples for x in s], np.float64)
    return {"length_mean_tokens": float(tokens.mean()), "length_p95_tokens": float(np.percentile(tokens, 95)),
            "truncated_fraction": float(np.mean([not x.stopped for s in samples for x in s]))}


def _prefixed(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}_{k}": v for k, v in values.items() if isinstance(v, (int, float))}


def _safe_accuracy(fn, score_fn, prompts, texts, **kwargs: Any) -> dict[str, Any]:
    try:
        return fn(score_fn, prompts, texts, **kwargs)
    except ValueError as e:  # every sample tied under the gold reward: no pair to judge
        return {"unavailable": 1, "reason_all_tied": 1 if "tie" in str(e) else 0}


# ----------------------------------------------------------------------------- the synthetic task


@dataclasses.dataclass(frozen=True)
class SyntheticSplits:
    """How the synthetic prompt splits were drawn (recorded in the prompts folder's manifest)."""

    seed: int
    sizes: dict[str, int]
    task: dict[str, Any]


class SyntheticTask:
    """Ordered keyword coverage (`mtjax.synthetic`) with its configured difficulty and gold reward."""

    name = "synthetic"
    has_demonstrations = True

    def __init__(self, config: Any):
        self.config = config  # mtjax.synthetic.TaskConfig

    def prompt_splits(self, prompts: Any) -> tuple[Any, SyntheticSplits]:
        """Disjoint splits, each drawn from its own seeded stream (`prompts.seed` and the split's name) in the
        order of `_split_sizes`, skipping prompts an earlier split holds: changing one split's size leaves
        the others' prompts alone but for those rare collisions."""
        import datasets

        from mtjax.synthetic import prompt_stream
        from mtjax.testbed.prompts import PROMPT_FEATURES

        sizes = _split_sizes(prompts)
        seen: set[str] = set()
        splits = {}
        for name, n in sizes.items():
            stream = prompt_stream((prompts.seed, zlib.crc32(name.encode())), self.config)
            rows = []
            for attempt, prompt in enumerate(stream):
                if len(rows) == n:
                    break
                if attempt > 50 * n + 1000:
                    raise ValueError(f"prompts.{name}: could only draw {len(rows)} distinct synthetic prompts of "
                                     f"{n} (task.min_items/max_items allow too few)")
                if prompt not in seen:
                    seen.add(prompt)
                    rows.append(synthetic_prompt_row(prompt))
            splits[name] = datasets.Dataset.from_list(rows, features=PROMPT_FEATURES)
        return datasets.DatasetDict(splits), SyntheticSplits(prompts.seed, sizes, dataclasses.asdict(self.config))

    def gold_rewards(self, rows: Sequence[Mapping[str, Any]], texts: Sequence[Sequence[str]]) -> list[list[float]]:
        from mtjax.synthetic import gold_reward

        return [[gold_reward(row["prompt"], t, self.config) for t in group] for row, group in zip(rows, texts,
                                                                                                   strict=True)]

    def demonstrations(self, prompts: Sequence[str], per_prompt: int, seed: int, demonstrator: Any
                       ) -> list[tuple[str, str]]:
        from mtjax.synthetic import demonstrations

        return demonstrations(prompts, per_prompt, seed, demonstrator)

    def evaluate_heldout(self, run: Any, phase: str, policy_params: Any, rm_params: Any) -> tuple[dict, dict]:
        """π_t: gold reward (mean over prompts of the per-prompt mean, with its standard error over prompts),
        item coverage, words, decoy rate, distinct samples, token lengths. RMs: the accuracy against gold on
        every untied pair among a prompt's samples (ties in score count half) of r_t on π_t's and on π0's
        samples, and of r0 on π_t's samples."""
        split = HELDOUT
        ev = run.eval_cfg
        sampling = dataclasses.replace(run.sampling, temperature=ev.temperature)
        samples, _ = run.samples(phase, layout.SAMPLES, policy_params, split, ev.num_samples, sampling=sampling)
        prompt_rows = list(run.splits[split])
        current = run.sample_rows(layout.samples_file(phase, layout.SAMPLES), split)
        base = run.sample_rows(layout.samples_file(layout.eval_phase(0), layout.SAMPLES), split)
        texts = [[r["text"] for r in group] for group in current]
        gold = self.gold_rewards(prompt_rows, texts)
        policy = {**gold_summary(gold), **self.response_features(prompt_rows, texts), **_token_lengths(samples)}
        rm: dict[str, Any] = {}
        for name, params, groups in (("accuracy_current_policy", rm_params, current),
                                     ("accuracy_base_policy", rm_params, base),
                                     ("r0_accuracy_current_policy", run.judge_params, current)):
            group_texts = [[r["text"] for r in group] for group in groups]
            accuracy = gold_accuracy(self.gold_rewards(prompt_rows, group_texts), group_texts,
                                     run.score_groups(params, split, groups))
            rm[name] = accuracy["accuracy"]
            if name != "r0_accuracy_current_policy":
                rm[f"pairs_{name.removeprefix('accuracy_')}"] = accuracy["pairs"]
                rm[f"tied_{name.removeprefix('accuracy_')}"] = accuracy["tied"]
        flat = {**_prefixed(layout.POLICY_METRICS, policy), **_prefixed(layout.RM_METRICS, rm)}
        return {layout.POLICY_METRICS: policy, layout.RM_METRICS: rm}, flat

    @staticmethod
    def response_features(rows: Sequence[Mapping[str, Any]], texts: Sequence[Sequence[str]]) -> dict[str, float]:
        """What gold does not reward but may be learnt (words, the decoy) and a readable summary (coverage)."""
        from mtjax.synthetic import coverage, spurious_features

        flat = [(row["prompt"], t) for row, group in zip(rows, texts, strict=True) for t in group]
        features = [spurious_features(t) for _, t in flat]
        return {"coverage": float(np.mean([coverage(p, t) for p, t in flat])),
                "length_mean_words": float(np.mean([f["length"] for f in features])),
                "decoy_rate": float(np.mean([f["decoys"] > 0 for f in features])),
                "distinct_fraction": float(np.mean([len(set(group)) / len(group) for group in texts]))}


def synthetic_prompt_row(prompt: str) -> dict[str, Any]:
    """A prompt split row for a synthetic prompt (no verifiable instructions)."""
    return {"prompt_id": "syn-" + hashlib.sha256(prompt.encode()).hexdigest()[:16], "prompt": prompt, "messages": [],
            "task_id": "synthetic", "task_category": f"{len(prompt.split())}_items", "instruction_id_list": [],
            "kwargs": []}


# ----------------------------------------------------------------------------- statistics on gold


def gold_summary(gold: Sequence[Sequence[float]]) -> dict[str, float]:
    """Mean gold over prompts (each prompt's samples averaged first) and its standard error over prompts."""
    per_prompt = np.asarray([np.mean(g) for g in gold], np.float64)
    se = float(per_prompt.std(ddof=1) / math.sqrt(len(per_prompt))) if len(per_prompt) > 1 else float("nan")
    return {"gold_reward": float(per_prompt.mean()), "gold_reward_se": se}


def gold_accuracy(gold: Sequence[Sequence[float]], texts: Sequence[Sequence[str]],
                  scores: Sequence[Sequence[float]]) -> dict[str, Any]:
    """An RM's accuracy against gold on every untied pair among each prompt's responses (NaN when every pair
    ties), with the numbers of pairs judged and skipped as tied."""
    from mtjax.gold_pairs import pairwise_accuracy, untied_pairs

    pairs, tied = untied_pairs(gold, texts)
    accuracy = pairwise_accuracy(scores, pairs) if pairs else float("nan")
    return {"accuracy": accuracy, "pairs": len(pairs), "tied": tied}
