"""The bodies of the Mutual-Taught phases (see `mtjax.em` for the order): π0 (`sft`), r0 (`base_rm`), the
E-step, the M-step (contrastive + self pairs, its controls, or SER rounds) and the checkpoint gate. Each runs
inside `MutualTaught.phase`, writes its artifacts where `mtjax.layout` says, and is skipped once done.

`PhaseBodies` is a part of `em.MutualTaught`: it uses the run's `cfg`, `mt`, `sft`, `sampling`, `task`, `specs`,
`models`, `mesh`, `rd`, `splits`, `phase`, `seed`, `log`, `train_checkpoint`, `scorer` and the stored samples."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import numpy as np

from mtjax import data, layout, settings
from mtjax.pairs import (
    PairSet,
    contrastive_pairs,
    length_controlled_pairs,
    length_summary,
    oriented_pairs,
    pairable,
    policy_pairs,
)
from mtjax.stored_samples import response_text
from mtjax.training_loops import train_dpo, train_reward_model, train_sft


class PhaseBodies:
    """π0, r0, the E-step, the M-step and the gate."""

    def base_policy(self) -> Any:
        """π0: the policy source's weights, or with `sft.enabled` those trained on the task's demonstrations of
        the `sft` split (the `sft` phase; its seed is `sft.seed`, so every arm and seed of a study shares it).
        The reward model then starts from π0's backbone (`sft.reward_model_from_policy`)."""
        from mtjax.synthetic import DemonstratorConfig

        phase = layout.SFT
        if not self.sft.enabled:
            return self.models.policy_params
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                rows = self.task.demonstrations(self.prompts(phase), self.sft.demonstrations_per_prompt,
                                                self.sft.seed, settings.build(DemonstratorConfig, self.cfg.sft))
                self.rd.write_jsonl(layout.demonstrations_file(), [{"prompt": p, "response": r} for p, r in rows])
                params, stats = train_sft(self.models, self._initial_policy(self.sft.seed), rows, self.cfg.sft,
                                          self.mesh, self.sft.seed, self.log(phase), self.train_checkpoint(phase))
                self.rd.save_params(layout.SFT_POLICY, params)
                summary.update({"demonstrations": len(rows), **stats})
        self._start_from(self.rd.load_params(layout.SFT_POLICY, like=self.models.policy_params))
        return self.models.policy_params

    def _initial_policy(self, seed: int) -> Any:
        """The policy source's weights; those of a random source (`tiny`, `synthetic`) drawn from `seed`."""
        from mtjax.sharding import shard_params
        from mtjax.sources import RANDOM_SOURCES, load

        spec = self.specs["policy"]
        if spec.source.source not in RANDOM_SOURCES:
            return self.models.policy_params
        _, params = load(spec, "causal_lm", seed, self.mesh)
        return params if self.mesh is None else shard_params(params, self.mesh)

    def _start_from(self, policy_params: Any) -> None:
        """Makes `policy_params` π0 and, with `sft.reward_model_from_policy`, the RM's starting point its backbone
        with a fresh score head from `reward_model.head_seed`."""
        import jax.numpy as jnp

        from mtjax.models.hf import init_score_head
        from mtjax.sharding import shard_params
        from mtjax.sources import ModelSource

        reward = self.models.reward_init_params
        if self.sft.reward_model_from_policy:
            head = init_score_head(self.models.reward.cfg, settings.build(ModelSource, self.cfg.reward_model).head_seed)
            reward = {**reward, "model": policy_params["model"], "score": {"kernel": jnp.asarray(head)}}
            reward = reward if self.mesh is None else shard_params(reward, self.mesh)
        self.models = dataclasses.replace(self.models, policy_params=policy_params, reward_init_params=reward)

    def base_reward_model(self) -> Any:
        """r0: the RM trained from its initial weights on gold-labelled pairs of π0's samples: every untied
        pair of a label prompt's samples, or `base_rm.pairs_per_prompt` random ones (the "human" budget)."""
        from mtjax.gold_pairs import pairs_per_prompt, untied_pairs

        phase = layout.BASE_RM
        if not self.cfg.base_rm.enabled:  # the RM source is already a trained reward model
            return self.models.reward_init_params
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                split = "base_rm_labels"
                self.samples(phase, layout.SAMPLES, self.models.policy_params, split, self.sampling.num_samples)
                rows = self.sample_rows(layout.samples_file(phase, layout.SAMPLES), split)
                texts = [[r["text"] for r in group] for group in rows]
                rewards = self.task.gold_rewards(list(self.splits[split]), texts)
                budget = settings.build(settings.BaseRMPhase, self.cfg.base_rm).pairs_per_prompt
                untied, tied = untied_pairs(rewards, texts)
                labelled = pairs_per_prompt(rewards, texts, budget, self.seed(phase, layout.BASE_RM_LABELS_SEED))
                by_text, prompt_texts = self.ids_by_text(split, rows), self.splits[split]["prompt"]
                pairs = PairSet([], [], [], Counter())
                for p, hi, lo in labelled:
                    p_ids, chosen = by_text[(prompt_texts[p], texts[p][hi])]
                    _, rejected = by_text[(prompt_texts[p], texts[p][lo])]
                    pairs.prompts.append(p_ids)
                    pairs.chosen.append(list(chosen))
                    pairs.rejected.append(list(rejected))
                pairs.counts.update({layout.PAIRS_BUILT: len(pairs)}, tied_pairs_skipped=tied,
                                    prompts_without_pair=len(rows) - len({p for p, _, _ in untied}))
                if budget:
                    pairs.counts["untied_pairs_not_labelled"] = len(untied) - len(pairs)
                self.rd.write_jsonl(layout.pairs_file(phase), pairs.rows(layout.GOLD_PAIRS))
                params, stats = train_reward_model(self.models, self.models.reward_init_params, [pairs],
                                                   self.cfg.base_rm, self.mesh, self.seed(phase),
                                                   self.log(phase), self.train_checkpoint(phase), name="base_rm")
                self.rd.save_params(layout.BASE_RM_MODEL, params)
                summary.update({**pairs.counts, **stats})
        return self.rd.load_params(layout.BASE_RM_MODEL, like=self.models.reward_init_params)

    def e_step(self, t: int, policy_params: Any, rm_params: Any) -> Any:
        """π_t: K samples of π_{t-1} on the iteration's prompts scored by r_{t-1} (or judged, `judged_rewards`),
        one pair per prompt by `mt.policy_pairs`, then DPO (or the `dpo` section's objective) from π_{t-1}."""
        phase = layout.e_step(t)
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                split = self.policy_split(t)
                samples, rewards = self.samples(phase, layout.SAMPLES, policy_params, split, self.sampling.num_samples,
                                                rm_params=None if self.mt.judges else rm_params)
                if self.mt.judges:
                    judge = self.llm_judge_params(policy_params)
                    rewards, judged = self.judged_rewards(phase, split, judge)
                    summary.update(judged)
                pairs = policy_pairs(self.prompt_ids(split), samples, rewards, self.mt.drop_truncated,
                                     self.mt.policy_pairs, win_probs=self.cfg.dpo.loss_type == "sppo")
                self.rd.write_jsonl(layout.pairs_file(phase), pairs.rows(layout.POLICY_PAIRS))
                lengths = length_summary(pairs)  # of the policy's responses, not of any judgment
                if self.mt.meta_judge:  # Meta-Rewarding: the judge is trained on the judgments it prefers too
                    judge_pairs, meta = self.meta_judged_pairs(phase, split, judge)
                    self.rd.write_jsonl(layout.pairs_file(phase, layout.JUDGE_PAIRS),
                                        judge_pairs.rows(layout.JUDGE_PAIRS))
                    summary.update(meta)
                    pairs = pairs.extended(judge_pairs)
                new_params, stats = train_dpo(self.models, policy_params, pairs, self.cfg.dpo, self.mesh,
                                              self.seed(phase), self.log(phase),
                                              str(self.rd.file(layout.REFERENCE_CACHE)), self.train_checkpoint(phase))
                self.rd.save_params(layout.policy_checkpoint(t), new_params)
                summary.update({**pairs.counts, **stats, **lengths})
        return self.rd.load_params(layout.policy_checkpoint(t), like=self.models.policy_params)

    def llm_judge_params(self, policy_params: Any) -> Any:
        """The LLM judge's weights (`mt.policy_rewards`): π_{t-1}'s (`policy_params`), π0's, or the judge model's."""
        if self.mt.policy_rewards == "judge_policy":
            return policy_params
        if self.mt.policy_rewards == "judge_base":
            return self.models.policy_params
        return self.models.judge.policy_params

    def m_step(self, t: int, old_policy: Any, new_policy: Any, rm_params: Any, base_rm: Any) -> Any:
        phase = layout.m_step(t)
        cfg = self.mt
        if not cfg.trains_rm:
            return rm_params
        if cfg.rm_update == "ser":
            return self.ser_m_step(t, new_policy, rm_params)
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                split = "reward_model"
                new_samples, new_rewards = self.samples(phase, layout.NEW_POLICY_SAMPLES, new_policy, split,
                                                        self.sampling.num_samples, rm_params=rm_params)
                # The contrastive pair uses one response of π_{t-1} per prompt (its reward feeds the filter).
                old_samples, old_rewards = self.samples(phase, layout.OLD_POLICY_SAMPLES, old_policy, split, 1,
                                                        rm_params=rm_params)
                prompts = self.prompt_ids(split)
                pair_sets: dict[str, PairSet] = {}
                if cfg.rm_update != "contrastive_only":
                    pair_sets[layout.SELF_PAIRS] = length_controlled_pairs(prompts, new_samples, new_rewards,
                                                                           cfg.drop_truncated)
                if cfg.rm_update != "self_only":
                    pair_sets[layout.CONTRASTIVE_PAIRS] = contrastive_pairs(
                        prompts, new_samples, new_rewards, old_samples, old_rewards, cfg.contrastive_filter,
                        cfg.drop_truncated)
                if cfg.rm_update == "oracle":  # the positive control: the same pairs, labelled by gold
                    pair_sets = {kind: self.gold_oriented(split, pairs) for kind, pairs in pair_sets.items()}
                elif cfg.rm_update == "random":  # the negative control: the same pairs, labelled by a coin
                    coin = np.random.default_rng(self.seed(phase, layout.RANDOM_LABELS_SEED))
                    pair_sets = {kind: oriented_pairs(pairs, coin.random(len(pairs)) < 0.5, "random")
                                 for kind, pairs in pair_sets.items()}
                for kind, pairs in pair_sets.items():
                    self.rd.write_jsonl(layout.pairs_file(phase, kind), pairs.rows(kind))
                params, stats = train_reward_model(self.models, base_rm, list(pair_sets.values()), self.cfg.rm,
                                                   self.mesh, self.seed(phase), self.log(phase),
                                                   self.train_checkpoint(phase))
                self.rd.save_params(layout.reward_model_checkpoint(t), params)
                counts = {layout.kind_count(kind, k): v for kind, pairs in pair_sets.items()
                          for k, v in pairs.counts.items()}
                summary.update({**counts, **stats})
        return self.rd.load_params(layout.reward_model_checkpoint(t), like=base_rm)

    def ser_m_step(self, t: int, new_policy: Any, rm_params: Any) -> Any:
        """r_t by Self-Evolved Reward learning: every pair of distinct samples of π_t on D_R, labelled by the RM
        itself (`data.self_labelled_pairs`: its Bradley-Terry confidence, kept at ≥ `mt.ser_threshold`), the RM
        trained on the kept ones from the labelling RM, `mt.ser_rounds` times (round 1 labels with r_{t-1}).
        Each round's RM is saved (`PHASE/round_R/reward_model`), so a rerun continues after the last one."""
        phase, cfg, split = layout.m_step(t), self.mt, "reward_model"
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                samples, rewards = self.samples(phase, layout.NEW_POLICY_SAMPLES, new_policy, split,
                                                self.sampling.num_samples, rm_params=rm_params)
                groups = self.sample_rows(layout.samples_file(phase, layout.NEW_POLICY_SAMPLES), split)
                candidates = []  # (prompt index, sample i, sample j)
                counts: Counter = Counter()
                for p, (per_prompt, per_rewards) in enumerate(zip(samples, rewards, strict=True)):
                    keep = pairable(per_prompt, per_rewards, cfg.drop_truncated, counts)
                    candidates += [(p, i, j) for a, i in enumerate(keep) for j in keep[a + 1:]]
                summary.update({**counts, layout.SER_CANDIDATE_PAIRS: len(candidates)})
                params, prompts = rm_params, self.prompt_ids(split)
                for r in range(1, cfg.ser_rounds + 1):
                    saved, kind = layout.ser_round_reward_model(phase, r), layout.ser_round_kind(r)
                    if r > 1:
                        rewards = self.score_groups(params, split, groups)
                    labels = data.self_labelled_pairs([rewards[p][i] for p, i, _ in candidates],
                                                      [rewards[p][j] for p, _, j in candidates], cfg.ser_threshold)
                    pairs = PairSet([], [], [], Counter())
                    for (p, i, j), keep, swap in zip(candidates, labels.keep, labels.swap, strict=True):
                        if keep:
                            first, second = samples[p][i].ids, samples[p][j].ids
                            pairs.append(prompts[p], *((second, first) if swap else (first, second)))
                    self.rd.write_jsonl(layout.ser_round_pairs_file(phase, r), pairs.rows(kind))
                    kept = labels.confidence[labels.keep]
                    summary.update({layout.kind_count(kind, layout.PAIRS_BUILT): len(pairs),
                                    layout.kind_count(kind, "confidence_mean"):
                                        float(kept.mean()) if kept.size else math.nan})
                    if self.rd.file(saved).exists():  # an earlier attempt at this phase finished the round
                        self.rd.record_artifact(saved, keep_recorded=True)
                    else:
                        checkpoint = self.train_checkpoint(phase, ser_round=r)
                        trained, stats = train_reward_model(self.models, params, [pairs], self.cfg.rm, self.mesh,
                                                            self.seed(phase, layout.ser_round_seed(r)),
                                                            self.log(phase), checkpoint)
                        self.rd.save_params(saved, trained)
                        checkpoint.clear()
                        summary.update({layout.kind_count(kind, k): v for k, v in stats.items()})
                    params = self.rd.load_params(saved, like=rm_params)
                self.rd.save_params(layout.reward_model_checkpoint(t), params)
                last = layout.kind_count(layout.ser_round_kind(cfg.ser_rounds), layout.PAIRS_TRAINED)
                summary[layout.PAIRS_TRAINED] = summary.get(last, 0)
        return self.rd.load_params(layout.reward_model_checkpoint(t), like=rm_params)

    def gold_oriented(self, split: str, pairs: PairSet) -> PairSet:
        """`pairs` (of `split`'s prompts) each oriented by the task's gold reward; gold ties dropped, counted."""
        rows = {tuple(ids): row for ids, row in zip(self.prompt_ids(split), self.splits[split], strict=True)}
        texts = [[response_text(self.models, c), response_text(self.models, r)]
                 for c, r in zip(pairs.chosen, pairs.rejected, strict=True)]
        gold = self.task.gold_rewards([rows[tuple(p)] for p in pairs.prompts], texts)
        keep = [None if math.isnan(a) or math.isnan(b) or a == b else a > b for a, b in gold]
        return oriented_pairs(pairs, keep, layout.GOLD_PAIRS)

    def gate(self, t: int, kept: int, rm_params: Any) -> bool:
        """The checkpoint gate: keep π_t only if r_t prefers its held-out responses to those of the kept
        policy π_kept (same prompts, sample k against sample k; ties count half) at a rate ≥ τ."""
        phase = layout.gate(t)
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                new = self.sample_rows(layout.samples_file(layout.eval_phase(t), layout.SAMPLES), "heldout_eval")
                old = self.sample_rows(layout.samples_file(layout.eval_phase(kept), layout.SAMPLES), "heldout_eval")
                prompts = list(zip(self.prompts("heldout_eval"), self.prompt_ids("heldout_eval"), strict=True))
                pairs = [(p, a["response_ids"], b["response_ids"])
                         for p, na, ob in zip(prompts, new, old, strict=True) for a, b in zip(na, ob, strict=True)]
                scores = self.scorer.score_ids(rm_params, [p[0] for p, _, _ in pairs] * 2,
                                               [p[1] for p, _, _ in pairs] * 2,
                                               [a for _, a, _ in pairs] + [b for _, _, b in pairs])
                r_new, r_old = scores[:len(pairs)], scores[len(pairs):]
                win_rate = float(np.mean((r_new > r_old) + 0.5 * (r_new == r_old)))
                summary.update(win_rate=win_rate, against_iteration=kept, pairs=len(pairs),
                               accepted=win_rate >= self.mt.gate_win_rate)
        return bool(self.rd.summary(phase)["accepted"])
