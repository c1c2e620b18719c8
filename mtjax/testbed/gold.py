"""Gold reward: code-checked satisfaction of IFEval/IFBench-style verifiable instructions.

This is the ground truth of the testbed: it labels the base reward model's "human" preference pairs,
scores the policy per iteration and judges reward-model accuracy. The constraint semantics are the
checkers of the PyPI package ``if-verifiable`` (Google's IFEval and AllenAI's IFBench registries);
this module only runs them with the official IFEval protocol:

* strict: the instruction is followed by the response as is;
* loose: it is followed by any of 8 variants (first line, last line or both removed; ``*`` removed),
  which forgives markdown and chatty openings/closings.

A row's ``kwargs`` may carry ``None`` for unused keys (the hub's ``google/IFEval`` layout); those are
dropped. Checkers that need NLTK data we cannot ship (IFBench's POS tagger and stop-word list) give
``None`` results ("unscorable") and are counted, never silently treated as pass or fail.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mtjax.testbed.offline_nltk import ensure_offline_punkt, nltk_downloads_blocked

Mode = Literal["strict", "loose"]
Benchmark = Literal["ifeval", "ifbench", "auto"]


@functools.cache
def instruction_registry(benchmark: Literal["ifeval", "ifbench"]) -> Mapping[str, type]:
    """The checker classes of one benchmark, keyed by instruction id, loaded with offline NLTK."""
    ensure_offline_punkt()
    _make_langdetect_deterministic()
    if benchmark == "ifeval":
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    elif benchmark == "ifbench":
        # IFBench's util module calls nltk.download() at import time; refuse it (we are offline).
        with nltk_downloads_blocked():
            from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT
    else:
        raise ValueError(f"benchmark must be 'ifeval' or 'ifbench', got {benchmark!r}")
    return INSTRUCTION_DICT


def _make_langdetect_deterministic() -> None:
    # langdetect samples n-grams at random; without a fixed seed the language checks (all lowercase /
    # all capitals / response language) can flip between runs on short texts.
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0


def _checker_class(instruction_id: str, benchmark: Benchmark) -> type:
    if benchmark != "auto":
        registry = instruction_registry(benchmark)
        if instruction_id not in registry:
            raise ValueError(f"unknown {benchmark} instruction id {instruction_id!r}")
        return registry[instruction_id]
    for name in ("ifeval", "ifbench"):
        registry = instruction_registry(name)
        if instruction_id in registry:
            return registry[instruction_id]
    raise ValueError(f"unknown instruction id {instruction_id!r}: not in the IFEval or IFBench registry")


@dataclass(frozen=True)
class InstructionResult:
    """One instruction's verdicts; ``None`` means the checker could not run offline (see ``error``)."""

    instruction_id: str
    strict: bool | None
    loose: bool | None
    error: str | None = None


@dataclass(frozen=True)
class GoldResult:
    """Per-instruction verdicts for one response and the rewards derived from them."""

    instructions: tuple[InstructionResult, ...]

    @property
    def num_unscorable(self) -> int:
        return sum(r.strict is None for r in self.instructions)

    @property
    def scorable(self) -> bool:
        """True when every instruction could be checked (needed for prompt-level accuracy)."""
        return self.num_unscorable == 0 and len(self.instructions) > 0

    def verdicts(self, mode: Mode) -> list[bool]:
        """The pass/fail list of the scorable instructions."""
        _check_mode(mode)
        values = [r.strict if mode == "strict" else r.loose for r in self.instructions]
        return [v for v in values if v is not None]

    def reward(self, mode: Mode = "strict") -> float:
        """Fraction of the (scorable) instructions followed; NaN when none could be checked."""
        verdicts = self.verdicts(mode)
        return sum(verdicts) / len(verdicts) if verdicts else float("nan")

    def all_followed(self, mode: Mode = "strict") -> bool:
        verdicts = self.verdicts(mode)
        return bool(verdicts) and all(verdicts)


def _check_mode(mode: str) -> None:
    if mode not in ("strict", "loose"):
        raise ValueError(f"mode must be 'strict' or 'loose', got {mode!r}")


def loose_variants(response: str) -> list[str]:
    """IFEval's loose-mode response variants (the response itself first)."""
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    base = [response, remove_first, remove_last, remove_both]
    return base[:1] + [response.replace("*", "")] + base[1:] + [v.replace("*", "") for v in base[1:]]


def normalize_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Drop ``None`` values (unused keys in the hub layout)."""
    return {k: v for k, v in (kwargs or {}).items() if v is not None}


def build_checker(
    instruction_id: str, kwargs: Mapping[str, Any] | None, prompt: str, benchmark: Benchmark = "auto"
):
    """Instantiate and configure one if-verifiable checker exactly as IFEval's evaluation does."""
    checker = _checker_class(instruction_id, benchmark)(instruction_id)
    kwargs = normalize_kwargs(kwargs)
    # Checkers draw a random value for a missing or invalid kwarg (IFEval prompt 1122 asks for the
    # "letter" '#', which is replaced by a random letter). Seed that draw from the instruction itself so
    # the gold reward is deterministic, and leave the global random state as it was.
    saved_state = random.getstate()
    random.seed(json.dumps([instruction_id, kwargs], sort_keys=True, default=str))
    try:
        checker.build_description(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad kwargs {kwargs!r} for instruction {instruction_id!r}: {e}") from e
    finally:
        random.setstate(saved_state)
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    return checker


def _follows(checker, text: str) -> bool:
    return bool(text.strip()) and bool(checker.check_following(text))


def check_response(
    instruction_ids: Sequence[str],
    kwargs: Sequence[Mapping[str, Any] | None],
    prompt: str,
    response: str,
    benchmark: Benchmark = "auto",
) -> GoldResult:
    """Check every instruction of a prompt on one response (strict and loose)."""
    if isinstance(instruction_ids, str):
        raise TypeError("instruction_ids must be a sequence of ids, not a single string")
    if len(kwargs) != len(instruction_ids):
        raise ValueError(
            f"{len(instruction_ids)} instruction ids but {len(kwargs)} kwargs dicts: "
            f"{list(instruction_ids)!r}"
        )
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    variants = loose_variants(response)
    results = []
    for instruction_id, instruction_kwargs in zip(instruction_ids, kwargs, strict=True):
        checker = build_checker(instruction_id, instruction_kwargs, prompt, benchmark)
        try:
            strict = _follows(checker, response)
            loose = strict or any(_follows(checker, v) for v in variants[1:])
            results.append(InstructionResult(instruction_id, strict, loose))
        except LookupError as e:  # NLTK data (tagger, stop words) that cannot be had offline
            missing = re.search(r"Resource\s+'?([\w/.-]+)'?\s+not found", str(e))
            what = missing.group(1) if missing else type(e).__name__
            results.append(
                InstructionResult(instruction_id, None, None, f"NLTK resource {what!r} not available offline")
            )
    return GoldResult(tuple(results))


def gold_reward(
    instruction_ids: Sequence[str],
    kwargs: Sequence[Mapping[str, Any] | None],
    prompt: str,
    response: str,
    mode: Mode = "strict",
    benchmark: Benchmark = "auto",
) -> float:
    """Fraction of the prompt's verifiable instructions that the response follows (in [0, 1]).

    ``mode="loose"`` applies IFEval's loose transformations. Per-instruction results:
    :func:`check_response`.
    """
    _check_mode(mode)
    return check_response(instruction_ids, kwargs, prompt, response, benchmark).reward(mode)
