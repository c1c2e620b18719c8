"""LLM-as-a-judge rewards (Self-Rewarding rubric) on fixed judge outputs: the prompt, parsing, averaging, counts."""

import math

import pytest

from mtjax import judge

JUDGMENTS = {
    "The response is relevant and answers the basics.\nScore: 3": 3.0,
    "**Score:** 4": 4.0,
    "It earns points for relevance (1) and coverage (2).\n\nScore: 2/5": 2.0,
    "score = 4.5": 4.5,
    "Score: 1 ... on reflection, Score: 5": 5.0,  # the conclusion counts
    "Total: <4> points. Score: <4>": 4.0,
    "I would give it four points.": None,  # no score in the required format
    "Score: 7": None,  # outside the rubric's 0-5
    "Score:": None,
    "": None,
}


@pytest.mark.parametrize(("text", "expected"), list(JUDGMENTS.items()))
def test_scores_are_parsed_from_the_rubrics_format_or_counted_as_unparsed(text, expected):
    assert judge.parse_score(text) == expected


def test_the_prompt_is_the_self_rewarding_rubric_filled_in():
    text = judge.judge_prompt("How do I boil an egg?", "Put it in boiling water for 9 minutes.")
    assert text.startswith("Review the user's question and the corresponding response using the additive 5-point")
    assert "User: How do I boil an egg?\n\n<response>Put it in boiling water for 9 minutes.</response>" in text
    assert 'Conclude with the score using the format: "Score: <total points>"' in text
    assert text.count("point") >= 5 and "{" not in text


def test_rewards_average_the_parsed_judgments_and_count_the_rest():
    outputs = iter(["Score: 4", "Score: 2", "no verdict",  # response 0: mean of 4 and 2
                    "nothing", "Score: 9", "",  # response 1: nothing parses -> no reward
                    "Score: 5", "Score: 5", "Score: 4"])
    seen = []

    def fixed_judge(queries):
        seen.extend(queries)
        return [next(outputs) for _ in queries]

    result = judge.judge_rewards(fixed_judge, ["p0", "p1", "p2"], ["r0", "r1", "r2"], num_judgments=3)
    assert result.rewards[0] == 3.0 and math.isnan(result.rewards[1]) and result.rewards[2] == pytest.approx(14 / 3)
    assert (result.judgments, result.unparsed, result.unjudged) == (9, 4, 1)
    assert result.summary()["unparsed_fraction"] == pytest.approx(4 / 9)
    assert seen[0] == seen[2] == judge.judge_prompt("p0", "r0") and seen[3] == judge.judge_prompt("p1", "r1")


def test_bad_calls_are_refused():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        judge.judge_rewards(lambda q: q, ["a", "b"], ["x"], 1)
    with pytest.raises(ValueError, match="num_judgments must be >= 1"):
        judge.judge_rewards(lambda q: q, ["a"], ["x"], 0)
    with pytest.raises(ValueError, match="returned 1 judgments for 2 queries"):
        judge.judge_rewards(lambda q: ["Score: 1"], ["a"], ["x"], 2)
