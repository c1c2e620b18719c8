"""The phases of a Mutual-Taught run as the run directory sees them (`mtjax.rundir`): which config
sections each phase's outputs depend on, and which earlier phases each one reads.

Phase names (`mtjax.em`): prompts, base_rm, iter_0/eval, then iter_t/e_step, iter_t/m_step, iter_t/eval
and iter_t/gate for t = 1 .. T.

    independent_of(phase)           config sections whose change leaves the phase's outputs valid (every
                                    other section counts as used, sections added later included)
    training_section(phase)         the section of the training a phase runs (dpo, rm, base_rm) or None
    depends_on(later, earlier, g)   whether `later` reads what `earlier` wrote, directly or through the
                                    models and samples the loop passes on
"""

from __future__ import annotations

_STEP_ORDER = ("e_step", "m_step", "eval", "gate")


def iteration_and_kind(phase: str) -> tuple[int, str]:
    """"iter_2/e_step" -> (2, "e_step"); "base_rm" -> (-1, "base_rm")."""
    if not phase.startswith("iter_"):
        return -1, phase
    iteration, kind = phase.split("/", 1)
    return int(iteration.removeprefix("iter_")), kind


def independent_of(phase: str) -> tuple[str, ...]:
    t, kind = iteration_and_kind(phase)
    if kind == "prompts":  # the prompt splits and benchmark files: measured with the models' tokenizers
        return "base_rm", "dpo", "rm", "mt"  # against the response budget (sampling, eval)
    if kind == "base_rm":  # π0's samples and r0's training
        return "eval", "dpo", "rm", "mt"
    if t == 0:  # iter_0/eval: π0 and r0
        return "dpo", "rm", "mt"
    return ("rm",) if kind == "e_step" else ()


def training_section(phase: str) -> str | None:
    return {"base_rm": "base_rm", "e_step": "dpo", "m_step": "rm"}.get(iteration_and_kind(phase)[1])


def depends_on(later: str, earlier: str, gated: bool) -> bool:
    """`gated`: the checkpoint gate is on, so evaluations decide which policy the next iteration starts from."""
    if later == earlier or later == "prompts":
        return False
    if earlier in ("prompts", "base_rm"):
        return True
    if later == "base_rm":
        return False
    (t, kind), (s, earlier_kind) = iteration_and_kind(later), iteration_and_kind(earlier)
    if s == 0:  # iter_0/eval: every evaluation scores π0's samples too, and a gate may compare with them
        return kind in ("eval", "gate") or (gated and t > 0)
    if s == t:
        return _STEP_ORDER.index(earlier_kind) < _STEP_ORDER.index(kind)
    return s < t and (earlier_kind != "eval" or gated)
