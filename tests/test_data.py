"""Tokenisation, masking and pair-selection rules (mtjax.data)."""

import numpy as np
import pytest

from mtjax import data


@pytest.fixture(scope="module")
def tokenizer():
    from mtjax.models import load_gguf_tokenizer, smollm2_gguf_path

    try:
        return load_gguf_tokenizer(smollm2_gguf_path())
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


def test_chat_prompt_has_one_bos_and_is_a_prefix(tokenizer):
    ids = data.chat_prompt_ids(tokenizer, "Name a prime number.")
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids[1] != im_start
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name a prime number."}], tokenize=False,
                                         add_generation_prompt=True)
    assert tokenizer.decode(ids) == text
    full = data.response_ids(tokenizer, "Seven.", tokenizer.eos_token_id)
    assert full[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids + full).startswith(text)


def test_chat_prompt_rejects_non_user_last_message(tokenizer):
    with pytest.raises(ValueError, match="must end with a user message"):
        data.chat_prompt_ids(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


@pytest.mark.parametrize(
    "rewards, lengths, expected",
    [
        ([1.0, 3.0, 2.5, 0.0], [5, 9, 4, 7], data.PairChoice(2, 3)),  # shortest above mean (1.625) wins
        ([1.0, 3.0, 3.0, 0.0], [5, 4, 4, 7], data.PairChoice(1, 3)),  # length tie → higher reward → lower idx
        ([2.0, 0.0, 0.0], [3, 5, 8], data.PairChoice(0, 2)),  # reward tie for rejected → longer one
        ([1.0, 1.0, 1.0], [3, 4, 5], data.SKIP_ALL_TIED),
        ([1.0], [3], data.SKIP_TOO_FEW),
    ],
)
def test_length_controlled_pair(rewards, lengths, expected):
    assert data.select_length_controlled_pair(rewards, lengths) == expected


def test_chosen_always_beats_rejected_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(2, 7))
        rewards = rng.integers(0, 3, n).astype(float)  # many ties on purpose
        lengths = rng.integers(1, 5, n).tolist()
        choice = data.select_length_controlled_pair(rewards, lengths)
        if isinstance(choice, str):
            assert np.all(rewards == rewards[0])
            continue
        assert rewards[choice.chosen] > rewards.mean() >= rewards[choice.rejected]
        assert rewards[choice.rejected] == rewards.min()
        above = rewards > rewards.mean()
        assert lengths[choice.chosen] == min(np.asarray(lengths)[above])


def test_drop_duplicates_counts():
    keep, dropped = data.drop_duplicate_responses([[1, 2], [3], [1, 2], [3], [4]])
    assert keep == [0, 1, 4] and dropped == 2


def test_encode_and_collate_masks_prompt_and_padding():
    c = data.encode_completion([5, 6, 7], [8, 9, 2], max_length=10)
    assert c.input_ids.tolist() == [5, 6, 7, 8, 9, 2] and c.loss_mask.tolist() == [0, 0, 0, 1, 1, 1]
    cut = data.encode_completion([5, 6, 7], [8, 9, 2], max_length=5)
    assert cut.truncated and cut.input_ids.tolist() == [5, 6, 7, 8, 9]
    assert data.encode_completion([1] * 5, [2], max_length=5) is None
    short = data.encode_completion([5], [2], max_length=10)
    batch = data.collate_pairs([c, short], [short, c], pad_id=0, max_length=16, length_multiple=4)
    assert batch["chosen_input_ids"].shape == (2, 8) and batch["rejected_input_ids"].shape == (2, 8)
    assert batch["chosen_loss_mask"][1].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert batch["chosen_attention_mask"][0].tolist() == [1] * 6 + [0, 0]
    with pytest.raises(ValueError, match="empty response"):
        data.encode_completion([1], [], max_length=4)


def test_self_labelled_pairs_keep_what_the_reward_model_is_sure_of():
    labels = data.self_labelled_pairs([2.0, 0.0, 1.0, 0.3, float("nan")], [0.0, 3.0, 1.0, 0.0, 1.0], threshold=0.8)
    assert labels.keep.tolist() == [True, True, False, False, False]  # σ(2)=.88, σ(3)=.95, σ(0)=.5, σ(.3)=.57
    assert labels.swap.tolist() == [False, True, False, False, False]
    np.testing.assert_allclose(labels.confidence[:2], [1 / (1 + np.exp(-2)), 1 / (1 + np.exp(-3))])
    assert data.self_labelled_pairs([1.0], [0.0], threshold=0.5).keep.tolist() == [True]
    with pytest.raises(ValueError, match=r"threshold must be in \[0.5, 1\)"):
        data.self_labelled_pairs([1.0], [0.0], threshold=1.0)
