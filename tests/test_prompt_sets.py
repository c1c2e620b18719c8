"""Prompt sets: files, saved datasets and hub ids (offline, from a prepared cache), chat columns, the length
cap, and errors that name the file and line."""

import json
from collections import Counter

import pytest
from hub_cache import add_dataset

from mtjax.prompt_sets import (
    PromptConfig,
    PromptLimits,
    PromptSetError,
    external_splits,
    fitting_prompts,
    prompt_of,
    read_prompts,
)

NO_LIMITS = PromptLimits(max_prompt_tokens=10**6, max_new_tokens=1, policy_context=10**7, reward_context=10**7)


def by_words(prompt):
    """A stand-in tokenizer count: words of the prompt's text (policy and reward model alike)."""
    text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
    return len(text.split()), len(text.split())


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_external_source_fills_policy_and_rm_splits_seeded_and_deduplicated(tmp_path):
    rows = [{"prompt": f"question {i}?"} for i in range(8)] + [{"prompt": "question 3?"}, {"prompt": "  "}]
    file = write_jsonl(tmp_path / "prompts.jsonl", rows)
    cfg = PromptConfig(source=str(file), seed=1, policy=(3, 3), reward_model=2)
    splits, counts = external_splits(cfg, NO_LIMITS, by_words)
    texts = {name: [r["prompt"] for r in split] for name, split in splits.items()}
    assert {k: len(v) for k, v in texts.items()} == {"policy_1": 3, "policy_2": 3, "reward_model": 2}
    assert len({t for v in texts.values() for t in v}) == 8
    assert counts == Counter(skipped_duplicate=1, skipped_empty=1)
    again, _ = external_splits(cfg, NO_LIMITS, by_words)
    assert again == splits  # seeded
    with pytest.raises(PromptSetError, match="has 8 distinct prompts, 8 of them fit .* the splits need 9"):
        external_splits(PromptConfig(source=str(file), policy=(3, 3), reward_model=3), NO_LIMITS, by_words)
    with pytest.raises(PromptSetError, match="row 0: no column .text. .*set prompts.column"):
        read_prompts(PromptConfig(source=str(file), column="text"))


def test_chat_columns_become_prompts_cut_after_the_last_user_turn():
    assert prompt_of("  hello ", "x") == "hello"
    assert prompt_of([{"role": "user", "content": "only turn"}], "x") == "only turn"
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    assert prompt_of(chat, "x") == chat[:4]  # the final answer is not part of the prompt
    with pytest.raises(PromptSetError, match="x: a chat with no user turn"):
        prompt_of([{"role": "assistant", "content": "a"}], "x")
    with pytest.raises(PromptSetError, match="row 3: a prompt must be a string"):
        prompt_of(7, "row 3")


def test_over_long_prompts_are_dropped_and_counted_by_reason():
    limits = PromptLimits(max_prompt_tokens=5, max_new_tokens=4, policy_context=10, reward_context=8)
    prompts = ["a b", "a b c d e f", "a b c d e f g", "a b c d e", "a b c"]
    kept, counts = fitting_prompts(prompts, limits, by_words)
    assert kept == [0, 4]
    assert counts == Counter(dropped_longer_than_max_prompt_tokens=2, dropped_exceeds_reward_model_context=1)
    kept, _ = fitting_prompts(prompts, limits, by_words, wanted=1)
    assert kept == [0]


@pytest.mark.parametrize("content, message", [
    (b"", r"holds no rows"),
    (b'{"prompt": "a"}\n{"prompt": "b', r"prompts.jsonl:2: not valid JSON"),
    (b'{"prompt": "caf\xe9"}\n', r"prompts.jsonl: not UTF-8 text"),
])
def test_bad_prompt_files_are_named(tmp_path, content, message):
    file = tmp_path / "prompts.jsonl"
    file.write_bytes(content)
    with pytest.raises(PromptSetError, match=message):
        read_prompts(PromptConfig(source=str(file)))


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(PromptSetError, match="no such file"):
        read_prompts(PromptConfig(source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(PromptSetError, match="no such file or folder, and not a hub dataset id"):
        read_prompts(PromptConfig(source="not/a/hub/id"))


def test_hub_dataset_id_reads_the_datasets_cache_offline(tmp_path, monkeypatch):
    import datasets

    rows = [{"prompt": f"p{i}", "prompt_id": str(i), "messages": [{"role": "user", "content": f"p{i}"},
                                                               {"role": "assistant", "content": "a"}]}
            for i in range(4)]
    add_dataset(tmp_path, "Org/prompt_set", {"train_prefs": rows, "test_prefs": rows[:1]})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    prompts, _ = read_prompts(PromptConfig(source="Org/prompt_set", split="train_prefs"))
    assert prompts == ["p0", "p1", "p2", "p3"]
    prompts, _ = read_prompts(PromptConfig(source="Org/prompt_set", split="train_prefs", column="messages"))
    assert prompts == ["p0", "p1", "p2", "p3"]  # the chat column, its answer cut
    with pytest.raises(PromptSetError, match="cannot load it .*local file instead"):
        read_prompts(PromptConfig(source="Org/missing", split="train"))
