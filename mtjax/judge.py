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

# Yuan et al. 2024, "Self-Rewarding Language Models", Figure 2 (the LLM-as-a-Judge prompt).
RUBRIC = """Review the user's question and the corresponding response using the additive 5-point scoring system \
described below. Points are accumulated based on the satisfaction of each criterion:
- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if \
it is incomplete or contains some irrelevant content.
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
insightful answer.

User: {prompt}

<response>{response}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"
Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate \
the response in alignment with this additive scoring model, we'll systematically attribute points based on the \
outlined criteria."""

# "Score: 4", "**Score:** 4", "score = 3.5", "Score: 4/5", "Score: <4>"; the last one in the text counts.
_SCORE = re.compile(r"score\W{0,4}?[:=]\W{0,4}?(\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*5)?", re.IGNORECASE)


def rubric_prompt_text(prompt: str | Sequence[Mapping[str, str]]) -> str:
    """A prompt as one string for the rubric: chat turns as "Role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{turn['role'].capitalize()}: {turn['content']}" for turn in prompt)


def judge_prompt(prompt: str, response: str) -> str:
    """The rubric filled in with one prompt and response (the judge's chat template is applied by its sampler)."""
    return RUBRIC.format(prompt=prompt, response=response)


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
