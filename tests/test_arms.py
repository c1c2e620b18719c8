"""The named arms (`mtjax.arms`): every arm of every preset validates, the paper's baselines get their settings,
and the SPPO, SER and Self-Rewarding arms run through the driver on the `tiny` preset."""

import math
import re
import sys
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_config

from mtjax import arms, data, em, em_phases, settings
from mtjax.em import MutualTaught, Sample

sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
import mt  # noqa: E402


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("preset", mt.PRESETS)
def test_every_arm_of_every_preset_validates_or_says_why_not(preset):
    for name in arms.ARMS:
        cfg = mt.get_config(f"{preset},{name}")
        assert cfg.arm == name
        if preset == "synthetic" and name in ("self_rewarding", "meta_rewarding"):
            with pytest.raises(ValueError, match=r"mt\.policy_rewards='judge_policy'.*rubric"):
                settings.validate_config(cfg)
        else:
            settings.validate_config(cfg)


def test_the_meta_judge_needs_the_policy_as_judge_and_a_pairwise_loss():
    cfg = mt.get_config("tiny,meta_rewarding")
    assert (cfg.mt.policy_rewards, cfg.mt.meta_judge, cfg.mt.rm_update) == ("judge_policy", True, "frozen")
    for key, value, problem in (("mt.policy_rewards", "judge_base", "meta_judge=True needs the policy as its own "
                                                                    "judge: policy_rewards='judge_policy'"),
                                ("dpo.loss_type", "sppo", "mt.meta_judge=True with dpo.loss_type='sppo'")):
        cfg = mt.get_config("tiny,meta_rewarding")
        section, field = key.split(".")
        cfg[section][field] = value
        with pytest.raises(ValueError, match=re.escape(problem)):
            settings.validate_config(cfg)


def test_the_papers_baselines_get_their_settings():
    base = mt.get_config("paper")
    it = mt.get_config("paper,iterative_dpo")
    assert base.dpo.learning_rate == pytest.approx(7e-7) and it.dpo.learning_rate == pytest.approx(5e-7)
    assert it.mt.rm_update == "frozen" and it.mt.policy_prompts == "all_portions"
    # three iterations over the three portions (D_1, D_2, D_R) where Mutual-Taught makes two
    assert list(settings.build(settings.MTConfig, it.mt).iterations(it.iterations)) == [1, 2, 3]
    assert list(settings.build(settings.MTConfig, base.mt).iterations(base.iterations)) == [1, 2]
    sppo = mt.get_config("paper,sppo")
    assert (sppo.dpo.loss_type, sppo.mt.policy_pairs, sppo.mt.rm_update) == ("sppo", "best_worst", "frozen")
    assert mt.get_config("paper,offline_simpo").dpo.loss_type == "simpo"
    assert mt.get_config("tiny").arm == "mutual" == mt.get_config("tiny,").arm
    with pytest.raises(ValueError, match="unknown arm 'dpo'; available: mutual, iterative_dpo"):
        mt.get_config("tiny,dpo")
    cfg = mt.get_config("tiny")
    cfg.arm = "nope"
    with pytest.raises(ValueError, match="arm='nope' must be one of"):
        settings.validate_config(cfg)


def test_settings_added_later_at_their_defaults_are_not_config_changes(tmp_path):
    """A run directory written before the arms existed (no `arm`, no SER/judge keys) resumes with the same
    settings; a new setting away from its default is a change, the arm's name alone is not."""
    from mtjax.rundir import ConfigMismatchError, RunDir

    old = mt.get_config("tiny").to_dict()
    del old["arm"]
    for key in ("policy_rewards", "policy_pairs", "judge_samples", "judge_max_new_tokens", "ser_threshold",
                "ser_rounds"):
        del old["mt"][key]
    rd = RunDir(tmp_path, old)
    rd.start_phase("prompts")
    rd.mark_done("prompts")
    RunDir(tmp_path, mt.get_config("tiny").to_dict())  # the same settings: accepted
    renamed = mt.get_config("tiny")
    renamed.arm = "frozen"  # a name alone changes nothing that runs
    RunDir(tmp_path, renamed.to_dict())
    with pytest.raises(ConfigMismatchError, match=r"mt\.rm_update: 'mutual' -> 'ser'"):
        RunDir(tmp_path, mt.get_config("tiny,ser").to_dict())


def test_best_worst_pairs_carry_sppos_win_probabilities():
    """The highest- against the lowest-reward sample; each carries P̂(y ≻ π) = mean_j σ(r_y − r_j) over all of the
    prompt's scored samples (SPPO's estimate: duplicates count, the sample itself counts ½); a sample the judge
    left without a reward enters neither the pair nor the estimate (counted)."""
    a, b, c = Sample((5, 2), True), Sample((7,), True), Sample((9, 9, 9), True)
    samples = [[a, b, a, c], [a, b, c, b]]
    rewards = [[1.5, -1.0, 1.5, 2.0], [1.0, math.nan, -0.5, math.nan]]
    pairs = em.policy_pairs([[1], [2]], samples, rewards, drop_truncated=False, rule="best_worst", win_probs=True)

    def win_prob(r, rs):
        return np.mean([1 / (1 + math.exp(-(r - x))) for x in rs])

    assert pairs.chosen == [[9, 9, 9], [5, 2]] and pairs.rejected == [[7], [9, 9, 9]]
    np.testing.assert_allclose(pairs.values["chosen_win_prob"],
                               [win_prob(2.0, rewards[0]), win_prob(1.0, [1.0, -0.5])], rtol=1e-6)
    np.testing.assert_allclose(pairs.values["rejected_win_prob"],
                               [win_prob(-1.0, rewards[0]), win_prob(-0.5, [1.0, -0.5])], rtol=1e-6)
    assert pairs.counts["duplicate_responses"] == 2 and pairs.counts["unscored_responses"] == 1
    # the paper's rule on the same samples picks the shortest above-average response
    lc = em.policy_pairs([[1], [2]], samples, rewards, drop_truncated=False)
    assert lc.chosen[0] == [5, 2] and not lc.values
    assert data.select_best_worst_pair([1.0, 1.0]) == data.SKIP_ALL_TIED


def sppo_ser_config():
    """One iteration of SPPO in the E-step and SER (2 rounds, every pair kept) in the M-step."""
    cfg = tiny_config(rm_update="ser", ser_rounds=2, ser_threshold=0.5, policy_pairs="best_worst")
    cfg.dpo.loss_type = "sppo"
    cfg.iterations = 1
    cfg.prompts.policy = (6,)
    return cfg


@pytest.fixture(scope="module")
def sppo_ser_run(tmp_path_factory):
    run = MutualTaught(sppo_ser_config(), str(tmp_path_factory.mktemp("sppo_ser")))
    run.run()
    return run


def test_sppo_e_step_trains_on_win_probabilities_of_the_stored_rewards(sppo_ser_run):
    run = sppo_ser_run
    rows = run.sample_rows("iter_1/e_step/samples.jsonl", "policy_1")
    pairs = run.rd.read_jsonl("iter_1/e_step/pairs.jsonl")
    summary = run.rd.summary("iter_1/e_step")
    assert pairs and summary["trained_pairs"] == len(pairs) and summary["train_loss"] > 0
    by_prompt = {tuple(p): group for p, group in zip(run.prompt_ids("policy_1"), rows, strict=True)}
    for pair in pairs:
        group = by_prompt[tuple(pair["prompt_ids"])]
        rewards = [r["reward"] for r in group]
        reward_of = {tuple(r["response_ids"]): r["reward"] for r in group}
        assert reward_of[tuple(pair["chosen_ids"])] == max(rewards)
        assert reward_of[tuple(pair["rejected_ids"])] == min(rewards)
        for side in ("chosen", "rejected"):
            r = reward_of[tuple(pair[f"{side}_ids"])]
            expected = np.mean([1 / (1 + math.exp(-(r - x))) for x in rewards])
            assert pair[f"{side}_win_prob"] == pytest.approx(expected, rel=1e-5)


def test_ser_m_step_labels_its_own_pairs_for_each_round(sppo_ser_run):
    run = sppo_ser_run
    summary = run.rd.summary("iter_1/m_step")
    groups = run.sample_rows("iter_1/m_step/new_policy_samples.jsonl", "reward_model")
    distinct = sum(math.comb(len({tuple(r["response_ids"]) for r in g}), 2) for g in groups)
    assert summary["ser_candidate_pairs"] == distinct > 0
    # threshold ½ keeps every pair whose rewards differ; round 1 labels by r0's stored rewards
    reward_of = {(tuple(p), tuple(r["response_ids"])): r["reward"]
                 for p, g in zip(run.prompt_ids("reward_model"), groups, strict=True) for r in g}
    round_1 = run.rd.read_jsonl("iter_1/m_step/round_1_pairs.jsonl")
    assert len(round_1) == summary["ser_round_1_pairs"] == summary["ser_round_1_trained_pairs"]
    for pair in round_1:
        p = tuple(pair["prompt_ids"])
        assert reward_of[(p, tuple(pair["chosen_ids"]))] >= reward_of[(p, tuple(pair["rejected_ids"]))]
    assert summary["ser_round_2_pairs"] == len(run.rd.read_jsonl("iter_1/m_step/round_2_pairs.jsonl")) > 0
    assert summary["trained_pairs"] == summary["ser_round_2_trained_pairs"]
    r1 = run.params_at(1)[1]
    assert_trees_equal(r1, run.rd.load_params("iter_1/m_step/round_2/reward_model"))
    assert not run.rd.file("iter_1/m_step/round_1/train_state").exists()
    eval_pairs = run.rd.read_json("eval/iter_1.json")["metrics"]["pairs"]
    assert eval_pairs["rm_self_labelled"] == summary["ser_round_2_pairs"]


def test_an_interrupted_ser_round_resumes_after_the_last_finished_round(sppo_ser_run, tmp_path, monkeypatch):
    cfg = sppo_ser_config()
    em.share_base_phases(str(sppo_ser_run.rd.path), cfg, str(tmp_path))
    calls = Counter()
    train = em.train_reward_model

    def stop_in_round_2(*args, **kwargs):
        calls["rm"] += 1
        if calls["rm"] == 2:
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(em_phases, "train_reward_model", stop_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        MutualTaught(cfg, str(tmp_path)).run()
    assert calls["rm"] == 2
    run = MutualTaught(cfg, str(tmp_path))
    run.run()
    assert calls["rm"] == 3  # round 1 was not trained again
    assert_trees_equal(run.params_at(1)[1], sppo_ser_run.params_at(1)[1])
    assert run.rd.summary("iter_1/m_step")["ser_round_1_pairs"] == \
        sppo_ser_run.rd.summary("iter_1/m_step")["ser_round_1_pairs"]


JUDGED = {"policy_rewards": "judge_policy", "policy_pairs": "best_worst", "judge_samples": 2, "judge_max_new_tokens": 6}


@pytest.fixture(scope="module")
def meta_rewarding_run(sppo_ser_run, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("meta_rewarding")
    cfg = tiny_config(rm_update="frozen", policy_prompts="all_portions", **JUDGED, meta_judge=True)
    cfg.arm = "meta_rewarding"
    cfg.iterations = 1
    cfg.prompts.policy = (6,)
    assert em.share_base_phases(str(sppo_ser_run.rd.path), cfg, str(tmp_path)) == \
        ["prompts", "base_rm", "iter_0/eval"]
    run = MutualTaught(cfg, str(tmp_path))
    run.run()
    return run


def test_meta_rewarding_judges_and_meta_judges_with_the_policy_and_counts_what_it_cannot_parse(meta_rewarding_run):
    """The policy judges its own samples with the rubric, then compares its judgments of one response per prompt
    as meta-judge (both positions); a random tiny model writes no parseable score or verdict, so every response
    is left unjudged, every meta-judgment unparsed, and no pair of either kind is built (nothing guessed).
    Iteration 2 of the all-portions schedule samples the reward model's prompts."""
    run = meta_rewarding_run
    assert [p for p in run.rd.completed() if p.endswith("e_step")] == ["iter_1/e_step", "iter_2/e_step"]
    for t, split in ((1, "policy_1"), (2, "reward_model")):
        samples = run.rd.read_jsonl(f"iter_{t}/e_step/samples.jsonl")
        assert {r["prompt_id"] for r in samples} == set(run.splits[split]["prompt_id"])
        assert all(r["reward"] is None for r in samples)  # the reward model scored nothing
        judgments = run.rd.read_jsonl(f"iter_{t}/e_step/judgments.jsonl")
        assert [(j["prompt_id"], j["sample"]) for j in judgments] == [(r["prompt_id"], r["sample"]) for r in samples]
        assert all(len(j["judgments"]) == 2 and math.isnan(j["reward"]) for j in judgments)
        summary = run.rd.summary(f"iter_{t}/e_step")
        assert summary["judgments"] == summary["judgments_unparsed"] == 2 * len(samples)
        assert summary["responses_unjudged"] == len(samples)
        assert summary["skipped_fewer_than_two_responses"] == len(run.splits[split])
        # the meta-judge: one response per prompt with two different judgments, compared as (A, B) and (B, A)
        meta = run.rd.read_jsonl(f"iter_{t}/e_step/meta_judgments.jsonl")
        disputed = {j["prompt_id"] for j in judgments if len(set(j["judgments"])) == 2}
        assert {m["prompt_id"] for m in meta} == disputed and len(meta) == len(disputed) > 0
        by_key = {(j["prompt_id"], j["sample"]): j for j in judgments}
        assert all(len(set(by_key[(m["prompt_id"], m["sample"])]["judgments"])) == 2 for m in meta)
        assert all(m["battles"] == [[0, 1], [1, 0]] and len(m["verdicts"]) == 2 for m in meta)
        assert summary["meta_judgments"] == summary["meta_judgments_unparsed"] == 2 * len(meta)
        assert summary["meta_skipped_tied_judgments"] == len(meta)
        assert summary.get("meta_prompts_without_disputed_judgments", 0) == len(run.splits[split]) - len(meta)
        assert summary["judge_pairs"] == summary["pairs"] == 0
        assert run.rd.read_jsonl(f"iter_{t}/e_step/judge_pairs.jsonl") == []
    assert "iter_1/m_step" not in run.rd.completed()


def test_a_judge_model_of_its_own_judges_the_policys_samples(meta_rewarding_run, sppo_ser_run, tmp_path):
    """`mt.policy_rewards=judge_model` loads `mt.judge_model` as a causal LM of its own and samples the judgments
    with it. A `tiny` judge has π0's weights (the same seed), so at iteration 1, where the meta-rewarding run's
    judge is π0 too, the samples and every judgment are the same, to the token."""
    cfg = tiny_config(rm_update="frozen", **{**JUDGED, "policy_rewards": "judge_model"}, judge_model="tiny")
    cfg.iterations = 1
    cfg.prompts.policy = (6,)
    em.share_base_phases(str(sppo_ser_run.rd.path), cfg, str(tmp_path))
    run = MutualTaught(cfg, str(tmp_path))
    assert run.models.judge is not None and run.models.judge.tokenizer is not None
    assert_trees_equal(run.models.judge.policy_params, run.models.policy_params)
    run.run()
    for name in ("samples", "judgments"):
        assert run.rd.read_jsonl(f"iter_1/e_step/{name}.jsonl") == \
            meta_rewarding_run.rd.read_jsonl(f"iter_1/e_step/{name}.jsonl")
    assert run.rd.summary("iter_1/e_step")["judgments_unparsed"] == 2 * 6 * run.sampling.num_samples
    with pytest.raises(ValueError, match="judge_model='tiny' goes with policy_rewards='judge_model'"):
        settings.validate_config(tiny_config(judge_model="tiny"))


@pytest.mark.parametrize(("meta", "context", "who"), [(False, 400, "judge"), (True, 700, "meta-judge")])
def test_the_judge_must_fit_the_policys_context(tmp_path, meta, context, who):
    cfg = tiny_config(policy_rewards="judge_policy", meta_judge=meta)
    cfg.policy.max_position_embeddings = context
    cfg.reward_model.max_position_embeddings = context
    with pytest.raises(ValueError, match=rf"the {who}'s rubric \(\d+ tokens\).*exceeds the policy's context"):
        MutualTaught(cfg, str(tmp_path))
    assert not any(tmp_path.iterdir())
