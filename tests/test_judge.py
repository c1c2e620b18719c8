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


# ----------------------------------------------------------------------------- Meta-Rewarding's meta-judge

VERDICTS = {
    "Judgment A applies the rubric.\nWinner: Judgment A": 0,
    "**Winner:** Judgement B": 1,
    "Winner: [Judgment B]": 1,
    "winner = judgment a": 0,
    "Winner: Judgment A ... no, Winner: Judgment B": 1,  # the conclusion counts
    "Both are fine.": None,
    "Winner: Judgment C": None,
    "Winner: A": None,  # not the required format
    "": None,
}


@pytest.mark.parametrize(("text", "expected"), list(VERDICTS.items()))
def test_verdicts_are_parsed_from_the_meta_rubrics_format_or_counted_as_unparsed(text, expected):
    assert judge.parse_winner(text) == expected


def test_the_meta_judge_prompt_shows_the_rubric_the_response_and_both_judgments():
    text = judge.meta_judge_prompt("How do I boil an egg?", "Boil it 9 minutes.", "Score: 4", "Score: 1")
    assert text.startswith("Review the user's question and the corresponding response, along with two judgments.")
    assert judge.CRITERIA in text and judge.CRITERIA in judge.judge_prompt("p", "r")
    assert "User: How do I boil an egg?\n\n<response>Boil it 9 minutes.</response>" in text
    assert "Judgment A: <judgment>Score: 4</judgment>\n\nJudgment B: <judgment>Score: 1</judgment>" in text
    assert text.endswith('"Winner: [Judgment A | Judgment B]".') and "{" not in text


def test_every_two_judgments_are_compared_in_both_positions():
    assert judge.battles(2) == [(0, 1), (1, 0)]
    assert sorted(judge.battles(3)) == sorted([(a, b) for a in range(3) for b in range(3) if a != b])


def test_position_weights_undo_a_meta_judge_that_favours_one_position():
    assert judge.position_weights([0, 0, 0, 1, None]) == (4 / 6, 4 / 2)  # A wins 3 of 4 parsed verdicts
    assert judge.position_weights([0, 0, None]) == judge.position_weights([]) == (1.0, 1.0)


def test_judgment_scores_rank_by_weighted_wins_and_stay_finite():
    # 0 beats 1 and 2 in both positions, 1 beats 2 in both: a strict order
    verdicts = [(0, 1, 0), (1, 0, 1), (0, 2, 0), (2, 0, 1), (1, 2, 0), (2, 1, 1)]
    scores = judge.judgment_scores(3, verdicts)
    assert scores[0] > scores[1] > scores[2] and all(math.isfinite(s) for s in scores)
    assert judge.judgment_scores(3, verdicts)[0] == pytest.approx(-judge.judgment_scores(3, verdicts)[2])
    # a win each way is a tie; unparsed verdicts count for nobody
    assert judge.judgment_scores(2, [(0, 1, 0), (1, 0, 0), (0, 1, None)]) == pytest.approx([0.0, 0.0])
    # a meta-judge biased to position A: a win in B (0 over 2, shown second) is the rarer, stronger evidence
    biased = [(0, 1, 0), (1, 0, 0), (1, 2, 0), (2, 1, 0), (0, 2, 0), (2, 0, 1)]
    weights = judge.position_weights([w for _, _, w in biased])
    assert weights == (6 / 10, 6 / 2)
    plain, weighted = judge.judgment_scores(3, biased), judge.judgment_scores(3, biased, weights)
    assert weighted[0] - weighted[2] > plain[0] - plain[2] > 0


def test_a_judgment_pair_is_the_best_against_the_worst_or_says_why_not():
    verdicts = [(0, 1, 1), (1, 0, 0), (0, 2, 1), (2, 0, 0), (1, 2, 0), (2, 1, 1)]  # 1 > 2 > 0
    assert judge.judgment_pair(["Score: 1", "Score: 4", "Score: 3"], verdicts, (1, 1)) == judge.JudgmentPair(1, 0)
    assert judge.judgment_pair(["Score: 1", "Score: 4"], [(0, 1, None), (1, 0, None)], (1, 1)) == "tied_judgments"
    assert judge.judgment_pair(["same", "same"], [(0, 1, 1), (1, 0, 0)], (1, 1)) == "identical_judgments"


def test_the_meta_judge_examines_the_response_whose_judgments_disagree_most():
    sets = [["Score: 3", "Score: 4"],  # spread 1
            ["Score: 1", "Score: 5"],  # spread 4: examined
            ["Score: 2", "Score: 2"]]  # different texts? no: identical, cannot be compared
    assert judge.most_disputed(sets) == 1
    assert judge.most_disputed([["Score: 2", "Score: 2"], ["x", "x"]]) is None
    # an unparsed judgment next to a parsed one is a disagreement of its own; the first of equals wins
    assert judge.most_disputed([["Score: 2", "Looks good"], ["Score: 3", "Score: 3."]]) == 0
    assert judge.most_disputed([["a", "b"], ["c", "d"]]) == 0
