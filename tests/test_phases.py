"""Which phases a damaged phase takes with it, and which config changes a finished phase allows."""

from mtjax.phases import depends_on, independent_of, training_section

PHASES = ["prompts", "base_rm", "iter_0/eval", "iter_1/e_step", "iter_1/m_step", "iter_1/eval", "iter_1/gate",
          "iter_2/e_step", "iter_2/m_step", "iter_2/eval", "iter_2/gate"]


def dependents(phase: str, gated: bool) -> list[str]:
    return [p for p in PHASES if depends_on(p, phase, gated)]


def test_what_each_phase_takes_with_it():
    assert dependents("prompts", gated=False) == PHASES[1:]
    assert dependents("base_rm", gated=False) == PHASES[2:]
    # An evaluation feeds only later evaluations' base-policy comparison and the gates ...
    assert dependents("iter_0/eval", gated=False) == ["iter_1/eval", "iter_1/gate", "iter_2/eval", "iter_2/gate"]
    assert dependents("iter_1/eval", gated=False) == ["iter_1/gate"]
    # ... unless the gate decides which policy continues: then everything after it.
    assert dependents("iter_1/eval", gated=True) == ["iter_1/gate", *PHASES[7:]]
    assert dependents("iter_1/e_step", gated=False) == ["iter_1/m_step", "iter_1/eval", "iter_1/gate", *PHASES[7:]]
    assert dependents("iter_2/m_step", gated=False) == ["iter_2/eval", "iter_2/gate"]


def test_which_settings_a_finished_phase_leaves_free():
    # tokenizers measure against sampling, eval; the splits come from prompts.seed, not the run's seed
    assert set(independent_of("prompts")) == {
        "arm", "base_rm", "dpo", "rm", "mt", "sft", "seed", "reward_model.head_seed"}
    # π0 from demonstrations: sft.seed and the policy's settings, nothing the loop or the RM sets
    assert {"seed", "sampling", "base_rm", "reward_model", "mt"} <= set(independent_of("sft"))
    assert "policy" not in independent_of("sft") and "prompts" not in independent_of("sft")
    assert "dpo" in independent_of("base_rm") and "sampling" not in independent_of("base_rm")
    assert independent_of("iter_1/e_step") == ("rm",)  # the RM's settings come after the E-step
    assert independent_of("iter_1/m_step") == independent_of("iter_2/eval") == ()
    assert [training_section(p) for p in ("sft", "base_rm", "iter_2/e_step", "iter_1/m_step", "iter_1/eval")] == \
        ["sft", "base_rm", "dpo", "rm", None]


def test_the_sft_phase_comes_before_r0_and_feeds_everything_after_it():
    phases = ["prompts", "sft", *PHASES[1:]]
    assert [p for p in phases if depends_on(p, "sft", False)] == phases[2:]
    assert depends_on("sft", "prompts", False) and not depends_on("sft", "base_rm", False)
    assert depends_on("base_rm", "sft", False) and not depends_on("prompts", "sft", False)
