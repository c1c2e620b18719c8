"""What each iteration's evaluation measures (`eval.benchmarks`), and the paper's benchmarks.

- `testbed`: the offline verifiable-instruction testbed's held-out split: π_t's gold reward, IFEval-style
  accuracies and lengths, and r_t's accuracy against gold labels on pairs of π_t's and π0's samples.
- `alpaca_eval`: π_t's answers to AlpacaEval 2's instructions in `alpaca_eval`'s model-outputs format
  (`instruction`, `output`, `generator`, `dataset`), ready for the official GPT-4 judge
  (`alpaca_eval --model_outputs FILE`); plus a PROXY win rate and length-controlled win rate against the
  GPT-4-turbo references judged offline by the base reward model (r0, the same judge every iteration).
- `arena_hard`: π_t's answers to an arena-hard-auto question file, in that project's model-answer format
  (`uid`, `ans_id`, `model`, `messages` with the answer as `{"answer": ...}`, `tstamp`, `metadata`), ready
  for its judge (`gen_judgment.py`); `metadata.token_len` counts the policy's tokens, not tiktoken's.
- `rewardbench`: r_t's accuracy on RewardBench pairs by subset and by section (example-count weighted, ties
  count as wrong), as the official `rewardbench` script computes it.

Benchmark files: a local path, a hub dataset id (read with `datasets`), or `hf://datasets/OWNER/NAME/PATH`
for a single file of a hub dataset repo (fetched with `huggingface_hub` into its cache).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtjax import layout

BENCHMARKS = ("testbed", "alpaca_eval", "arena_hard", "rewardbench")
GENERATION_BENCHMARKS = ("alpaca_eval", "arena_hard")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Per-iteration evaluation.

    benchmarks: any of BENCHMARKS.
    num_samples, temperature: the testbed's sampled responses per held-out prompt.
    answer_temperature, answer_max_new_tokens: benchmark answers (0 = greedy; None = the sampling section's
      max_new_tokens).
    alpaca_eval, arena_hard, rewardbench: where each benchmark's data comes from (see the module docstring);
      `*_limit`: only the first N rows (None = all); `rewardbench_split`: the hub dataset's split.
    """

    benchmarks: tuple[str, ...] = ("testbed",)
    num_samples: int = 4
    temperature: float = 0.8
    answer_temperature: float = 0.0
    answer_max_new_tokens: int | None = None
    alpaca_eval: str = "hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline.json"
    alpaca_eval_limit: int | None = None
    arena_hard: str = "lmarena-ai/arena-hard-auto-v0.1"
    arena_hard_limit: int | None = None
    rewardbench: str = "allenai/reward-bench"
    rewardbench_split: str = "filtered"
    rewardbench_limit: int | None = None

    def __post_init__(self) -> None:
        problems = []
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if not self.benchmarks or unknown:
            problems.append(f"benchmarks={self.benchmarks!r}: each must be one of {BENCHMARKS}")
        if not isinstance(self.num_samples, int) or self.num_samples < 2:
            problems.append(f"num_samples={self.num_samples!r} must be >= 2 (RM accuracy needs pairs)")
        for name in ("temperature", "answer_temperature"):
            t = getattr(self, name)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                problems.append(f"{name}={t!r} must be a finite number >= 0 (0 = greedy)")
        for name in ("answer_max_new_tokens", "alpaca_eval_limit", "arena_hard_limit", "rewardbench_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"{name}={value!r} must be an int >= 1 or unset")
        if problems:
            raise ValueError("; ".join(f"EvalConfig.{p}" for p in problems))


# ----------------------------------------------------------------------------- benchmark files


def read_benchmark_rows(source: str, split: str | None = None) -> list[dict[str, Any]]:
    """Rows of a benchmark file: a local path, `hf://datasets/OWNER/NAME/PATH[@REVISION]`, or a hub dataset id."""
    from mtjax.sources import resolve_data_file
    from mtjax.testbed.benchmarks import read_rows

    return read_rows(resolve_data_file(source), split)


@dataclasses.dataclass(frozen=True)
class ArenaHardQuestion:
    uid: str
    prompt: str
    category: str


def arena_hard_questions(rows: Sequence[Mapping[str, Any]], where: str) -> list[ArenaHardQuestion]:
    """arena-hard-auto questions, in its current format (`uid`, `prompt`, `category`) or the v0.1 release's
    (`question_id`, `turns: [{content}]`, `category`)."""
    questions = []
    for i, row in enumerate(rows):
        if "uid" in row and "prompt" in row:
            uid, prompt = row["uid"], row["prompt"]
        elif "question_id" in row and row.get("turns"):
            uid, prompt = row["question_id"], row["turns"][0]["content"]
        else:
            raise ValueError(f"{where} row {i}: an arena-hard-auto question needs 'uid' and 'prompt' (or "
                             f"'question_id' and 'turns'); the row has {sorted(row)}")
        questions.append(ArenaHardQuestion(str(uid), str(prompt), str(row.get("category", ""))))
    return questions


_CODE_BLOCK = re.compile(r"```[^`]*```")


def markdown_counts(answer: str) -> dict[str, dict[str, int]]:
    """The style metadata arena-hard-auto keeps per answer (headers, lists, bold), code blocks left out."""
    text = _CODE_BLOCK.sub("", answer)

    def count(pattern: str) -> int:
        return len(re.findall(pattern, text, re.MULTILINE))

    return {
        "header_count": {f"h{n}": count(rf"^#{{{n}}}\s") for n in range(1, 7)},
        "list_count": {"ordered": count(r"^\s*\d+\.\s"), "unordered": count(r"^\s*[-*+]\s")},
        "bold_count": {"**": count(r"\*\*[^*\n]+\*\*"), "__": count(r"__[^_\n]+__")},
    }


def arena_hard_answer(question: ArenaHardQuestion, answer: str, model: str, token_len: int, answer_id: str,
                      timestamp: float) -> dict[str, Any]:
    """One line of an arena-hard-auto model-answer file."""
    return {"uid": question.uid, "ans_id": answer_id, "model": model,
            "messages": [{"role": "user", "content": question.prompt},
                         {"role": "assistant", "content": {"answer": answer}}],
            "tstamp": timestamp, "metadata": {"token_len": token_len, **markdown_counts(answer)}}



# ----------------------------------------------------------------------------- loading (at start-up)


@dataclasses.dataclass
class BenchmarkData:
    """What a run's benchmarks need, read once when the run starts: prompt splits to answer (named
    `bench_<name>`) and the rows to record under `benchmarks/<name>.jsonl` (references, question ids, pairs)."""

    splits: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    records: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


def benchmark_split(name: str) -> str:
    return f"bench_{name}"


def _prompt_rows(name: str, prompts: Sequence[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Prompt split rows from (id, text, category)."""
    return [{"prompt_id": pid, "prompt": text, "messages": [], "task_id": name, "task_category": category,
             "instruction_id_list": [], "kwargs": []} for pid, text, category in prompts]


def _first(rows: list, limit: int | None) -> list:
    return rows if limit is None else rows[:limit]


def load_benchmarks(cfg: EvalConfig) -> BenchmarkData:
    """Reads every benchmark of `cfg.benchmarks` but the testbed (errors name the setting and the file)."""
    from mtjax.prompt_sets import prompt_id
    from mtjax.sources import resolve_data_file
    from mtjax.testbed.benchmarks import load_alpaca_eval, load_preference_pairs

    out = BenchmarkData()

    def read(setting: str, load):
        try:
            return load()
        except (ValueError, OSError) as e:
            raise ValueError(f"eval.{setting}={getattr(cfg, setting)!r}: {e}") from e

    if "alpaca_eval" in cfg.benchmarks:
        examples = read("alpaca_eval", lambda: load_alpaca_eval(resolve_data_file(cfg.alpaca_eval, "eval.alpaca_eval")))
        unique = {prompt_id(e.instruction): e for e in examples}  # a repeated instruction is answered once
        out.counts["alpaca_eval_duplicates_skipped"] = len(examples) - len(unique)
        kept = _first(list(unique.items()), cfg.alpaca_eval_limit)
        out.splits[benchmark_split("alpaca_eval")] = _prompt_rows(
            "alpaca_eval", [(pid, e.instruction, e.dataset) for pid, e in kept])
        out.records["alpaca_eval"] = [{"prompt_id": pid, **dataclasses.asdict(e)} for pid, e in kept]
    if "arena_hard" in cfg.benchmarks:
        questions = read("arena_hard", lambda: arena_hard_questions(
            read_benchmark_rows(cfg.arena_hard), f"eval.arena_hard={cfg.arena_hard!r}"))
        questions = _first(questions, cfg.arena_hard_limit)
        out.splits[benchmark_split("arena_hard")] = _prompt_rows(
            "arena_hard", [(q.uid, q.prompt, q.category) for q in questions])
        out.records["arena_hard"] = [dataclasses.asdict(q) for q in questions]
    if "rewardbench" in cfg.benchmarks:
        pairs = read("rewardbench", lambda: load_preference_pairs(
            resolve_data_file(cfg.rewardbench, "eval.rewardbench"), cfg.rewardbench_split))
        out.records["rewardbench"] = [dataclasses.asdict(p) for p in _first(pairs, cfg.rewardbench_limit)]
    return out


# ----------------------------------------------------------------------------- answering (each iteration)


def evaluate_benchmarks(run: Any, t: int, phase: str, policy_params: Any, rm_params: Any, judge_params: Any
                        ) -> dict[str, dict[str, Any]]:
    """The non-testbed benchmarks of iteration t: π_t's answers written for the official judges (and judged
    offline by `judge_params`, r0, as a proxy), r_t's RewardBench accuracy. `run` is the `em.MutualTaught`."""
    cfg: EvalConfig = run.eval_cfg
    metrics: dict[str, dict[str, Any]] = {}
    answers = {name: _answers(run, t, phase, name, policy_params) for name in GENERATION_BENCHMARKS
               if name in cfg.benchmarks}
    if "alpaca_eval" in answers:
        metrics["alpaca_eval"] = _alpaca_eval(run, t, answers["alpaca_eval"], judge_params)
    if "arena_hard" in answers:
        metrics["arena_hard"] = _arena_hard(run, t, answers["arena_hard"])
    if "rewardbench" in cfg.benchmarks:
        metrics["rewardbench"] = _rewardbench(run, t, rm_params)
    return metrics


def _answers(run: Any, t: int, phase: str, name: str, policy_params: Any) -> list[dict[str, Any]]:
    """π_t's one answer per benchmark prompt (sampled with `answer_temperature`; resumable like every
    sampling pass), as the stored sample rows in prompt order."""
    cfg: EvalConfig = run.eval_cfg
    split = benchmark_split(name)
    budget = cfg.answer_max_new_tokens or run.sampling.max_new_tokens
    sampling = dataclasses.replace(run.sampling, temperature=cfg.answer_temperature, max_new_tokens=budget)
    answers = layout.benchmark_answers(name)
    run.samples(phase, answers, policy_params, split, 1, sampling=sampling)
    return [group[0] for group in run.sample_rows(layout.samples_file(phase, answers), split)]


def _generator_name(run: Any, t: int) -> str:
    return f"mtjax-{run.cfg.preset}-iter{t}"


def _alpaca_eval(run: Any, t: int, answers: Sequence[Mapping[str, Any]], judge_params: Any) -> dict[str, Any]:
    from mtjax.evaluate import alpaca_eval_outputs, reward_model_win_rate
    from mtjax.testbed.benchmarks import AlpacaEvalExample

    records = {r["prompt_id"]: r for r in run.rd.read_jsonl(layout.benchmark_records("alpaca_eval"))}
    examples = [AlpacaEvalExample(**{k: v for k, v in records[a["prompt_id"]].items() if k != "prompt_id"})
                for a in answers]
    outputs = [a["text"] for a in answers]
    run.rd.write_json(layout.benchmark_output(t, layout.ALPACA_EVAL_OUTPUTS),
                      alpaca_eval_outputs(examples, outputs, _generator_name(run, t)))
    split = benchmark_split("alpaca_eval")
    known = run.ids_by_text(split, [[a] for a in answers])
    try:
        proxy = reward_model_win_rate(run.scorer.text_score_fn(judge_params, known),
                                      [e.instruction for e in examples], outputs,
                                      [e.reference_output for e in examples], progress=False)
    except ValueError as e:  # too few prompts for the length-controlled fit: keep the answers, say why
        proxy = {"error": str(e)}
    return {"answers": len(outputs), "truncated_fraction": _truncated(answers),
            "proxy_win_rate": proxy.get("win_rate", float("nan")),
            "proxy_lc_win_rate": proxy.get("length_controlled_win_rate", float("nan")),
            "length_mean_chars": float(np.mean([len(o) for o in outputs])) if outputs else float("nan"),
            **({"proxy_error": proxy["error"]} if "error" in proxy else {})}


def _arena_hard(run: Any, t: int, answers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    import hashlib
    import time

    questions = {q["uid"]: ArenaHardQuestion(**q) for q in run.rd.read_jsonl(layout.benchmark_records("arena_hard"))}
    model = _generator_name(run, t)
    rows = []
    for a in answers:
        question = questions[a["prompt_id"]]
        answer_id = hashlib.sha256(f"{model}|{question.uid}".encode()).hexdigest()[:22]
        tokens = len(a["response_ids"]) - int(a["stopped"])  # the stop token is not part of the answer
        rows.append(arena_hard_answer(question, a["text"], model, tokens, answer_id, time.time()))
    run.rd.write_jsonl(layout.benchmark_output(t, layout.ARENA_HARD_ANSWERS), rows)
    lengths = [r["metadata"]["token_len"] for r in rows]
    return {"answers": len(rows), "truncated_fraction": _truncated(answers),
            "length_mean_tokens": float(np.mean(lengths)) if lengths else float("nan")}


def _rewardbench(run: Any, t: int, rm_params: Any) -> dict[str, Any]:
    from mtjax.evaluate import pairwise_accuracy
    from mtjax.testbed.benchmarks import PreferenceExample

    pairs = [PreferenceExample(**row) for row in run.rd.read_jsonl(layout.benchmark_records("rewardbench"))]
    result = pairwise_accuracy(run.scorer.text_score_fn(rm_params), pairs, progress=False)
    run.rd.write_json(layout.benchmark_output(t, layout.REWARDBENCH_RESULT), result)
    return {"accuracy": result["accuracy"], "pairs": result["num_pairs"], "ties": result["num_ties"],
            **({"score": result["score"], **result["sections"]} if "sections" in result else {})}


def _truncated(answers: Sequence[Mapping[str, Any]]) -> float:
    return float(np.mean([not a["stopped"] for a in answers])) if answers else float("nan")
