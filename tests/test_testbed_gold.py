"""Gold reward: hand-written pass/fail responses for every constraint family, protocol details, and
agreement with if-verifiable's own reference evaluation on the real IFEval and IFBench prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mtjax.testbed.constraints import FAMILY_BY_ID
from mtjax.testbed.gold import check_response, gold_reward

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# instruction id -> list of (kwargs, passing response, failing response)
HAND_WRITTEN = {
    "punctuation:no_comma": [({}, "I like apples and pears.", "I like apples, pears and plums.")],
    "change_case:english_lowercase": [
        (
            {},
            "this is a perfectly ordinary english sentence about the weather today.",
            "This is a perfectly ordinary English sentence about the weather today.",
        )
    ],
    "change_case:english_capital": [
        (
            {},
            "THIS IS A PERFECTLY ORDINARY ENGLISH SENTENCE ABOUT THE WEATHER TODAY.",
            "This is a perfectly ordinary English sentence about the weather today.",
        )
    ],
    "change_case:capital_word_frequency": [
        (
            {"capital_relation": "at least", "capital_frequency": 2},
            "NASA and ESA were GREAT.",
            "It was great.",
        ),
        ({"capital_relation": "less than", "capital_frequency": 2}, "Only NASA here.", "NASA ESA GREAT."),
    ],
    "detectable_format:json_format": [({}, '```json\n{"answer": "yes"}\n```', "answer: yes")],
    "detectable_format:title": [
        ({}, "<<A Day Out>>\nWe went to the park.", "A Day Out\nWe went to the park.")
    ],
    "detectable_format:number_bullet_lists": [({"num_bullets": 3}, "* one\n* two\n- three", "* one\n* two")],
    "detectable_format:number_highlighted_sections": [
        ({"num_highlights": 2}, "See *first part* and *second part*.", "See *only this part* here.")
    ],
    "detectable_format:multiple_sections": [
        (
            {"section_spliter": "Section", "num_sections": 2},
            "Section 1\nIntro text.\nSection 2\nMore text.",
            "Intro text.\nMore text.",
        )
    ],
    "detectable_content:number_placeholders": [
        ({"num_placeholders": 2}, "Dear [name], see you at [address].", "Dear [name], see you soon.")
    ],
    "detectable_content:postscript": [
        ({"postscript_marker": "P.S."}, "Main text.\n\nP.S. Bring snacks.", "Main text about snacks."),
        (
            {"postscript_marker": "P.P.S"},
            "Main text.\nP.P.S. Bring snacks.",
            "Main text.\nP.S. Bring snacks.",
        ),
    ],
    "keywords:existence": [
        ({"keywords": ["garden", "river"]}, "The garden by the river.", "The garden by the lake.")
    ],
    "keywords:forbidden_words": [
        ({"forbidden_words": ["very", "good"]}, "It was excellent.", "It was very nice.")
    ],
    "keywords:frequency": [
        (
            {"keyword": "lantern", "frequency": 2, "relation": "at least"},
            "A lantern, another lantern.",
            "A lantern.",
        ),
        (
            {"keyword": "lantern", "frequency": 2, "relation": "less than"},
            "A lantern.",
            "Lantern and lantern.",
        ),
    ],
    "keywords:letter_frequency": [
        ({"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "A zebra at the zoo.", "A horse."),
        ({"letter": "y", "let_frequency": 2, "let_relation": "less than"}, "A cat.", "Yes, yellow."),
    ],
    "length_constraints:number_words": [
        ({"relation": "at least", "num_words": 5}, "one two three four five", "one two three"),
        ({"relation": "less than", "num_words": 5}, "one two", "one two three four five six"),
    ],
    "length_constraints:number_sentences": [
        # Punkt must not split after "Dr." (a regex splitter would count 4 sentences here).
        (
            {"relation": "at least", "num_sentences": 3},
            "Dr. Smith came. He sat. We talked.",
            "He came. He sat.",
        ),
        ({"relation": "less than", "num_sentences": 3}, "Dr. Smith came. He sat.", "One. Two. Three. Four."),
    ],
    "length_constraints:number_paragraphs": [
        ({"num_paragraphs": 2}, "First paragraph.\n***\nSecond paragraph.", "Only one paragraph.")
    ],
    "length_constraints:nth_paragraph_first_word": [
        (
            {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "finally"},
            "Intro here.\n\nFinally, the end.",
            "Intro here.\n\nThen the end.",
        )
    ],
    "startend:end_checker": [
        (
            {"end_phrase": "Any other questions?"},
            "My answer. Any other questions?",
            "Any other questions? Yes.",
        )
    ],
    "startend:quotation": [({}, '"All of it is wrapped."', "Not wrapped.")],
    "combination:two_responses": [
        ({}, "Answer one.\n******\nAnswer two.", "Answer one.\n******\nAnswer one.")
    ],
    "combination:repeat_prompt": [
        ({"prompt_to_repeat": "Write a note."}, "Write a note. Here it is.", "Here it is: write a note.")
    ],
    "language:response_language": [
        (
            {"language": "es"},
            "El perro corre por el parque todos los días y le gusta mucho jugar con la pelota roja.",
            "The dog runs in the park every day and really likes to play with the red ball.",
        )
    ],
}


def test_every_generator_family_has_hand_written_cases() -> None:
    assert set(HAND_WRITTEN) == set(FAMILY_BY_ID)


@pytest.mark.parametrize(
    "instruction_id,kwargs,passing,failing",
    [(iid, kw, ok, bad) for iid, cases in HAND_WRITTEN.items() for kw, ok, bad in cases],
)
def test_hand_written_pass_and_fail(instruction_id: str, kwargs: dict, passing: str, failing: str) -> None:
    assert gold_reward([instruction_id], [kwargs], "a prompt", passing) == 1.0
    assert gold_reward([instruction_id], [kwargs], "a prompt", failing) == 0.0


def test_fraction_and_per_instruction_results() -> None:
    ids = ["punctuation:no_comma", "keywords:existence", "startend:quotation"]
    kwargs = [{}, {"keywords": ["river"]}, {}]
    result = check_response(ids, kwargs, "p", "A walk by the river, at dusk.")
    assert [r.strict for r in result.instructions] == [False, True, False]
    assert result.reward("strict") == pytest.approx(1 / 3)
    assert gold_reward(ids, kwargs, "p", "A walk by the river at dusk.") == pytest.approx(2 / 3)
    assert not result.all_followed("strict")


def test_loose_mode_forgives_a_chatty_first_line_and_markdown() -> None:
    response = "Sure! Here is my answer:\nthis is all lowercase english text about a quiet walk in the park."
    ids, kwargs = ["change_case:english_lowercase"], [{}]
    assert gold_reward(ids, kwargs, "p", response, mode="strict") == 0.0
    assert gold_reward(ids, kwargs, "p", response, mode="loose") == 1.0
    title = "**<<A Title>>** and more"
    assert gold_reward(["detectable_format:title"], [{}], "p", title, mode="loose") == 1.0


def test_hub_layout_kwargs_with_none_values_are_accepted() -> None:
    hub_kwargs = [{"num_words": 3, "relation": "at least", "keywords": None, "language": None}]
    assert gold_reward(["length_constraints:number_words"], hub_kwargs, "p", "one two three") == 1.0


def test_empty_response_follows_nothing() -> None:
    result = check_response(
        ["punctuation:no_comma", "keywords:forbidden_words"], [{}, {"forbidden_words": ["x"]}], "p", "   "
    )
    assert result.reward("strict") == 0.0 and result.reward("loose") == 0.0


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown instruction id 'no:such'"):
        gold_reward(["no:such"], [{}], "p", "r")
    with pytest.raises(ValueError, match="2 instruction ids but 1 kwargs"):
        gold_reward(["punctuation:no_comma", "startend:quotation"], [{}], "p", "r")
    with pytest.raises(ValueError, match="bad kwargs"):
        gold_reward(["punctuation:no_comma"], [{"bogus": 1}], "p", "r")
    with pytest.raises(ValueError, match="mode must be"):
        gold_reward(["punctuation:no_comma"], [{}], "p", "r", mode="lenient")


def test_ifbench_instructions_needing_unavailable_nltk_data_are_counted_not_guessed() -> None:
    result = check_response(
        ["ratio:stop_words", "words:alphabet"], [{"percentage": 50}, {}], "p", "A big cat."
    )
    stop_words, alphabet = result.instructions
    assert stop_words.strict is None and "stopwords" in stop_words.error
    assert alphabet.strict is not None
    assert result.num_unscorable == 1 and not result.scorable
    assert not math.isnan(result.reward("strict"))


def _rows(name: str) -> list[dict]:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present (shared evaluation data lives beside the repository)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _probe_responses(prompt: str) -> list[str]:
    """Responses that pass and fail a variety of IFEval checkers (constructed, not model outputs)."""
    return [
        "<<a plain title>>\nthis answer is written in lowercase without commas. it has a few sentences. "
        "it mentions [name] and [place].\n\n* first point\n* second point\n\np.s. thanks for reading",
        prompt + "\n\n" + "SECTION 1\nTHE ANSWER, IN CAPITALS.\n***\nSECTION 2\n*HIGHLIGHTED PART* AND MORE.",
        '```json\n{"answer": "A short, structured reply", "points": [1, 2]}\n```',
    ]


SLOW_LANGDETECT_CHECKERS = {
    "language:response_language",
    "change_case:english_lowercase",
    "change_case:english_capital",
}


def _is_deterministic(instruction_id: str, kwargs: dict, benchmark: str) -> bool:
    """False when the checker fills a missing/invalid kwarg at random (so if-verifiable's verdict is
    itself random; ours is seeded)."""
    import random

    from mtjax.testbed.gold import instruction_registry, normalize_kwargs

    described = []
    for seed in (1, 2):
        random.seed(seed)
        checker = instruction_registry(benchmark)[instruction_id](instruction_id)
        checker.build_description(**normalize_kwargs(kwargs))
        described.append(repr(checker.get_instruction_args()))
    return len(set(described)) == 1


def test_randomly_completed_kwargs_are_seeded() -> None:
    # IFEval prompt 1122 asks for the "letter" '#': the checker substitutes a random letter.
    kwargs = [{"let_relation": "at least", "letter": "#", "let_frequency": 4}]
    import random
    import string

    # Letter number i appears i times, so which letter the checker picks decides the verdict.
    response = " ".join(letter * i for i, letter in enumerate(string.ascii_lowercase, start=1))
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    rewards = {gold_reward(["keywords:letter_frequency"], kwargs, "p", response) for _ in range(5)}
    assert len(rewards) == 1
    assert random.random() == expected_next  # the global random state is left alone


@pytest.mark.parametrize(
    "benchmark,file", [("ifeval", "ifeval_input_data.jsonl"), ("ifbench", "ifbench_test.jsonl")]
)
def test_agrees_with_if_verifiable_reference_evaluation(benchmark: str, file: str) -> None:
    from if_verifiable import IFBenchSample, IFEvalSample, evaluate_output_for_sample

    rows = _rows(file)
    if benchmark == "ifbench":
        rows = rows[::3]  # IFBench's checkers are slower; a third of the prompts covers every family
    sample_type = IFEvalSample if benchmark == "ifeval" else IFBenchSample
    compared = unscorable = 0
    for row in rows:
        sample = sample_type(row["key"], row["prompt"], row["instruction_id_list"], row["kwargs"])
        deterministic = [
            _is_deterministic(iid, kw, benchmark)
            for iid, kw in zip(row["instruction_id_list"], row["kwargs"], strict=True)
        ]
        # Keep the test fast: langdetect (language and case checkers) costs ~15 ms a call, so those
        # prompts get one probe; the JSON probe only matters for JSON prompts.
        ids = set(row["instruction_id_list"])
        probes = _probe_responses(row["prompt"])
        if benchmark == "ifbench" or ids & SLOW_LANGDETECT_CHECKERS:
            probes = probes[:1]
        elif "detectable_format:json_format" not in ids:
            probes = probes[:2]
        for response in probes:
            ours = check_response(
                row["instruction_id_list"], row["kwargs"], row["prompt"], response, benchmark
            )
            if not ours.scorable:
                unscorable += 1
                continue
            reference, scores = evaluate_output_for_sample(benchmark, sample, response)
            theirs = [
                (r.strict_pass, r.loose_pass) for r, d in zip(reference, deterministic, strict=True) if d
            ]
            mine = [(r.strict, r.loose) for r, d in zip(ours.instructions, deterministic, strict=True) if d]
            assert mine == theirs, (row["key"], response[:80])
            if all(deterministic):
                assert ours.reward("strict") == pytest.approx(scores.partial_strict)
                assert ours.all_followed("loose") == bool(scores.binary_loose)
            compared += 1
    assert compared >= (len(rows) * 1.5 if benchmark == "ifeval" else len(rows) * 0.8)
    if benchmark == "ifeval":
        assert unscorable == 0


def test_agrees_with_reference_on_real_model_outputs() -> None:
    """SmolLM2-135M-Instruct's greedy IFEval answers (docs/bench): real, messy outputs, not probes."""
    from if_verifiable import IFEvalSample, evaluate_output_for_sample

    path = Path(__file__).resolve().parents[1] / "docs" / "bench" / "eval_smollm2_cpu_responses_ifeval.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    responses = {r["key"]: r["response"] for r in map(json.loads, path.read_text().splitlines())}
    rows = [r for r in _rows("ifeval_input_data.jsonl") if str(r["key"]) in responses]
    assert len(rows) == len(responses) >= 20
    for row in rows:
        response = responses[str(row["key"])]
        deterministic = [
            _is_deterministic(iid, kw, "ifeval")
            for iid, kw in zip(row["instruction_id_list"], row["kwargs"], strict=True)
        ]
        ours = check_response(row["instruction_id_list"], row["kwargs"], row["prompt"], response, "ifeval")
        sample = IFEvalSample(row["key"], row["prompt"], row["instruction_id_list"], row["kwargs"])
        reference, _ = evaluate_output_for_sample("ifeval", sample, response)
        theirs = [(r.strict_pass, r.loose_pass) for r, d in zip(reference, deterministic, strict=True) if d]
        mine = [(r.strict, r.loose) for r, d in zip(ours.instructions, deterministic, strict=True) if d]
        assert mine == theirs, row["key"]
