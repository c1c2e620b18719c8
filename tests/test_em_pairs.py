"""The EM loop's pair construction and config validation (no models needed)."""

import sys
from pathlib import Path

import pytest

from mtjax.em import Sample, contrastive_pairs, length_controlled_pairs, validate_config

sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
import mt  # noqa: E402


def S(*ids, stopped=True):
    return Sample(tuple(ids), stopped)


def test_length_controlled_pairs_count_every_skip():
    prompts = [[1], [2], [3], [4]]
    samples = [
        [S(5, 2), S(6, 7, 2), S(5, 2)],  # a duplicate: dropped and counted
        [S(5, 2), S(6, 2)],  # equal rewards: skipped
        [S(5, 2), S(9, 9, 9, stopped=False)],  # truncated response dropped → one left → skipped
        [S(8, 8, 8, 2), S(7, 2), S(6, 6, 2)],
    ]
    rewards = [[0.1, 0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [1.0, 0.9, 0.0]]
    pairs = length_controlled_pairs(prompts, samples, rewards, drop_truncated=True)
    assert pairs.counts["duplicate_responses"] == 1
    assert pairs.counts["truncated_responses"] == 1
    assert pairs.counts["skipped_all_rewards_equal"] == 1
    assert pairs.counts["skipped_fewer_than_two_responses"] == 1
    assert pairs.counts["pairs"] == 2 == len(pairs)
    # prompt 4: rewards above mean (0.633) are 1.0 (len 4) and 0.9 (len 2) → the shorter wins
    assert pairs.chosen[1] == [7, 2] and pairs.rejected[1] == [6, 6, 2]
    assert pairs.prompts == [[1], [4]]


def test_contrastive_pairs_and_reward_gap_filter():
    prompts = [[1], [2], [3]]
    new = [[S(5, 2)], [S(6, 2)], [S(7, 2)]]
    old = [[S(9, 2)], [S(6, 2)], [S(8, 2)]]
    new_r, old_r = [[1.0], [0.0], [-5.0]], [[0.0], [0.0], [0.0]]
    plain = contrastive_pairs(prompts, new, new_r, old, old_r, filter_by_std=False, drop_truncated=True)
    assert len(plain) == 2 and plain.counts["skipped_identical"] == 1
    filtered = contrastive_pairs(prompts, new, new_r, old, old_r, filter_by_std=True, drop_truncated=True)
    assert len(filtered) == 1 and filtered.counts["filtered_by_reward_gap"] == 1
    assert filtered.chosen == [[5, 2]] and filtered.rejected == [[9, 2]]


@pytest.mark.parametrize("preset", ["default", "tiny", "gpu"])
def test_presets_validate(preset):
    validate_config(mt.get_config(preset))


def test_invalid_values_are_reported_together():
    cfg = mt.get_config("tiny")
    cfg.mt.rm_update = "sometimes"
    cfg.sampling.num_samples = 1
    cfg.dpo.max_length = 8
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert "mt.rm_update='sometimes'" in message and "num_samples=1" in message and "dpo.max_length=8" in message


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*default, tiny, gpu, paper"):
        mt.get_config("huge")


def test_external_prompt_source_fills_policy_and_rm_splits(tmp_path):
    import json

    from ml_collections import ConfigDict

    from mtjax.em import external_prompt_splits

    file = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"question {i}?"} for i in range(8)] + [{"prompt": "question 3?"}]  # a duplicate
    rows += [{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "chat question"}]}]
    file.write_text("\n".join(json.dumps(r) for r in rows[:9]) + "\n")
    p = ConfigDict(dict(source=str(file), split="train", column="prompt", seed=1, policy=(3, 3), reward_model=2))
    names = ["heldout_eval", "policy_1", "policy_2", "reward_model", "base_rm_labels"]
    splits = external_prompt_splits(p, names)
    texts = {name: list(split["prompt"]) for name, split in splits.items()}
    assert {k: len(v) for k, v in texts.items()} == {"policy_1": 3, "policy_2": 3, "reward_model": 2}
    everything = [t for v in texts.values() for t in v]
    assert len(set(everything)) == 8 and set(everything) <= {f"question {i}?" for i in range(8)}
    assert texts == {n: list(s["prompt"]) for n, s in external_prompt_splits(p, names).items()}  # seeded
    p.reward_model = 3
    with pytest.raises(ValueError, match="has 8 distinct prompts; the splits need 9"):
        external_prompt_splits(p, names)
    with pytest.raises(ValueError, match="no column 'text'"):
        external_prompt_splits(ConfigDict({**p.to_dict(), "column": "text"}), names)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(rows[-1]) + "\n")
    from mtjax.em import load_prompt_texts

    assert load_prompt_texts(str(chat), "train", "prompt") == ["chat question"]
