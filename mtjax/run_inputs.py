"""A run's inputs, checked at start-up: the model contexts against the settings, the prompt splits (built,
measured in both chat templates and recorded by the `prompts` phase), and each split's prompts and token ids.

`RunInputs` is a part of `em.MutualTaught`: it uses the run's `cfg`, `mt`, `sampling`, `eval_cfg`, `sft`,
`task`, `specs`, `models`, `rd`, `splits` and `phase`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from mtjax import data, layout, settings
from mtjax.distributed import barrier, is_primary


class RunInputs:
    """The prompt splits of a run and the checks of its settings against its models."""

    def policy_split(self, t: int) -> str:
        """The prompt split of iteration t's E-step (see settings.POLICY_PROMPTS and SCHEDULES); derived splits
        are concatenations of recorded ones, built on first use."""
        import datasets

        mt, T = self.mt, self.cfg.iterations
        if mt.schedule == "offline":
            name, parts = "all_training", [self.splits[f"policy_{s}"] for s in range(1, T + 1)]
            parts.append(self.splits["reward_model"])
        elif mt.policy_prompts == "with_rm":
            rm = self.splits["reward_model"]
            lo, hi = (t - 1) * len(rm) // T, t * len(rm) // T
            name, parts = f"policy_{t}_with_rm", [self.splits[f"policy_{t}"], rm.select(range(lo, hi))]
        elif mt.policy_prompts == "all_portions" and t == T + 1:
            return "reward_model"
        else:
            return f"policy_{t}"
        if name not in self.splits:
            self.splits[name] = datasets.concatenate_datasets(parts)
        return name

    def _check_contexts(self, specs: Mapping[str, Any]) -> None:
        """The prompt cap plus the response budget must fit each model's context (else no prompt could)."""
        from mtjax.prompt_sets import PromptConfig

        prompts = settings.build(PromptConfig, self.cfg.prompts)
        budget = max(self.sampling.max_new_tokens, self.eval_cfg.answer_max_new_tokens or 0)
        need = prompts.max_prompt_tokens + budget
        problems = [f"prompts.max_prompt_tokens={prompts.max_prompt_tokens} + the response budget {budget} "
                    f"(sampling.max_new_tokens, eval.answer_max_new_tokens) = {need} exceeds the {name}'s context "
                    f"({spec.config.max_position_embeddings} tokens, {spec.source.source})"
                    for name, spec in specs.items() if need > spec.config.max_position_embeddings]
        if self.mt.judges:  # the judge reads the rubric around a prompt and a response, then writes its verdict
            from mtjax.judge import judge_prompt, meta_judge_prompt

            judge = specs.get("judge", specs["policy"])  # the model that judges: its own, or the policy
            rubric = len(data.chat_prompt_ids(judge.tokenizer, judge_prompt("", "")))
            response = prompts.max_prompt_tokens + self.sampling.max_new_tokens
            judged = rubric + response + self.mt.judge_max_new_tokens
            what = f"the judge's rubric ({rubric} tokens) + prompts.max_prompt_tokens + sampling.max_new_tokens + " \
                   f"mt.judge_max_new_tokens = {judged}"
            if self.mt.meta_judge:  # the meta-judge reads two judgments besides, then writes its verdict
                rubric = len(data.chat_prompt_ids(judge.tokenizer, meta_judge_prompt("", "", "", "")))
                judged = rubric + response + 3 * self.mt.judge_max_new_tokens
                what = f"the meta-judge's rubric ({rubric} tokens) + prompts.max_prompt_tokens + " \
                       f"sampling.max_new_tokens + 3 x mt.judge_max_new_tokens = {judged}"
            if judged > judge.config.max_position_embeddings:
                problems.append(f"{what} exceeds the {'judge' if 'judge' in specs else 'policy'}'s context "
                                f"({judge.config.max_position_embeddings} tokens, {judge.source.source})")
        if problems:
            raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))

    def _check_reward_model_from_policy(self, specs: Mapping[str, Any]) -> None:
        """With `sft.reward_model_from_policy` the RM starts from π0's backbone: their shapes must agree."""
        if not (self.sft.enabled and self.sft.reward_model_from_policy and self.cfg.base_rm.enabled):
            return
        shape = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "scan_layers")
        policy, reward = specs["policy"].config, specs["reward_model"].config
        differ = [f"{k} {getattr(policy, k)} vs {getattr(reward, k)}" for k in shape
                  if getattr(policy, k) != getattr(reward, k)]
        if differ:
            raise ValueError(f"invalid config:\n  - sft.reward_model_from_policy needs the reward model's backbone to "
                             f"have the policy's shape (policy vs reward_model: {'; '.join(differ)}); set it False "
                             "or use the same source")

    def _prompt_limits(self, specs: Mapping[str, Any]):
        from mtjax.prompt_sets import PromptConfig, PromptLimits

        prompts = settings.build(PromptConfig, self.cfg.prompts)
        budget = max(self.sampling.max_new_tokens, self.eval_cfg.answer_max_new_tokens or 0)
        return PromptLimits(prompts.max_prompt_tokens, budget,
                            specs["policy"].config.max_position_embeddings,
                            specs["reward_model"].config.max_position_embeddings)

    def _build_prompt_splits(self, specs: Mapping[str, Any]) -> tuple[Any, Any, Counter, dict]:
        """The prompt splits of a new run, in memory (written by the `prompts` phase): the task's, with
        D_1..D_T and D_R from `prompts.source` when it is not the testbed; every prompt measured in the
        policy's and the RM's chat templates, and those that do not fit dropped and counted by reason."""
        import datasets

        from mtjax.iteration_eval import load_benchmarks
        from mtjax.prompt_sets import PromptConfig, external_splits, fitting_prompts, row_prompt
        from mtjax.scoring import same_tokenization
        from mtjax.testbed.prompts import PROMPT_FEATURES

        p = settings.build(PromptConfig, self.cfg.prompts)
        policy_tok, reward_tok = specs["policy"].tokenizer, specs["reward_model"].tokenizer
        same = same_tokenization(policy_tok, reward_tok)

        def measure(prompt) -> tuple[int, int]:
            n = len(data.chat_prompt_ids(policy_tok, prompt))
            return n, n if same else len(data.chat_prompt_ids(reward_tok, prompt))

        limits = self._prompt_limits(specs)
        splits, gen_cfg = self.task.prompt_splits(p)
        counts: Counter = Counter()
        if p.source != "testbed":  # train on the source's prompts; evaluate on the testbed's
            external, counts = external_splits(p, limits, measure)
            splits.update({name: datasets.Dataset.from_list(rows, features=PROMPT_FEATURES)
                           for name, rows in external.items()})
        benchmarks = load_benchmarks(self.eval_cfg)
        splits.update({name: datasets.Dataset.from_list(rows, features=PROMPT_FEATURES)
                       for name, rows in benchmarks.splits.items()})
        counts.update(benchmarks.counts)
        for name in list(splits):
            if p.source != "testbed" and name in p.sizes:
                continue  # already measured
            kept, dropped = fitting_prompts([row_prompt(r) for r in splits[name]], limits, measure)
            if dropped:
                splits[name] = splits[name].select(kept)
                counts.update({f"{name}_{k}": v for k, v in dropped.items()})
        return splits, gen_cfg, counts, benchmarks.records

    def _prompt_splits(self, built):
        from mtjax.testbed.prompts import load_prompt_splits, save_prompt_splits

        if not self.rd.done(layout.PROMPTS):
            splits, gen_cfg, counts, records = built or self._build_prompt_splits(self.specs)  # a redo
            with self.phase(layout.PROMPTS) as summary:
                for name, rows in records.items():  # what the benchmarks judge against (references, pairs)
                    self.rd.write_jsonl(layout.benchmark_records(name), rows)
                if is_primary():  # the others built the same splits; they read process 0's files
                    save_prompt_splits(splits, self.rd.file(layout.PROMPTS_FOLDER), gen_cfg)
                barrier("mtjax-prompts")
                self.rd.record_artifact(layout.PROMPTS_FOLDER)
                summary.update({layout.prompts_count(k): len(v) for k, v in splits.items()})
                summary.update(counts)
        return load_prompt_splits(self.rd.file(layout.PROMPTS_FOLDER))

    def prompt_ids(self, split: str) -> list[list[int]]:
        from mtjax.prompt_sets import row_prompt

        if split not in self._prompt_ids:
            self._prompt_ids[split] = [data.chat_prompt_ids(self.models.tokenizer, row_prompt(row))
                                       for row in self.splits[split]]
        return self._prompt_ids[split]

    def prompts(self, split: str) -> list:
        """The split's prompts (strings, or chat turns), in order."""
        from mtjax.prompt_sets import row_prompt

        return [row_prompt(row) for row in self.splits[split]]
