"""The `synthetic` preset through the EM driver at reduced size: the task interface, the sft phase (and its
resume), r0's gold-labelled budget, the per-iteration evaluation, the oracle and random M-steps, and the
sharing of prompts and π0 across the seeds of a study."""

import dataclasses
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest

from mtjax import em, settings, synthetic
from mtjax.em import MutualTaught
from mtjax.gold_pairs import pairs_per_prompt, untied_pairs
from mtjax.prompt_sets import PromptConfig
from mtjax.rundir import RunDir
from mtjax.tasks import SyntheticTask, TestbedTask, gold_accuracy, gold_summary

sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
import mt  # noqa: E402


def small_config(rm_update: str = "mutual", seed: int = 0):
    """The synthetic preset at a size that runs in seconds: a 1-layer model of width 32, a few prompts."""
    cfg = mt.get_config("synthetic")
    cfg.seed = seed
    cfg.reward_model.head_seed = seed
    cfg.iterations = 1
    for section in (cfg.policy, cfg.reward_model):
        section.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
    cfg.prompts.update(sft=32, base_rm_labels=16, policy=(12,), reward_model=12, heldout_eval=8)
    cfg.sampling.update(batch_size=64)
    cfg.sft.update(batch_size=32, epochs=1)
    for name in ("base_rm", "dpo", "rm"):
        cfg[name].update(batch_size=8, epochs=1)
    cfg.mt.rm_update = rm_update
    return cfg


def gold_of_pair(tokenizer, row) -> tuple[float, float]:
    """The gold rewards of a stored pair's chosen and rejected responses."""
    prompt = tokenizer.decode(row["prompt_ids"], skip_special_tokens=True)
    return tuple(synthetic.gold_reward(prompt, tokenizer.decode(row[k], skip_special_tokens=True))
                 for k in ("chosen_ids", "rejected_ids"))


def replicate_script():
    spec = importlib.util.spec_from_file_location("replicate", Path(__file__).parents[1] / "scripts" / "replicate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def mutual_run(tmp_path_factory):
    run = MutualTaught(small_config(), str(tmp_path_factory.mktemp("synthetic_mutual")))
    return run, run.run()


# --- the task interface --------------------------------------------------------------------------------


def test_synthetic_splits_are_disjoint_seeded_and_sized():
    task = SyntheticTask(synthetic.TaskConfig())
    p = settings.build(PromptConfig, small_config().prompts)
    splits, record = task.prompt_splits(p)
    sizes = {name: len(split) for name, split in splits.items()}
    assert sizes == {"heldout_eval": 8, "base_rm_labels": 16, "reward_model": 12, "policy_1": 12, "sft": 32}
    prompts = [x for split in splits.values() for x in split["prompt"]]
    assert len(set(prompts)) == len(prompts)  # disjoint, and distinct within each split
    for prompt in prompts:
        assert 3 <= len(synthetic.prompt_items(prompt)) <= 5
    again, _ = task.prompt_splits(p)
    assert {k: list(v["prompt"]) for k, v in again.items()} == {k: list(v["prompt"]) for k, v in splits.items()}
    # Each split has its own stream: a larger SFT split leaves the held-out and policy prompts alone.
    bigger, _ = task.prompt_splits(dataclasses.replace(p, sft=64))
    assert list(bigger["heldout_eval"]["prompt"]) == list(splits["heldout_eval"]["prompt"])
    assert list(bigger["policy_1"]["prompt"]) == list(splits["policy_1"]["prompt"])
    assert record.sizes == sizes and record.task["gamma"] == 0.9


def test_gold_rewards_and_demonstrations_come_from_the_task():
    task = SyntheticTask(synthetic.TaskConfig(decoy_cost=0.0))
    rows = [{"prompt": "a b c"}, {"prompt": "d e f"}]
    gold = task.gold_rewards(rows, [["a b c", "c b a !"], ["d", ""]])
    assert gold[0][0] == pytest.approx(1.0) and gold[1][1] == 0.0
    assert gold[0][1] == pytest.approx(synthetic.gold_reward("a b c", "c b a !", synthetic.TaskConfig(decoy_cost=0.0)))
    demos = task.demonstrations(["a b c", "d e f"], 3, seed=1, demonstrator=synthetic.DemonstratorConfig())
    assert demos == synthetic.demonstrations(["a b c", "d e f"], 3, seed=1)
    with pytest.raises(ValueError, match="no demonstrations"):
        TestbedTask().demonstrations(["x"], 1, 0, None)
    # The testbed's gold: the IFEval-style strict checks (1 = every instruction followed).
    row = {"prompt": "Say hi. Your entire response should be in lowercase letters.",
           "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}
    assert TestbedTask().gold_rewards([row], [["hi there", "HI THERE"]]) == [[1.0, 0.0]]


def test_gold_statistics():
    summary = gold_summary([[0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    assert summary["gold_reward"] == pytest.approx(2.0 / 3)  # per-prompt means 0.5, 1, 0.5
    assert summary["gold_reward_se"] == pytest.approx(np.std([0.5, 1.0, 0.5], ddof=1) / np.sqrt(3))
    gold, texts = [[0.1, 0.5, float("nan")], [0.2, 0.2]], [["x", "y", "z"], ["u", "v"]]
    assert untied_pairs(gold, texts) == ([(0, 1, 0)], 3)  # NaN (unscorable) and equal rewards tie
    accuracy = gold_accuracy(gold, texts, [[0.0, 1.0, 5.0], [0.0, 0.0]])
    assert accuracy == {"accuracy": 1.0, "pairs": 1, "tied": 3}
    assert np.isnan(gold_accuracy([[0.2, 0.2]], [["u", "v"]], [[0.0, 1.0]])["accuracy"])
    budget = pairs_per_prompt([[0.1, 0.2, 0.3], [0.3, 0.1, 0.2]], [["a", "b", "c"], ["d", "e", "f"]], 2, seed=0)
    assert len(budget) == 4 and Counter(p for p, _, _ in budget) == {0: 2, 1: 2}
    assert len(pairs_per_prompt([[0.1, 0.2, 0.3]], [["a", "b", "c"]], 0, seed=0)) == 3


# --- the preset through the driver -----------------------------------------------------------------------


def test_the_preset_runs_every_phase_with_the_synthetic_task(mutual_run):
    run, results = mutual_run
    rd = run.rd
    assert rd.completed() == ["prompts", "sft", "base_rm", "iter_0/eval", "iter_1/e_step", "iter_1/m_step",
                              "iter_1/eval"]
    sft = rd.summary("sft")
    assert sft["demonstrations"] == 64 and sft["trained_sequences"] == 64 and sft["steps"] == 2
    # π0 is the SFT output, and the RM started from its backbone (with r0 trained from there).
    pi0, r0 = run.params_at(0)
    assert_trees_equal(pi0, rd.load_params("sft/policy", like=pi0))
    assert_trees_equal(run.models.reward_init_params["model"], pi0["model"])
    initial = run._initial_policy(run.sft.seed)
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), initial, pi0)))
    # r0's budget: one gold-labelled pair per label prompt, oriented by gold.
    base = rd.summary("base_rm")
    pairs = rd.read_jsonl("base_rm/pairs.jsonl")
    assert base["pairs"] == len(pairs) == 16 - base["prompts_without_pair"]
    for row in pairs:
        chosen, rejected = gold_of_pair(run.models.tokenizer, row)
        assert chosen > rejected
    # The evaluation: gold with its per-prompt SE, task features, and the RM accuracies on gold pairs.
    metrics = rd.read_json("eval/iter_1.json")["metrics"]
    for key in ("gold_reward", "gold_reward_se", "coverage", "length_mean_words", "decoy_rate", "length_mean_tokens"):
        assert np.isfinite(metrics["policy"][key]), key
    assert metrics["rm"]["pairs_current_policy"] > 0 and metrics["rm"]["pairs_base_policy"] > 0
    zero = rd.read_json("eval/iter_0.json")["metrics"]["rm"]
    assert zero["accuracy_current_policy"] == zero["r0_accuracy_current_policy"] == zero["accuracy_base_policy"]
    samples = rd.read_jsonl("iter_1/eval/samples.jsonl")
    texts = [[r["text"] for r in samples[i:i + 4]] for i in range(0, len(samples), 4)]
    prompts = list(run.splits["heldout_eval"]["prompt"])
    gold = [[synthetic.gold_reward(p, t) for t in group] for p, group in zip(prompts, texts, strict=True)]
    assert metrics["policy"]["gold_reward"] == pytest.approx(np.mean(gold))
    assert results[1]["policy_gold_reward"] == metrics["policy"]["gold_reward"]


@pytest.mark.parametrize("rm_update", ["oracle", "random"])
def test_control_m_steps_relabel_exactly_mutuals_pairs(rm_update, mutual_run, tmp_path):
    """Iteration 1's M-step sees the same π0, r0 and samples in every arm: the controls train on mutual's pairs,
    each oriented by gold (oracle) or by a seeded coin (random)."""
    ref, _ = mutual_run
    cfg = small_config(rm_update)
    arm_dir = str(tmp_path / "seed_0" / rm_update)  # the layout of scripts/replicate.py
    em.share_base_phases(str(ref.rd.path), cfg, arm_dir)
    # Iteration 1's E-step uses π0 and r0 alone, the same in every arm: take mutual's (saves its DPO in a test).
    RunDir(arm_dir, cfg.to_dict()).adopt_phases(ref.rd, {"iter_1/e_step": ("iter_1/e_step", "iter_1/policy")})
    run = MutualTaught(cfg, arm_dir)
    run.run()
    tok = run.models.tokenizer
    summary = run.rd.summary("iter_1/m_step")
    label = "gold" if rm_update == "oracle" else "random"
    for kind in ("self", "contrastive"):  # one pair per prompt of each kind
        mine = run.rd.read_jsonl(f"iter_1/m_step/{kind}_pairs.jsonl")
        theirs = {tuple(r["prompt_ids"]): r for r in ref.rd.read_jsonl(f"iter_1/m_step/{kind}_pairs.jsonl")}
        assert len(mine) + summary[f"{kind}_{label}_ties_dropped"] == len(theirs)
        swapped, right = 0, []
        for row in mine:
            other = theirs[tuple(row["prompt_ids"])]
            assert {tuple(row["chosen_ids"]), tuple(row["rejected_ids"])} == \
                {tuple(other["chosen_ids"]), tuple(other["rejected_ids"])}
            swapped += row["chosen_ids"] != other["chosen_ids"]
            chosen, rejected = gold_of_pair(tok, row)
            assert chosen > rejected or rm_update == "random"
            if chosen != rejected:
                right.append(chosen > rejected)
        assert summary[f"{kind}_{label}_swapped"] == swapped
        # The study's table of how often the pairs each step trains on agree with gold (scripts/replicate.py).
        table = replicate_script().pair_gold_agreement(tmp_path, [rm_update], [0])[rm_update]
        assert table[f"M-step {'self-training' if kind == 'self' else kind}"]["1"]["values"] == [np.mean(right)]
    if rm_update == "random":
        assert summary["self_random_swapped"] + summary["contrastive_random_swapped"] > 0
    assert summary["trained_pairs"] == summary["self_pairs"] + summary["contrastive_pairs"]


def test_oriented_pairs_keep_swap_and_drop():
    pairs = em.PairSet([[1], [2], [3]], [[10], [20], [30]], [[11], [21], [31]], Counter(pairs=3))
    out = em.oriented_pairs(pairs, [True, False, None], "gold")
    assert (out.prompts, out.chosen, out.rejected) == ([[1], [2]], [[10], [21]], [[11], [20]])
    assert out.counts == Counter(pairs=2, gold_swapped=1, gold_ties_dropped=1)


def test_a_new_seed_shares_the_prompts_and_pi0_but_not_r0(mutual_run, tmp_path):
    ref, _ = mutual_run
    cfg = small_config(seed=1)
    assert em.share_phases(str(ref.rd.path), cfg, str(tmp_path)) == ["prompts", "sft"]
    run = MutualTaught(cfg, str(tmp_path))
    assert_trees_equal(run.models.policy_params, ref.params_at(0)[0])  # π0 read back, not retrained
    # the RM starts from π0's backbone with this seed's head
    assert_trees_equal(run.models.reward_init_params["model"], ref.params_at(0)[0]["model"])
    assert not np.array_equal(run.models.reward_init_params["score"]["kernel"],
                              ref.models.reward_init_params["score"]["kernel"])
    cfg.sft.seed = 5  # π0 would differ: nothing of it is shared, nor what reads it
    assert em.share_phases(str(ref.rd.path), cfg, str(tmp_path / "other")) == ["prompts"]


def test_an_interrupted_sft_phase_resumes_to_the_same_policy(mutual_run, tmp_path, monkeypatch):
    ref, _ = mutual_run
    cfg = small_config()
    cfg.checkpoint.update(train_every_steps=1, train_every_seconds=0.0)
    real_log = MutualTaught.log

    def log(self, name):
        inner = real_log(self, name)

        def row_then_stop(row):
            inner(row)
            if name == "sft" and row.get("step") == 1:
                raise KeyboardInterrupt
        return row_then_stop

    with monkeypatch.context() as m:
        m.setattr(MutualTaught, "log", log)
        with pytest.raises(KeyboardInterrupt):
            MutualTaught(cfg, str(tmp_path)).base_policy()
    run = MutualTaught(cfg, str(tmp_path))
    assert run.train_checkpoint("sft").latest_step() == 1
    assert_trees_equal(run.base_policy(), ref.params_at(0)[0])
    steps = Counter(r["step"] for r in run.rd.metrics() if r.get("phase") == "sft" and "train" in r)
    assert steps == {1: 1, 2: 1}  # resumed after step 1, not redone


def test_settings_the_task_needs_are_checked_up_front():
    from mtjax.settings import validate_config

    cfg = mt.get_config("default")
    cfg.sft.enabled = True
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    assert "sft.enabled needs a task with demonstrations" in str(err.value)
    assert "prompts.sft=0 must be >= 1 when sft.enabled" in str(err.value)
    cfg = mt.get_config("synthetic")
    cfg.eval.benchmarks = ("testbed", "alpaca_eval")
    cfg.prompts.source = "data.jsonl"
    cfg.base_rm.pairs_per_prompt = -1
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    for expected in ("eval.benchmarks=('testbed', 'alpaca_eval'): the synthetic task", "prompts.source='data.jsonl'",
                     "base_rm.pairs_per_prompt=-1 must be an int >= 0"):
        assert expected in str(err.value)
    cfg = mt.get_config("synthetic")
    cfg.reward_model.hidden_size = 64
    with pytest.raises(ValueError, match="sft.reward_model_from_policy needs the reward model's backbone"):
        MutualTaught(cfg, "/nonexistent/never/written")
