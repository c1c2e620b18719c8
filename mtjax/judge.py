"""LLM-as-a-judge rewards: the Self-Rewarding rubric, its prompt and the parsing of its verdicts, in one place.

Self-Rewarding language models (Yuan et al. 2024) and Meta-Rewarding (Wu et al. 2024) replace the reward model
with the policy itself (or any model named as the judge) prompted with an additive 5-point rubric; each response
is judged N times by sampling and its reward is the mean of the parsed scores.

    judge_prompt(prompt, response)      the rubric prompt of the Self-Rewarding paper (its Figure 2)
    parse_score(judgment)               the score a judgment concludes with ("Score: 4"), or None
    judge_rewards(judge, prompts, responses, num_judgments)
                                        mean parsed score per response (NaN when no judgment parsed) and
                                        the counts of judgments made and left unparsed

A judgment that cannot be parsed is counted, never guessed: a response whose N judgments all fail has no
reward and cannot enter a pair.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence

MAX_SCORE = 5

# Yuan et al. 2024, "Self-Rewarding Language Models", Figure 2 (the LLM-as-a-Judge prompt): its criteria, then
# the template around them.
CRITERIA = """- Add 1 point if the response is relevant and provides some information related to the user's inquiry, \
even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not \
completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, \
regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found in \
blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the \
user's question directly and comprehensively, and is well-organized and helpful, even if there is slight room \
for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, \
without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and \
insightful answer."""

RUBRIC = """Review the user's question and the corresponding response using the additive 5-point scoring system \
described below. Points are accumulated based on the satisfaction of each criterion:
{criteria}

User: {prompt}

<response>{response}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"
Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate \
the response in alignment with this additive scoring model, we'll systematically attribute points based on the \
outlined criteria."""

# Wu et al. 2024, "Meta-Rewarding Language Models", Figure 2 (the LLM-as-a-Meta-Judge prompt), as we read it:
# two judgments of one response, the same criteria, a verdict "Winner: Judgment A" or "Winner: Judgment B".
META_RUBRIC = """Review the user's question and the corresponding response, along with two judgments. Determine \
which judgment is more accurate according to the rubric provided below. The rubric used for the initial judgments \
is as follows:
{criteria}

User: {prompt}

<response>{response}</response>

Judgment A: <judgment>{judgment_a}</judgment>

Judgment B: <judgment>{judgment_b}</judgment>

After examining the original question, response, and both judgments:
- Explain which judgment is more accurate according to the original rubric and why. Consider factors such as \
adherence to the rubric, accuracy in evaluating the response, and consistency in applying the criteria.
- Conclude with a clear statement of which judgment is better using the format: \
"Winner: [Judgment A | Judgment B]"."""

# "Score: 4", "**Score:** 4", "score = 3.5", "Score: 4/5", "Score: <4>"; the last one in the text counts.
_SCORE = re.compile(r"score\W{0,4}?[:=]\W{0,4}?(\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*5)?", re.IGNORECASE)


def rubric_prompt_text(prompt: str | Sequence[Mapping[str, str]]) -> str:
    """A prompt as one string for the rubric: chat turns as "Role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{turn['role'].capitalize()}: {turn['content']}" for turn in prompt)


def judge_prompt(prompt: str, response: str) -> str:
    """The rubric filled in with one prompt and response (the judge's chat template is applied by its sampler)."""
    return RUBRIC.format(criteria=CRITERIA, prompt=prompt, response=response)


def parse_score(judgment: str) -> float | None:
    """The score the judgment concludes with: the last "Score: X" with 0 <= X <= 5; None if there is none or it
    is out of range (a judge that writes "Score: 7" has not followed the rubric)."""
    matches = _SCORE.findall(judgment)
    if not matches:
        return None
    score = float(matches[-1])
    return score if 0.0 <= score <= MAX_SCORE else None


@dataclasses.dataclass(frozen=True)
class JudgedRewards:
    rewards: list[float]  # mean parsed score per response; NaN where no judgment parsed
    judgments: int  # judgments made
    unparsed: int  # judgments without a valid score
    unjudged: int  # responses left without a reward

    def summary(self) -> dict[str, float]:
        return {"judgments": self.judgments, "judgments_unparsed": self.unparsed,
                "responses_unjudged": self.unjudged,
                "unparsed_fraction": self.unparsed / self.judgments if self.judgments else 0.0}


def judge_rewards(judge: Callable[[list[str]], list[str]], prompts: Sequence[str], responses: Sequence[str],
                  num_judgments: int) -> JudgedRewards:
    """Rewards of `responses` (one per prompt) from `num_judgments` sampled judgments each; `judge` maps rubric
    prompts to judgment texts (e.g. `evaluate.generate_fn_from_model` of the policy at a temperature > 0)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if num_judgments < 1:
        raise ValueError(f"num_judgments must be >= 1, got {num_judgments}")
    queries = [judge_prompt(p, r) for p, r in zip(prompts, responses, strict=True) for _ in range(num_judgments)]
    texts = judge(queries) if queries else []
    if len(texts) != len(queries):
        raise ValueError(f"the judge returned {len(texts)} judgments for {len(queries)} queries")
    scores = [parse_score(t) for t in texts]
    rewards = []
    for i in range(len(responses)):
        parsed = [s for s in scores[i * num_judgments:(i + 1) * num_judgments] if s is not None]
        rewards.append(sum(parsed) / len(parsed) if parsed else math.nan)
    unparsed = sum(s is None for s in scores)
    return JudgedRewards(rewards, len(scores), unparsed, sum(math.isnan(r) for r in rewards))


# ----------------------------------------------------------------------------- Meta-Rewarding's meta-judge

# "Winner: Judgment A", "**Winner:** Judgement B", "Winner: [Judgment B]"; the last one in the text counts.
_WINNER = re.compile(r"winner\W{0,4}?[:=]\W{0,6}?judge?ment\W{0,2}?([AB])\b", re.IGNORECASE)


def meta_judge_prompt(prompt: str, response: str, judgment_a: str, judgment_b: str) -> str:
    """The meta-judge's prompt: which of two judgments of one response follows the rubric better."""
    return META_RUBRIC.format(criteria=CRITERIA, prompt=prompt, response=response, judgment_a=judgment_a,
                              judgment_b=judgment_b)


def parse_winner(verdict: str) -> int | None:
    """The position the meta-judge's verdict names: 0 for "Judgment A", 1 for "Judgment B", None for neither."""
    matches = _WINNER.findall(verdict)
    return None if not matches else "AB".index(matches[-1].upper())


def battles(num_judgments: int) -> list[tuple[int, int]]:
    """The meta-judge's comparisons of one response's judgments: every ordered pair (first shown as A), so each
    pair of judgments is compared in both positions."""
    return [(a, b) for a in range(num_judgments) for b in range(num_judgments) if a != b]


def position_weights(winners: Sequence[int | None]) -> tuple[float, float]:
    """Weights of a win in position A and in position B that undo the meta-judge's position bias (Meta-Rewarding
    weighs each win by the inverse of how often its position wins): a position that wins a fraction f of the
    parsed verdicts gets 1 / (2 f); (1, 1) when one position never wins or nothing parsed."""
    parsed = [w for w in winners if w is not None]
    wins = [parsed.count(0), parsed.count(1)]
    if not all(wins):
        return 1.0, 1.0
    return len(parsed) / (2 * wins[0]), len(parsed) / (2 * wins[1])


def judgment_scores(num_judgments: int, verdicts: Sequence[tuple[int, int, int | None]],
                    weights: tuple[float, float] = (1.0, 1.0), prior: float = 0.5,
                    iterations: int = 200) -> list[float]:
    """Elo-like scores (log Bradley-Terry strengths, mean 0) of one response's judgments from the meta-judge's verdicts
    `(first, second, winner position or None)`, each win weighted by its position's weight, fitted by the
    minorise-maximise iteration with `prior` pseudo-wins each way between every two judgments (so a judgment
    that never loses stays finite). Unparsed verdicts count for nobody."""
    n = num_judgments
    wins = [[prior if i != j else 0.0 for j in range(n)] for i in range(n)]
    for first, second, winner in verdicts:
        if winner is not None:
            w, loser = (first, second) if winner == 0 else (second, first)
            wins[w][loser] += weights[winner]
    strength = [1.0] * n
    for _ in range(iterations):
        new = []
        for i in range(n):
            games = sum((wins[i][j] + wins[j][i]) / (strength[i] + strength[j]) for j in range(n) if j != i)
            new.append(sum(wins[i]) / games if games else strength[i])
        center = math.exp(sum(map(math.log, new)) / n)  # scores centred on 0, as Elo ratings around a mean
        strength = [x / center for x in new]
    return [math.log(x) for x in strength]


@dataclasses.dataclass(frozen=True)
class JudgmentPair:
    chosen: int  # index of the better judgment among the response's
    rejected: int


def judgment_pair(judgments: Sequence[str], verdicts: Sequence[tuple[int, int, int | None]],
                  weights: tuple[float, float]) -> JudgmentPair | str:
    """The meta-judge's preference between one response's judgments: the highest- against the lowest-scored
    (`judgment_scores`), or why there is none ("tied_judgments": the verdicts do not separate them;
    "identical_judgments": the two texts are the same)."""
    scores = judgment_scores(len(judgments), verdicts, weights)
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    if scores[best] - scores[worst] < 1e-6:
        return "tied_judgments"
    if judgments[best] == judgments[worst]:
        return "identical_judgments"
    return JudgmentPair(best, worst)


def most_disputed(judgment_sets: Sequence[Sequence[str]]) -> int | None:
    """Which of a prompt's judged responses the meta-judge examines: the one whose judgments disagree most (the
    widest range of parsed scores; unparsed judgments count as a disagreement of their own), among those with
    at least two distinct judgment texts; None when no response has two."""
    def spread(texts: Sequence[str]) -> tuple[float, int]:
        scores = [s for s in map(parse_score, texts) if s is not None]
        return (max(scores) - min(scores) if scores else 0.0, int(len(scores) < len(texts)))

    candidates = [i for i, texts in enumerate(judgment_sets) if len(set(texts)) >= 2]
    return max(candidates, key=lambda i: (*spread(judgment_sets[i]), -i)) if candidates else None
