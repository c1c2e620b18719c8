"""The synthetic testbed: gold scorer (hand-computed cases, optimum, ties, spurious features), the
demonstrator, the word-level tokenizer with mtjax.data's chat/pair helpers, models and gold pairs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mtjax import data, synthetic
from mtjax.synthetic import DECOY, TaskConfig, gold_reward

TASK = TaskConfig()
BEST_ABC = 1.0 + 0.9 * 0.9 + 0.8 * 0.81  # items a, b, c at positions 0, 1, 2


def _factor(word: str) -> float:
    """The word-specific cost factor, written out: 1 + 0.5 * frac((index + 1) * golden ratio)."""
    index = synthetic.WORDS.index(word)
    return 1.0 + 0.5 * ((index + 1) * (math.sqrt(5.0) - 1.0) / 2.0 % 1.0)


# --- gold reward -------------------------------------------------------------------------------------


def test_hand_computed_cases():
    assert synthetic.best_gain(3) == pytest.approx(BEST_ABC)
    assert gold_reward("a b c", "a b c") == pytest.approx(1.0)
    assert gold_reward("a b c", "") == 0.0
    # Swapped order: b (weight 0.9) at position 0, a (1.0) at 1, c (0.8) at 2.
    assert gold_reward("a b c", "b a c") == pytest.approx((0.9 + 1.0 * 0.9 + 0.8 * 0.81) / BEST_ABC)
    # An item not in the prompt costs 0.15 times its factor, 1 % more per position.
    assert _factor("d") == pytest.approx(1.0 + 0.5 * 0.4721360)
    assert gold_reward("a b c", "a d") == pytest.approx((1.0 - 0.15 * _factor("d") * 1.01) / BEST_ABC)
    assert gold_reward("a b c", "um c") == pytest.approx((0.8 * 0.9 - 0.15 * _factor("um")) / BEST_ABC)
    # A repeat costs repeat_cost; the decoy costs decoy_cost; neither earns anything.
    assert gold_reward("a b c", "a a") == pytest.approx((1.0 - 0.15 * 1.01) / BEST_ABC)
    assert gold_reward("a b c", "a b c !") == pytest.approx((BEST_ABC - 0.05 * 1.03) / BEST_ABC)
    # Costs can outweigh the gain: negative gold.
    assert gold_reward("a b c", "d e f") < 0


def test_settings_change_the_reward_as_documented():
    flat = TaskConfig(gamma=1.0, weight_step=0.0, position_jitter=0.0)
    assert gold_reward("a b c", "c b a", flat) == pytest.approx(1.0)  # order no longer matters
    assert gold_reward("a b c", "a", flat) == pytest.approx(1.0 / 3.0)
    assert gold_reward("a b c", "a b c !", TaskConfig(decoy_cost=0.0)) == pytest.approx(1.0)


def test_prompt_order_is_the_unique_optimum():
    """Over every response of up to 4 words from the prompt's items, one other item, a filler and the
    decoy, only the prompt's items in prompt order reach 1; 3-item prompts of any order likewise."""
    words = ["a", "b", "c", "d", "um", DECOY]
    best = max((gold_reward("a b c", " ".join(r)), r) for n in range(5) for r in itertools.product(words, repeat=n))
    assert best == (pytest.approx(1.0), ("a", "b", "c"))
    for prompt in itertools.permutations("kpe"):
        scores = {r: gold_reward(" ".join(prompt), " ".join(r)) for r in itertools.permutations("kpe")}
        assert max(scores, key=scores.get) == prompt


def test_ties_between_distinct_responses_are_rare():
    prompts = synthetic.make_prompts(300, seed=5)
    rows = synthetic.demonstrations(prompts, per_prompt=6, seed=5)
    groups = [rows[i:i + 6] for i in range(0, len(rows), 6)]
    distinct = tied = 0
    for group in groups:
        for (p, x), (_, y) in itertools.combinations(group, 2):
            if x != y:
                distinct += 1
                tied += gold_reward(p, x) == gold_reward(p, y)
    assert distinct > 3000
    assert tied / distinct < 0.01


def test_length_is_never_rewarded_by_itself():
    """Appending any word other than a not-yet-mentioned prompt item strictly lowers gold, by its cost."""
    for prompt, response in synthetic.demonstrations(synthetic.make_prompts(50, seed=1), 2, seed=1):
        base = gold_reward(prompt, response)
        position = len(response.split())
        mentioned = set(response.split())
        for word in synthetic.WORDS:
            if word in synthetic.prompt_items(prompt) and word not in mentioned:
                continue
            longer = gold_reward(prompt, f"{response} {word}".strip())
            assert longer < base
            if word == DECOY:
                expected = TASK.decoy_cost * (1 + TASK.position_jitter * position)
                assert base - longer == pytest.approx(expected / synthetic.best_gain(len(prompt.split())))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="distinct items"):
        gold_reward("a a", "a")
    with pytest.raises(ValueError, match="unknown"):
        gold_reward("a zz", "a")
    with pytest.raises(ValueError, match="'zz'"):
        gold_reward("a b", "a zz")
    with pytest.raises(ValueError, match="gamma"):
        TaskConfig(gamma=0.0)
    with pytest.raises(ValueError, match="weight_step"):
        TaskConfig(weight_step=0.3)
    with pytest.raises(ValueError, match="decoy_cost"):
        TaskConfig(decoy_cost=-0.1)
    with pytest.raises(ValueError, match="3 prompts but 2 responses"):
        synthetic.gold_rewards(["a"] * 3, ["a"] * 2)


# --- prompts and demonstrations -------------------------------------------------------------------


def test_prompts_are_reproducible_and_valid():
    prompts = synthetic.make_prompts(200, seed=3)
    assert prompts == synthetic.make_prompts(200, seed=3) != synthetic.make_prompts(200, seed=4)
    sizes = {len(synthetic.prompt_items(p)) for p in prompts}
    assert sizes == {3, 4, 5}


def _demo_stats(config: synthetic.DemonstratorConfig, seed: int = 0) -> dict[str, float]:
    rows = synthetic.demonstrations(synthetic.make_prompts(3000, seed=seed), 1, seed=seed, config=config)
    gold = np.asarray([gold_reward(p, r) for p, r in rows])
    features = [synthetic.spurious_features(r) for _, r in rows]
    length = np.asarray([f["length"] for f in features])
    decoys = np.asarray([f["decoys"] for f in features])
    return {"gold_mean": gold.mean(), "gold_std": gold.std(), "max_length": length.max(),
            "corr_length": np.corrcoef(gold, length)[0, 1], "corr_decoy": np.corrcoef(gold, decoys)[0, 1]}


def test_demonstrations_are_mediocre_and_the_spurious_features_tempting():
    stats = _demo_stats(synthetic.DemonstratorConfig())
    assert 0.3 < stats["gold_mean"] < 0.7 and stats["gold_std"] > 0.2  # room to improve, diverse
    assert stats["max_length"] <= synthetic.DemonstratorConfig().max_words
    assert stats["corr_length"] > 0.2  # longer demonstrations are better on average ...
    assert stats["corr_decoy"] > 0.1  # ... and so are those ending with the decoy


def test_the_decoy_correlation_is_controlled_by_the_demonstrator():
    neutral = synthetic.DemonstratorConfig(decoy_low=0.4, decoy_high=0.4)
    assert abs(_demo_stats(neutral)["corr_decoy"]) < 0.06  # decoy independent of skill: only its cost
    inverted = synthetic.DemonstratorConfig(decoy_low=0.8, decoy_high=0.1)
    assert _demo_stats(inverted)["corr_decoy"] < -0.2


def test_bad_demonstrator_settings_are_named():
    with pytest.raises(ValueError, match="keep_high"):
        synthetic.DemonstratorConfig(keep_high=1.5)
    with pytest.raises(ValueError, match="max_words"):
        synthetic.DemonstratorConfig(max_words=0)


# --- tokenizer with mtjax.data ---------------------------------------------------------------------


def test_tokenizer_round_trips_and_renders_chats():
    tok = synthetic.make_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == len(synthetic.WORDS) + 6
    text = "c um ! a"
    assert tok.decode(tok.encode(text)) == text
    prompt = data.chat_prompt_ids(tok, "a b c")
    assert tok.decode(prompt) == "<s> <user> a b c <assistant>"
    assert prompt.count(tok.bos_token_id) == 1
    # The prompt's ids are a prefix of prompt + response; the response ends with EOS, which the decode
    # used for response text drops.
    response = data.response_ids(tok, "b a !", tok.eos_token_id)
    assert tok.decode(response, skip_special_tokens=True) == "b a !"
    full = tok.apply_chat_template([{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "b a !"}])
    assert tok.encode(full) == [*prompt, *response]
    completion = data.encode_completion(prompt, response, max_length=64)
    assert list(completion.loss_mask) == [0] * len(prompt) + [1] * len(response)


def test_tokenizer_rejects_bad_input(tmp_path):
    tok = synthetic.make_tokenizer()
    with pytest.raises(ValueError, match="outside the synthetic vocabulary"):
        tok.encode("a hello")
    with pytest.raises(ValueError, match="token id 99"):
        tok.decode([99])
    with pytest.raises(ValueError, match="role 'tool'"):
        tok.apply_chat_template([{"role": "tool", "content": "a"}])
    with pytest.raises(ValueError, match="repeated"):
        synthetic.SyntheticTokenizer(["a", "a"])
    tok.save_pretrained(tmp_path)
    assert synthetic.SyntheticTokenizer.from_pretrained(tmp_path) == tok


def test_sft_completions_mask_the_prompt_and_keep_the_eos():
    tok = synthetic.make_tokenizer()
    rows = [("a b c", "a b"), ("d e f", "")]
    first, empty = synthetic.sft_completions(tok, rows, max_length=32)
    assert first.input_ids[-1] == tok.eos_token_id and first.loss_mask[-3:].tolist() == [1, 1, 1]
    assert empty.loss_mask.sum() == 1  # an empty demonstration still teaches the EOS
    batch = data.collate([first, empty], tok.pad_token_id, 16)
    assert batch["input_ids"].shape == (2, 16) and batch["loss_mask"].sum() == 4
    with pytest.raises(ValueError, match="does not fit max_length=6"):
        synthetic.sft_completions(tok, rows, max_length=6)


# --- models and pairs ------------------------------------------------------------------------------


def test_models_have_about_a_million_parameters_and_share_the_backbone():
    tok = synthetic.make_tokenizer()
    cfg = synthetic.model_config(tok)
    policy, params = synthetic.init_policy(cfg, seed=0)
    assert 0.9e6 < synthetic.num_parameters(params) < 1.1e6
    reward, reward_params = synthetic.reward_model_from_policy(cfg, params, seed=0)
    np.testing.assert_array_equal(reward_params["model"]["norm"]["scale"], params["model"]["norm"]["scale"])
    ids = np.asarray([data.chat_prompt_ids(tok, "a b c")])
    assert reward.apply({"params": reward_params}, ids).shape == (1,)
    assert policy.apply({"params": params}, ids).shape == (1, ids.shape[1], len(tok))


def test_gold_pairs_and_accuracy():
    rewards = [[0.1, 0.5, 0.5], [0.2, 0.2], [0.3, -0.1]]
    texts = [["x", "y", "z"], ["u", "v"], ["s", "s"]]
    pairs, tied = synthetic.untied_pairs(rewards)
    assert pairs == [(0, 1, 0), (0, 2, 0), (2, 0, 1)] and tied == 2
    pairs, tied = synthetic.untied_pairs(rewards, texts)  # the same text twice is no pair either
    assert pairs == [(0, 1, 0), (0, 2, 0)] and tied == 3
    budget = synthetic.one_pair_per_prompt(rewards, texts, seed=0)
    assert len(budget) == 1 and budget[0][0] == 0
    scores = [[0.0, 1.0, -1.0], [0.0, 0.0], [2.0, 2.0]]
    assert synthetic.pairwise_accuracy(scores, [(0, 1, 0), (0, 2, 0), (2, 0, 1)]) == pytest.approx(1.5 / 3)
