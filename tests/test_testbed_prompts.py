"""Prompt generator: task pool, constraint compatibility, determinism, disjoint recorded splits."""

from __future__ import annotations

import random

import pytest

from mtjax.testbed.constraints import (
    CONFLICTS,
    FAMILIES,
    FAMILY_BY_ID,
    REPEAT_PROMPT,
    PromptContext,
    compatible,
    leave_room_for_required_text,
    required_text,
    sample_constraints,
)
from mtjax.testbed.gold import build_checker, check_response
from mtjax.testbed.prompts import (
    PromptGeneratorConfig,
    PromptSplitSizes,
    build_prompt_splits,
    generate_prompt_rows,
    load_prompt_splits,
    save_prompt_splits,
)
from mtjax.testbed.tasks import BASE_TASKS, CATEGORIES

SMALL = PromptSplitSizes(policy=(120, 120), reward_model=100, base_rm_labels=60, heldout_eval=80)


def test_task_pool_is_large_varied_and_uniquely_identified() -> None:
    assert len(BASE_TASKS) >= 300
    assert len({t.task_id for t in BASE_TASKS}) == len({t.text for t in BASE_TASKS}) == len(BASE_TASKS)
    assert len(CATEGORIES) >= 10
    assert all(sum(t.category == c for t in BASE_TASKS) >= 20 for c in CATEGORIES)


def test_conflict_table_is_symmetric_and_rules_out_contradictions() -> None:
    for a, others in CONFLICTS.items():
        assert a not in others
        assert all(a in CONFLICTS[b] for b in others)
    assert not compatible(["change_case:english_lowercase", "change_case:english_capital"])
    assert not compatible(["punctuation:no_comma", "detectable_format:json_format"])
    assert not compatible(["keywords:forbidden_words", REPEAT_PROMPT])
    assert not compatible(["punctuation:no_comma", "punctuation:no_comma"])
    assert compatible(["punctuation:no_comma", "detectable_format:title", "keywords:existence"])


def test_sampled_constraints_are_compatible_distinct_and_buildable() -> None:
    rng = random.Random(0)
    seen = set()
    for _ in range(600):
        sampled = sample_constraints(rng, rng.randint(1, 3))
        assert 1 <= len(sampled.instruction_ids) <= 3
        assert compatible(sampled.instruction_ids)
        words = [w for kw in sampled.kwargs for w in kw.get("keywords", []) + kw.get("forbidden_words", [])]
        words += [kw["keyword"] for kw in sampled.kwargs if "keyword" in kw]
        assert len(words) == len(set(words))  # a word is never both required and forbidden
        if REPEAT_PROMPT in sampled.instruction_ids:
            assert sampled.instruction_ids[-1] == REPEAT_PROMPT
        seen.update(sampled.instruction_ids)
    assert seen == {f.instruction_id for f in FAMILIES}


def test_required_text_never_breaks_the_other_constraints() -> None:
    """Text that some constraints force into the answer (keywords, closing phrase, postscript marker,
    section headers) must leave the "fewer than" letter/capital limits and forbidden words satisfiable."""
    rng = random.Random(7)
    checked = 0
    for _ in range(3000):
        sampled = sample_constraints(rng, 3)
        limits = [
            (iid, kw)
            for iid, kw in zip(sampled.instruction_ids, sampled.kwargs, strict=True)
            if kw.get("let_relation") == "less than"
            or kw.get("capital_relation") == "less than"
            or iid == "keywords:forbidden_words"
        ]
        forced = required_text(list(sampled.kwargs))
        if not limits or not forced:
            continue
        text = " ".join(forced) + "."
        for iid, kw in limits:
            assert check_response([iid], [kw], "p", text).reward() == 1.0, (iid, kw, text)
        checked += 1
    assert checked > 100


def test_limits_are_raised_above_the_required_text() -> None:
    kwargs = [
        {"letter": "p", "let_frequency": 5, "let_relation": "less than"},
        {"capital_relation": "less than", "capital_frequency": 2},
        {"postscript_marker": "P.P.S"},
        {"end_phrase": "Hope this helps!"},
        {"section_spliter": "PART", "num_sections": 3},
    ]
    leave_room_for_required_text(kwargs)
    text = " ".join(required_text(kwargs)) + "."  # 5 p's; P.P.S and 3 x PART are all-capital words
    assert kwargs[0]["let_frequency"] > 5 and kwargs[1]["capital_frequency"] > 4
    for iid, kw in (("keywords:letter_frequency", kwargs[0]), ("change_case:capital_word_frequency", kwargs[1])):
        assert check_response([iid], [kw], "p", text).reward() == 1.0


def test_closing_phrase_and_forbidden_words_never_clash() -> None:
    rng = random.Random(0)
    with_help = PromptContext(frozenset({"startend:end_checker"}), frozenset({"help", "very"}))
    phrases = {FAMILY_BY_ID["startend:end_checker"].sample_kwargs(rng, with_help)["end_phrase"] for _ in range(200)}
    assert phrases and not any("help" in p.lower().split() for p in phrases)
    for _ in range(300):  # forbidden words drawn after the phrase avoid its words
        sampled = sample_constraints(rng, 3)
        ids = sampled.instruction_ids
        if "startend:end_checker" in ids and "keywords:forbidden_words" in ids:
            kw = dict(zip(ids, sampled.kwargs, strict=True))
            phrase = kw["startend:end_checker"]["end_phrase"]
            assert check_response(["keywords:forbidden_words"], [kw["keywords:forbidden_words"]], "p", phrase).reward()


def test_generation_is_deterministic_and_seed_dependent() -> None:
    config = PromptGeneratorConfig(seed=3, sizes=SMALL)
    assert generate_prompt_rows(config) == generate_prompt_rows(config)
    other = generate_prompt_rows(PromptGeneratorConfig(seed=4, sizes=SMALL))
    assert other["policy_1"][0]["prompt_id"] != generate_prompt_rows(config)["policy_1"][0]["prompt_id"]


def test_splits_are_disjoint_sized_and_in_ifeval_layout() -> None:
    splits = build_prompt_splits(PromptGeneratorConfig(seed=0, sizes=SMALL))
    assert set(splits) == {"heldout_eval", "base_rm_labels", "reward_model", "policy_1", "policy_2"}
    assert {n: len(s) for n, s in splits.items()} == SMALL.named()
    ids = [i for s in splits.values() for i in s["prompt_id"]]
    texts = [t for s in splits.values() for t in s["prompt"]]
    assert len(set(ids)) == len(ids) and len(set(texts)) == len(texts)
    row = splits["policy_1"][0]
    assert len(row["instruction_id_list"]) == len(row["kwargs"])
    # Hub layout: every kwargs dict has every key, unused ones None, and the checkers accept it.
    assert any(v is None for v in row["kwargs"][0].values())
    for split in splits.values():
        for row in split:
            for iid, kw in zip(row["instruction_id_list"], row["kwargs"], strict=True):
                build_checker(iid, kw, row["prompt"])
                if iid == REPEAT_PROMPT:
                    assert row["prompt"].startswith(kw["prompt_to_repeat"])


def test_repeat_prompt_is_satisfiable_by_repeating_the_request() -> None:
    rows = [r for split in generate_prompt_rows(PromptGeneratorConfig(seed=1)).values() for r in split]
    row = next(r for r in rows if r["instruction_id_list"] == [REPEAT_PROMPT])
    response = row["kwargs"][0]["prompt_to_repeat"] + "\nHere is my answer."
    assert check_response(row["instruction_id_list"], row["kwargs"], row["prompt"], response).reward() == 1.0


def test_heldout_split_does_not_depend_on_training_sizes() -> None:
    a = generate_prompt_rows(PromptGeneratorConfig(seed=0, sizes=SMALL))
    bigger = PromptSplitSizes(policy=(300, 10, 10), reward_model=5, base_rm_labels=200, heldout_eval=80)
    b = generate_prompt_rows(PromptGeneratorConfig(seed=0, sizes=bigger))
    assert a["heldout_eval"] == b["heldout_eval"]


def test_heldout_tasks_can_be_reserved() -> None:
    rows = generate_prompt_rows(PromptGeneratorConfig(seed=0, sizes=SMALL, heldout_task_fraction=0.2))
    heldout_tasks = {r["task_id"] for r in rows["heldout_eval"]}
    train_tasks = {r["task_id"] for name, split in rows.items() if name != "heldout_eval" for r in split}
    assert heldout_tasks and not heldout_tasks & train_tasks


def test_save_and_load_round_trip_with_manifest(tmp_path) -> None:
    config = PromptGeneratorConfig(
        seed=0, sizes=PromptSplitSizes(policy=(20,), reward_model=10, base_rm_labels=5, heldout_eval=5)
    )
    splits = build_prompt_splits(config)
    save_prompt_splits(splits, tmp_path, config)
    loaded = load_prompt_splits(tmp_path)
    for name in splits:
        assert loaded[name].to_list() == splits[name].to_list()
    (tmp_path / "policy_1.jsonl").write_text(
        "\n".join((tmp_path / "policy_1.jsonl").read_text().splitlines()[1:])
    )
    with pytest.raises(ValueError, match="does not match its manifest"):
        load_prompt_splits(tmp_path)


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="policy_1"):
        PromptSplitSizes(policy=(-1,)).named()
    with pytest.raises(ValueError, match="heldout_task_fraction"):
        generate_prompt_rows(PromptGeneratorConfig(heldout_task_fraction=1.0))
