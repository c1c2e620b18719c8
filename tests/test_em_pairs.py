"""The EM loop's pair construction (no models needed)."""

from mtjax.em import Sample, contrastive_pairs, length_controlled_pairs


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
