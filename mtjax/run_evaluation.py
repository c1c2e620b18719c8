"""Reading a run's models back and evaluating them: the per-iteration evaluation (`eval.benchmarks`, with the
pair counts of the iteration's phases), the fixed judge r0, the reward scorer, and (π_t, r_t) of any finished
iteration (`params_at`, also used by `mtjax.export`).

`Evaluation` is a part of `em.MutualTaught`: it uses the run's `cfg`, `mt`, `eval_cfg`, `task`, `models`,
`sampling`, `mesh`, `rd`, `iterations`, `phase` and `log`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mtjax import layout


class Evaluation:
    """The evaluation phases and parameter access of a run."""

    @property
    def scorer(self):
        from mtjax.scoring import RewardScorer

        if not hasattr(self, "_scorer"):
            self._scorer = RewardScorer(self.models, self.sampling, self.mesh)
        return self._scorer

    def evaluate(self, t: int, policy_params: Any, rm_params: Any) -> dict:
        """π_t and r_t on `eval.benchmarks` (see `mtjax.iteration_eval`): the task's held-out split ('testbed',
        `mtjax.tasks`) and/or the paper's benchmarks.

        Writes `layout.eval_results` (flat) and `layout.eval_metrics` (the report's nested names)."""
        from mtjax.iteration_eval import evaluate_benchmarks

        phase = layout.eval_phase(t)
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                metrics: dict[str, Any] = {}
                result: dict[str, Any] = {"iteration": t}
                if "testbed" in self.eval_cfg.benchmarks:
                    metrics, flat = self.task.evaluate_heldout(self, phase, policy_params, rm_params)
                    result.update(flat)
                benchmarks = evaluate_benchmarks(self, t, phase, policy_params, rm_params, self.judge_params)
                metrics.update(benchmarks)
                result.update({f"{name}_{k}": v for name, values in benchmarks.items() for k, v in values.items()})
                metrics[layout.PAIR_METRICS] = self._pair_counts(t)
                self.rd.write_json(layout.eval_metrics(t), {"iteration": t, "metrics": metrics})
                self.log(phase)(metrics)  # the same names in metrics.jsonl and the tracking sinks
                self.rd.write_json(layout.eval_results(t), result)
                summary.update(result)
        return self.rd.summary(phase)

    @property
    def judge_params(self) -> Any:
        """The fixed judge of the proxy win rates: r0 (the base RM, or the RM source when it is already
        trained), the same for every iteration and arm."""
        if not hasattr(self, "_judge"):
            self._judge = self.params_at(0)[1]
        return self._judge

    def _pair_counts(self, t: int) -> dict[str, int]:
        """How many pairs each training phase of iteration t used (and dropped), from its summary."""
        built, trained, L = layout.PAIRS_BUILT, layout.PAIRS_TRAINED, layout
        counts = {}
        if t == 0 and self.rd.done(L.BASE_RM):
            summary = self.rd.summary(L.BASE_RM)
            counts.update({L.PAIR_BASE_RM_GOLD: summary.get(built, 0), L.PAIR_BASE_RM_TRAINED: summary.get(trained, 0)})
        if t >= 1 and self.rd.done(L.e_step(t)):
            summary = self.rd.summary(L.e_step(t))
            counts.update({L.PAIR_POLICY: summary.get(built, 0), L.PAIR_POLICY_TRAINED: summary.get(trained, 0),
                           L.PAIR_POLICY_SKIPPED: sum(v for k, v in summary.items() if k.startswith(L.SKIPPED_PREFIX))})
        if t >= 1 and self.rd.done(L.m_step(t)):
            summary = self.rd.summary(L.m_step(t))
            counts.update({L.PAIR_RM_CONTRASTIVE: summary.get(L.kind_count(L.CONTRASTIVE_PAIRS, built), 0),
                           L.PAIR_RM_SELF_TRAINING: summary.get(L.kind_count(L.SELF_PAIRS, built), 0),
                           L.PAIR_RM_TRAINED: summary.get(trained, 0)})
            if self.mt.rm_update == "ser":
                last = L.ser_round_kind(self.mt.ser_rounds)
                counts[L.PAIR_RM_SELF_LABELLED] = summary.get(L.kind_count(last, built), 0)
        return counts

    def text_score_fn(self, rm_params: Any, known: Mapping[tuple[str, str], tuple[list[int], list[int]]]
                      ) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
        """A texts-in scorer for the evaluators; (prompt, response) pairs found in `known` are scored on
        their sampled token ids, others are tokenised (see `mtjax.scoring.RewardScorer.score_texts`)."""
        return self.scorer.text_score_fn(rm_params, known)

    def params_at(self, t: int) -> tuple[Any, Any]:
        """(π_t, r_t) from the run directory; r_t is the latest RM at or before t (frozen runs keep r0)."""
        if t < 0 or t > self.iterations[-1]:
            raise ValueError(f"iteration {t} is outside 0..{self.iterations[-1]} of this run")
        finished = ", ".join(self.rd.completed()) or "none"
        if t > 0 and not self.rd.done(layout.e_step(t)):
            raise ValueError(f"iteration {t} has no policy yet in {self.rd.path} (finished phases: {finished})")
        if t == 0 and self.cfg.base_rm.enabled and not self.rd.done(layout.BASE_RM):
            raise ValueError(f"the base reward model r0 is not trained yet in {self.rd.path} (finished phases: "
                             f"{finished})")
        if t > 0 and self.mt.trains_rm and not self.rd.done(layout.m_step(t)):
            raise ValueError(f"iteration {t} has no reward model yet in {self.rd.path} (finished phases: {finished})")
        policy = self.models.policy_params if t == 0 else self.rd.load_params(layout.policy_checkpoint(t),
                                                                               like=self.models.policy_params)
        like = self.models.reward_init_params
        for s in range(t, 0, -1):
            if self.rd.done(layout.m_step(s)):
                return policy, self.rd.load_params(layout.reward_model_checkpoint(s), like=like)
        if self.rd.done(layout.BASE_RM):
            return policy, self.rd.load_params(layout.BASE_RM_MODEL, like=like)
        return policy, like

    def phase_seconds(self) -> dict[str, float]:
        """Wall time of each finished phase (as first run; a resumed phase keeps its original time)."""
        return {phase: self.rd.summary(phase).get("wall_seconds", float("nan")) for phase in self.rd.completed()}
