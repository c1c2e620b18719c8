"""Samples of the policy stored in the run directory: each sampling pass runs in pieces (an interrupted pass
resumes with its next piece), is seeded by its frozen name (`mtjax.layout.seed_name`), optionally scored by an
RM or judged by an LLM judge, and is read back grouped per prompt of its split.

`StoredSamples` is a part of `em.MutualTaught`: it uses the run's `rd`, `cfg`, `models`, `mesh`, `sampling`,
`mt`, `splits`, `scorer`, `prompt_ids`, `prompts`, `seed` and `log`."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

from mtjax import data, layout, tracking
from mtjax.distributed import is_primary
from mtjax.divergence import DivergenceError, nonfinite_count
from mtjax.interrupts import stop_if_preempted
from mtjax.run_models import Models
from mtjax.rundir import read_jsonl_prefix


@dataclasses.dataclass(frozen=True)
class Sample:
    ids: tuple[int, ...]  # response tokens, the stop token included when `stopped`
    stopped: bool


def sample_responses(models: Models, params: Any, prompt_ids: Sequence[Sequence[int]], num_samples: int,
                     sampling: Any, seed: int, mesh=None, first_prompt_index: int = 0,
                     progress: bool = True) -> list[list[Sample]]:
    """`num_samples` responses per prompt from the policy, as the `sampling.SamplingConfig` says."""
    from mtjax.sampling import generate

    options = {**dataclasses.asdict(sampling), "num_samples": num_samples}
    out = generate(models.policy, params, [list(p) for p in prompt_ids], eos_token_ids=models.stop_ids,
                   pad_token_id=models.pad_id, seed=seed, mesh=mesh, first_prompt_index=first_prompt_index,
                   progress=progress, **options)
    return [[Sample(tuple(int(t) for t in s.token_ids), s.finish_reason == "stop") for s in per_prompt]
            for per_prompt in out]


def response_text(models: Models, sample: Sample | Sequence[int]) -> str:
    from mtjax.sampling import decode

    return decode(models.tokenizer, list(sample.ids if isinstance(sample, Sample) else sample), models.stop_ids)


class StoredSamples:
    """The sampling passes of a run's phases and their stored rows."""

    def samples(self, phase: str, sample_pass: layout.SamplePass | str, params: Any, split: str, num_samples: int,
                rm_params: Any = None, sampling: Any = None) -> tuple[list[list[Sample]], list]:
        """Samples (and, with `rm_params`, their RM scores) of `split`, read back if already stored.
        `sample_pass`: a `layout.SamplePass`, or its file name (`layout.sample_pass`).

        The pass runs in pieces of `checkpoint.sample_every_prompts` prompts; the rows of finished pieces
        are kept in its partial file, so an interrupted pass resumes with the next piece. Each prompt
        keeps its index in the split, hence its random draws (seeded by the pass's frozen seed name)."""
        if isinstance(sample_pass, str):
            sample_pass = layout.sample_pass(sample_pass)
        path, partial = layout.samples_file(phase, sample_pass), layout.partial_samples_file(phase, sample_pass)
        name = sample_pass.file
        if self.rd.file(path).exists():  # written by an earlier attempt at this phase
            self.rd.record_artifact(path, keep_recorded=True)
        else:
            prompts, ids, texts = self.prompt_ids(split), self.splits[split]["prompt_id"], self.prompts(split)
            rows = self._whole_prompts(partial, ids, num_samples) if self.rd.file(partial).exists() else []
            piece = self.cfg.checkpoint.sample_every_prompts
            first = len(rows) // num_samples
            if first and is_primary():
                print(f"mtjax: {path}: resuming after {first} of {len(prompts)} prompts", flush=True)
            seconds, num_partial_rows = 0.0, len(rows)
            for lo in range(first, len(prompts), piece):
                stop_if_preempted()
                start = time.perf_counter()
                hi = min(lo + piece, len(prompts))
                samples = sample_responses(self.models, params, prompts[lo:hi], num_samples,
                                           sampling or self.sampling,
                                           self.seed(phase, sample_pass.seed_purpose), self.mesh,
                                           first_prompt_index=lo)
                rewards = [[None] * len(s) for s in samples]
                if rm_params is not None:
                    flat_p = [p for p, s in zip(prompts[lo:hi], samples, strict=True) for _ in s]
                    flat_t = [t for t, s in zip(texts[lo:hi], samples, strict=True) for _ in s]
                    flat_r = [x.ids for s in samples for x in s]
                    scores = self.scorer.score_ids(rm_params, flat_t, flat_p, flat_r)
                    if nonfinite_count(scores):
                        raise DivergenceError(
                            f"{phase}: the reward model gave {nonfinite_count(scores)} of {len(scores)} responses a "
                            "reward that is not finite (its weights are broken); nothing of this piece was saved")
                    it = iter(scores.tolist())
                    rewards = [[next(it) for _ in s] for s in samples]
                rows += [{"prompt_id": pid, "sample": k, "response_ids": list(x.ids), "stopped": x.stopped,
                          "reward": r, "text": response_text(self.models, x)}
                         for pid, s, rs in zip(ids[lo:hi], samples, rewards, strict=True)
                         for k, (x, r) in enumerate(zip(s, rs, strict=True))]
                if hi < len(prompts):
                    self.rd.write_jsonl(partial, rows, artifact=False)
                seconds += time.perf_counter() - start
            self.rd.write_jsonl(path, rows)
            if is_primary():
                self.rd.file(partial).unlink(missing_ok=True)
            self.log(phase)({"sampling": {name: tracking.sampling_metrics(rows, len(rows) - num_partial_rows,
                                                                          seconds, first)}})
        groups = self.sample_rows(path, split)
        samples = [[Sample(tuple(r["response_ids"]), r["stopped"]) for r in group] for group in groups]
        rewards = [[r["reward"] for r in group] for group in groups]
        return samples, rewards

    def _whole_prompts(self, partial: str, prompt_ids: Sequence[str], num_samples: int) -> list[dict]:
        """The rows of a partial samples file that form whole prompts, in the split's order (rows written by an
        interrupted pass; anything after a damaged, missing or foreign row is sampled again)."""
        rows, problem = read_jsonl_prefix(self.rd.file(partial))
        good = 0
        for j, row in enumerate(rows):
            i, k = divmod(j, num_samples)
            if i >= len(prompt_ids) or row.get("prompt_id") != prompt_ids[i] or row.get("sample") != k:
                problem = f"{self.rd.file(partial)}: row {j + 1} is not sample {k} of prompt {i}"
                break
            good = j + 1
        keep = good - good % num_samples
        if problem is None and keep < len(rows):
            problem = f"{self.rd.file(partial)}: its last prompt has {len(rows) - keep} of {num_samples} samples"
        if problem is not None and is_primary():
            print(f"mtjax: {problem}; keeping the first {keep // num_samples} whole prompts", flush=True)
        return rows[:keep]

    def sample_rows(self, path: str, split: str) -> list[list[dict]]:
        """The stored rows of a samples file, grouped per prompt in the split's order."""
        return _group_rows(self.rd.read_jsonl(path), self.splits[split]["prompt_id"])

    def score_groups(self, rm_params: Any, split: str, groups: Sequence[Sequence[dict]]) -> list[list[float]]:
        """RM scores of stored sample rows grouped per prompt of `split` (`sample_rows`), on their token ids."""
        flat = [(text, ids, row["response_ids"]) for text, ids, group in
                zip(self.prompts(split), self.prompt_ids(split), groups, strict=True) for row in group]
        scores = iter(self.scorer.score_ids(rm_params, *zip(*flat, strict=True), progress=False).tolist())
        return [[next(scores) for _ in group] for group in groups]

    def ids_by_text(self, split: str, groups: Sequence[Sequence[dict]]) -> dict[tuple[str, str], tuple[list, list]]:
        """(prompt text, response text) -> (prompt ids, sampled response ids), for the text-based evaluators."""
        return {(text, r["text"]): (p_ids, r["response_ids"])
                for text, p_ids, group in zip(self.splits[split]["prompt"], self.prompt_ids(split), groups,
                                              strict=True)
                for r in group}

    def judged_rewards(self, phase: str, split: str, judge_params: Any) -> tuple[list[list[float]], dict]:
        """LLM-as-a-judge rewards of the phase's stored samples (`mtjax.judge`): each response judged
        `mt.judge_samples` times by the judge (the policy with weights `judge_params`, or `mt.judge_model`),
        sampled as the `sampling` section says but `mt.judge_max_new_tokens` long; the mean parsed score, NaN
        when none parsed. The judgments are kept in `PHASE/judgments.jsonl` (read back on a rerun). Returns the
        rewards per prompt and the counts."""
        from mtjax.judge import judge_rewards, parse_score, rubric_prompt_text

        path = layout.judgments_file(phase)
        groups = self.sample_rows(layout.samples_file(phase, layout.SAMPLES), split)
        if self.rd.file(path).exists():  # written by an earlier attempt at this phase
            self.rd.record_artifact(path, keep_recorded=True)
            rows = self.rd.read_jsonl(path)
        else:
            n = self.mt.judge_samples
            flat = [(rubric_prompt_text(prompt), row) for prompt, group in zip(self.prompts(split), groups, strict=True)
                    for row in group]
            judgments: list[str] = []

            def judge(queries: list[str]) -> list[str]:
                judgments.extend(self._judge_texts(phase, judge_params, queries, layout.JUDGE_SEED))
                return judgments

            judged = judge_rewards(judge, [p for p, _ in flat], [r["text"] for _, r in flat], n)
            rows = [{"prompt_id": row["prompt_id"], "sample": row["sample"], "reward": reward,
                     "judgments": judgments[i * n:(i + 1) * n]}
                    for i, ((_, row), reward) in enumerate(zip(flat, judged.rewards, strict=True))]
            self.rd.write_jsonl(path, rows)
        rewards = iter(r["reward"] for r in rows)
        per_prompt = [[next(rewards) for _ in group] for group in groups]
        unparsed = sum(parse_score(j) is None for r in rows for j in r["judgments"])
        return per_prompt, {"judgments": sum(len(r["judgments"]) for r in rows), "judgments_unparsed": unparsed,
                            "responses_unjudged": sum(not math.isfinite(r["reward"]) for r in rows)}

    def meta_judged_pairs(self, phase: str, split: str, judge_params: Any) -> tuple[Any, dict]:
        """Meta-Rewarding's judge pairs (`mtjax.judge`): for each prompt, the response whose judgments (from
        `judged_rewards`) disagree most is examined by the meta-judge (the policy with `judge_params`), every
        two of its judgments compared in both positions; the judgment the verdicts rank highest is chosen over
        the lowest, as a pair whose prompt is the judge's rubric prompt. The verdicts are kept in
        `PHASE/meta_judgments.jsonl` (read back on a rerun). Returns the pairs (their counts say what was skipped
        and why) and the meta-judge's counts."""
        from collections import Counter

        from mtjax import judge
        from mtjax.pairs import PairSet

        path = layout.meta_judgments_file(phase)
        prompts = {pid: judge.rubric_prompt_text(p)
                   for pid, p in zip(self.splits[split]["prompt_id"], self.prompts(split), strict=True)}
        responses = {(r["prompt_id"], r["sample"]): r["text"]
                     for group in self.sample_rows(layout.samples_file(phase, layout.SAMPLES), split) for r in group}
        judged = _group_rows(self.rd.read_jsonl(layout.judgments_file(phase)), self.splits[split]["prompt_id"])
        if self.rd.file(path).exists():  # written by an earlier attempt at this phase
            self.rd.record_artifact(path, keep_recorded=True)
            rows = self.rd.read_jsonl(path)
        else:
            rows, queries = [], []
            for group in judged:
                pick = judge.most_disputed([r["judgments"] for r in group])
                if pick is None:
                    continue
                row = group[pick]
                texts = row["judgments"]
                prompt, response = prompts[row["prompt_id"]], responses[(row["prompt_id"], row["sample"])]
                order = judge.battles(len(texts))
                queries += [judge.meta_judge_prompt(prompt, response, texts[a], texts[b]) for a, b in order]
                rows.append({"prompt_id": row["prompt_id"], "sample": row["sample"],
                             "battles": [[a, b] for a, b in order]})
            verdicts = iter(self._judge_texts(phase, judge_params, queries, layout.META_JUDGE_SEED) if queries else [])
            for row in rows:
                row["verdicts"] = [next(verdicts) for _ in row["battles"]]
            self.rd.write_jsonl(path, rows)
        judgments = {(r["prompt_id"], r["sample"]): r["judgments"] for group in judged for r in group}
        winners = [[judge.parse_winner(v) for v in row["verdicts"]] for row in rows]
        weights = judge.position_weights([w for ws in winners for w in ws])
        pairs, counts, eos = PairSet([], [], [], Counter()), Counter(), self.models.stop_ids[0]
        counts["prompts_without_disputed_judgments"] = len(judged) - len(rows)
        for row, ws in zip(rows, winners, strict=True):
            key = (row["prompt_id"], row["sample"])
            texts = judgments[key]
            choice = judge.judgment_pair(texts, [(a, b, w) for (a, b), w in zip(row["battles"], ws, strict=True)],
                                         weights)
            if isinstance(choice, str):
                counts[f"skipped_{choice}"] += 1
                continue
            rubric = judge.judge_prompt(prompts[row["prompt_id"]], responses[key])
            pairs.append(data.chat_prompt_ids(self.models.tokenizer, rubric),
                         data.response_ids(self.models.tokenizer, texts[choice.chosen], eos),
                         data.response_ids(self.models.tokenizer, texts[choice.rejected], eos))
        pairs.counts.update({f"meta_{k}": v for k, v in counts.items()})  # reach the summary with the pairs
        return pairs, {"meta_judgments": sum(len(ws) for ws in winners),
                       "meta_judgments_unparsed": sum(w is None for ws in winners for w in ws),
                       "meta_position_a_weight": weights[0], "judge_pairs": len(pairs)}

    def _judge_texts(self, phase: str, judge_params: Any, queries: Sequence[str], seed_purpose: str) -> list[str]:
        """The judge's answers to `queries` (rubric or meta-rubric prompts in the policy's chat template), one
        sample each, sampled as the `sampling` section says but `mt.judge_max_new_tokens` long."""
        sampling = dataclasses.replace(self.sampling, max_new_tokens=self.mt.judge_max_new_tokens)
        judge = self.models.judge_view()
        ids = [data.chat_prompt_ids(judge.tokenizer, q) for q in queries]
        out = sample_responses(judge, judge_params, ids, 1, sampling, self.seed(phase, seed_purpose), self.mesh)
        return [response_text(judge, s[0]) for s in out]


def _group_rows(rows: Sequence[dict], order: Sequence[str]) -> list[list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["prompt_id"], []).append(row)
    return [grouped[pid] for pid in order]
