"""The phases of a Mutual-Taught run as the run directory sees them (`mtjax.rundir`): which config
sections each phase's outputs depend on, and which earlier phases each one reads.

Phase names (`mtjax.layout`): prompts, sft (optional), base_rm, iter_0/eval, then iter_t/e_step,
iter_t/m_step, iter_t/eval and iter_t/gate for t = 1 .. T.

    independent_of(phase)           config sections (or single settings) whose change leaves the phase's
                                    outputs valid (every other section counts as used, sections added later
                                    included)
    training_section(phase)         the section of the training a phase runs (sft, dpo, rm, base_rm) or None
    depends_on(later, earlier, g)   whether `later` reads what `earlier` wrote, directly or through the
                                    models and samples the loop passes on
"""

from __future__ import annotations

from mtjax.layout import BASE_PHASES as _BASE_PHASES  # every later phase reads the prompts, π0 and r0
from mtjax.layout import BASE_RM, E_STEP, EVAL, GATE, M_STEP, PROMPTS, SFT, iteration_and_kind
from mtjax.layout import STEPS as _STEP_ORDER

__all__ = ["depends_on", "independent_of", "iteration_and_kind", "training_section"]


def independent_of(phase: str) -> tuple[str, ...]:
    t, kind = iteration_and_kind(phase)
    if kind == PROMPTS:  # the prompt splits and benchmark files: measured with the models' tokenizers
        # against the response budget (sampling, eval); drawn from prompts.seed, not the run's seed
        return "arm", "base_rm", "dpo", "mt", "reward_model.head_seed", "rm", "seed", "sft"
    if kind == SFT:  # π0 from the task's demonstrations: its own seed (sft.seed), no sampling, no RM
        return "arm", "base_rm", "dpo", "eval", "iterations", "mt", "reward_model", "rm", "sampling", "seed"
    if kind == BASE_RM:  # π0's samples and r0's training
        return "arm", "eval", "dpo", "rm", "mt"
    if t == 0:  # iter_0/eval: π0 and r0
        return "arm", "dpo", "rm", "mt"
    return ("rm",) if kind == E_STEP else ()


def training_section(phase: str) -> str | None:
    return {SFT: "sft", BASE_RM: "base_rm", E_STEP: "dpo", M_STEP: "rm"}.get(iteration_and_kind(phase)[1])


def depends_on(later: str, earlier: str, gated: bool) -> bool:
    """`gated`: the checkpoint gate is on, so evaluations decide which policy the next iteration starts from."""
    if later == earlier or later == PROMPTS:
        return False
    if later in _BASE_PHASES:  # each base phase reads the ones before it
        return earlier in _BASE_PHASES and _BASE_PHASES.index(earlier) < _BASE_PHASES.index(later)
    if earlier in _BASE_PHASES:
        return True
    (t, kind), (s, earlier_kind) = iteration_and_kind(later), iteration_and_kind(earlier)
    if s == 0:  # iter_0/eval: every evaluation scores π0's samples too, and a gate may compare with them
        return kind in (EVAL, GATE) or (gated and t > 0)
    if s == t:
        return _STEP_ORDER.index(earlier_kind) < _STEP_ORDER.index(kind)
    return s < t and (earlier_kind != EVAL or gated)
