"""Verifiable constraint families: IFEval instruction ids, seeded kwargs and natural-language renderings.

The generator draws 1-3 mutually compatible families per prompt. Semantics (what counts as followed)
are the IFEval checkers of ``if-verifiable``; this module only decides which constraints may be asked
together and how to say them. Two families conflict when no response can satisfy both (all lowercase
vs all capitals), when one makes the other trivial or ill-defined (repeating a request that names a
forbidden word), or when their formats clash (JSON output vs a postscript after it).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Kwargs = dict[str, Any]

# Words for keyword constraints: common, topic-neutral, comma-free.
KEYWORDS = (
    "balance",
    "bridge",
    "candle",
    "compass",
    "garden",
    "harbor",
    "journey",
    "lantern",
    "window",
    "river",
    "season",
    "signal",
    "thread",
    "puzzle",
    "ladder",
    "mirror",
    "anchor",
    "meadow",
    "orchard",
    "pebble",
    "rhythm",
    "spark",
    "summit",
    "ticket",
    "voyage",
    "whistle",
    "harvest",
    "blanket",
    "canvas",
    "echo",
)
# Forbidden words are ones an answer is likely to use, so that avoiding them is a real constraint.
FORBIDDEN_CANDIDATES = (
    "very",
    "really",
    "important",
    "thing",
    "things",
    "good",
    "also",
    "because",
    "people",
    "great",
    "many",
    "just",
    "always",
    "make",
    "time",
    "help",
    "best",
    "new",
    "use",
    "way",
)
FIRST_WORDS = ("first", "however", "finally", "next", "overall", "today", "imagine", "meanwhile", "still")
END_PHRASES = (
    "Is there anything else I can help with?",
    "Let me know if you have additional questions.",
    "That is all for now.",
    "Hope this helps!",
    "Thank you for reading.",
    "Any other questions?",
)
LANGUAGES = {"es": "Spanish", "fr": "French", "de": "German", "it": "Italian", "pt": "Portuguese"}
SECTION_SPLITTERS = ("Section", "SECTION", "Part", "PART")
RARE_LETTERS = ("q", "z", "x", "j", "k", "v")
COMMON_LETTERS = ("y", "w", "b", "g", "p")

REPEAT_PROMPT = "combination:repeat_prompt"
REPEAT_PROMPT_TEXT = (
    "First repeat the request word for word without change, then give your answer (1. do not say any words "
    "or characters before repeating the request; 2. the request you need to repeat does not include this "
    "sentence)"
)


@dataclass(frozen=True)
class PromptContext:
    """What a kwargs sampler may depend on: the other families chosen and the words already used."""

    chosen_ids: frozenset[str]
    used_words: frozenset[str]


@dataclass(frozen=True)
class ConstraintFamily:
    """One IFEval instruction id with its kwargs sampler and renderings (format strings on kwargs)."""

    instruction_id: str
    sample_kwargs: Callable[[random.Random, PromptContext], Kwargs]
    render: Callable[[Kwargs, random.Random], str]


def _no_kwargs(rng: random.Random, ctx: PromptContext) -> Kwargs:
    return {}


def _fixed(*templates: str) -> Callable[[Kwargs, random.Random], str]:
    def render(kwargs: Kwargs, rng: random.Random) -> str:
        return rng.choice(templates).format(**kwargs)

    return render


def _quoted(words: list[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else " ".join(quoted[:-1]) + " and " + quoted[-1]


def _relation_text(relation: str, unit: str, number: int) -> str:
    return f"at least {number} {unit}" if relation == "at least" else f"fewer than {number} {unit}"


def _fresh_words(rng: random.Random, pool: tuple[str, ...], k: int, ctx: PromptContext) -> list[str]:
    return rng.sample([w for w in pool if w not in ctx.used_words], k)


def _sample_capital_word_frequency(rng: random.Random, ctx: PromptContext) -> Kwargs:
    relation = rng.choice(("at least", "less than"))
    frequency = rng.randint(2, 8) if relation == "at least" else rng.randint(2, 5)
    return {"capital_relation": relation, "capital_frequency": frequency}


def _render_capital_word_frequency(kwargs: Kwargs, rng: random.Random) -> str:
    amount = _relation_text(kwargs["capital_relation"], "times", kwargs["capital_frequency"])
    return rng.choice(
        (
            f"In your response, words with all capital letters should appear {amount}.",
            f"Use words written entirely in capital letters {amount} in your answer.",
        )
    )


def _render_bullets(kwargs: Kwargs, rng: random.Random) -> str:
    n = kwargs["num_bullets"]
    return rng.choice(
        (
            f"Your answer must contain exactly {n} bullet points. Use the markdown bullet points such as:\n"
            "* This is point 1.\n* This is point 2",
            f"Include exactly {n} bullet points in markdown format (each line starting with '* ').",
        )
    )


def _render_highlights(kwargs: Kwargs, rng: random.Random) -> str:
    n = kwargs["num_highlights"]
    return rng.choice(
        (
            f"Highlight at least {n} sections in your answer with markdown, i.e. *highlighted section*.",
            f"Make sure to highlight at least {n} parts of your response using markdown, like *this part*.",
        )
    )


def _sample_sections(rng: random.Random, ctx: PromptContext) -> Kwargs:
    splitters = SECTION_SPLITTERS
    if "change_case:capital_word_frequency" in ctx.chosen_ids:  # "SECTION 1" would count as a capital word
        splitters = tuple(w for w in SECTION_SPLITTERS if not w.isupper())
    return {"section_spliter": rng.choice(splitters), "num_sections": rng.randint(2, 5)}


def _render_sections(kwargs: Kwargs, rng: random.Random) -> str:
    word, n = kwargs["section_spliter"], kwargs["num_sections"]
    return rng.choice(
        (
            f"Your response must have {n} sections. Mark the beginning of each section with {word} X, "
            "such as:\n"
            f"{word} 1\n[content of section 1]\n{word} 2\n[content of section 2]",
            f"Organize your answer into {n} sections, starting each one with '{word} 1', '{word} 2' "
            "and so on.",
        )
    )


def _render_placeholders(kwargs: Kwargs, rng: random.Random) -> str:
    n = kwargs["num_placeholders"]
    return rng.choice(
        (
            f"The response must contain at least {n} placeholders represented by square brackets, "
            "such as [address].",
            f"Include at least {n} placeholders in square brackets, like [name], for details to fill in "
            "later.",
        )
    )


def _render_postscript(kwargs: Kwargs, rng: random.Random) -> str:
    marker = kwargs["postscript_marker"]
    return rng.choice(
        (
            f"At the end of your response, please explicitly add a postscript starting with {marker}",
            f"Finish with a postscript that begins with {marker}",
        )
    )


def _sample_existence(rng: random.Random, ctx: PromptContext) -> Kwargs:
    return {"keywords": _fresh_words(rng, KEYWORDS, rng.randint(1, 2), ctx)}


def _render_existence(kwargs: Kwargs, rng: random.Random) -> str:
    words = _quoted(kwargs["keywords"])
    return rng.choice(
        (
            f"Include the keywords {words} in the response.",
            f"Make sure your answer mentions {words}.",
        )
    )


def _sample_forbidden(rng: random.Random, ctx: PromptContext) -> Kwargs:
    return {"forbidden_words": _fresh_words(rng, FORBIDDEN_CANDIDATES, rng.randint(2, 3), ctx)}


def _render_forbidden(kwargs: Kwargs, rng: random.Random) -> str:
    words = _quoted(kwargs["forbidden_words"])
    return rng.choice(
        (
            f"Do not include the words {words} in the response.",
            f"Avoid using the words {words} anywhere in your answer.",
        )
    )


def _sample_keyword_frequency(rng: random.Random, ctx: PromptContext) -> Kwargs:
    relation = (
        "at least" if REPEAT_PROMPT in ctx.chosen_ids else rng.choice(("at least", "at least", "less than"))
    )
    frequency = rng.randint(2, 4)
    return {"keyword": _fresh_words(rng, KEYWORDS, 1, ctx)[0], "frequency": frequency, "relation": relation}


def _render_keyword_frequency(kwargs: Kwargs, rng: random.Random) -> str:
    amount = _relation_text(kwargs["relation"], "times", kwargs["frequency"])
    word = kwargs["keyword"]
    return rng.choice(
        (
            f'In your response, the word "{word}" should appear {amount}.',
            f'Use the word "{word}" {amount} in your answer.',
        )
    )


def _sample_letter_frequency(rng: random.Random, ctx: PromptContext) -> Kwargs:
    if rng.random() < 0.6:
        return {
            "letter": rng.choice(RARE_LETTERS),
            "let_frequency": rng.randint(2, 6),
            "let_relation": "at least",
        }
    return {
        "letter": rng.choice(COMMON_LETTERS),
        "let_frequency": rng.randint(5, 12),
        "let_relation": "less than",
    }


def _render_letter_frequency(kwargs: Kwargs, rng: random.Random) -> str:
    amount = _relation_text(kwargs["let_relation"], "times", kwargs["let_frequency"])
    letter = kwargs["letter"]
    return rng.choice(
        (
            f"In your response, the letter {letter} should appear {amount}.",
            f"Make sure the letter '{letter}' appears {amount} in your answer.",
        )
    )


def _sample_number_words(rng: random.Random, ctx: PromptContext) -> Kwargs:
    if REPEAT_PROMPT in ctx.chosen_ids or rng.random() < 0.5:
        # Targets stay reachable in the ~256-token responses the loop samples (300 words would not be).
        return {"relation": "at least", "num_words": rng.choice((50, 80, 100, 120, 150))}
    return {"relation": "less than", "num_words": rng.choice((40, 60, 80, 100, 150))}


def _render_number_words(kwargs: Kwargs, rng: random.Random) -> str:
    amount = _relation_text(kwargs["relation"], "words", kwargs["num_words"])
    return rng.choice((f"Answer with {amount}.", f"Your response should contain {amount}."))


# Families that force several paragraphs, items or sections: a tight sentence cap would fight them.
STRUCTURAL = frozenset({
    "length_constraints:number_paragraphs",
    "length_constraints:nth_paragraph_first_word",
    "detectable_format:number_bullet_lists",
    "detectable_format:multiple_sections",
    "combination:two_responses",
})


def _sample_number_sentences(rng: random.Random, ctx: PromptContext) -> Kwargs:
    if REPEAT_PROMPT in ctx.chosen_ids or ctx.chosen_ids & STRUCTURAL or rng.random() < 0.5:
        return {"relation": "at least", "num_sentences": rng.randint(3, 10)}
    return {"relation": "less than", "num_sentences": rng.randint(3, 6)}


def _render_number_sentences(kwargs: Kwargs, rng: random.Random) -> str:
    amount = _relation_text(kwargs["relation"], "sentences", kwargs["num_sentences"])
    return rng.choice((f"Your response should contain {amount}.", f"Write {amount} in total."))


def _render_paragraphs(kwargs: Kwargs, rng: random.Random) -> str:
    n = kwargs["num_paragraphs"]
    return rng.choice(
        (
            f"There should be {n} paragraphs. Paragraphs are separated with the markdown divider: ***",
            f"Write exactly {n} paragraphs and put the markdown divider *** between paragraphs.",
        )
    )


def _sample_nth_paragraph(rng: random.Random, ctx: PromptContext) -> Kwargs:
    num_paragraphs = rng.randint(2, 5)
    return {
        "num_paragraphs": num_paragraphs,
        "nth_paragraph": rng.randint(1, num_paragraphs),
        "first_word": rng.choice(FIRST_WORDS),
    }


def _render_nth_paragraph(kwargs: Kwargs, rng: random.Random) -> str:
    n, nth, word = kwargs["num_paragraphs"], kwargs["nth_paragraph"], kwargs["first_word"]
    return rng.choice(
        (
            f"There should be {n} paragraphs. Paragraphs and only paragraphs are separated with each other "
            "by two "
            f"new lines as if it was '\\n\\n' in python. Paragraph {nth} must start with word {word}.",
            f"Write {n} paragraphs separated by blank lines; paragraph number {nth} has to begin with the "
            "word "
            f'"{word}".',
        )
    )


def _words_of(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _sample_end_phrase(rng: random.Random, ctx: PromptContext) -> Kwargs:
    # A forbidden word inside the required closing phrase ("help") would make the pair unsatisfiable.
    return {"end_phrase": rng.choice([p for p in END_PHRASES if not _words_of(p) & ctx.used_words])}


def _render_end_phrase(kwargs: Kwargs, rng: random.Random) -> str:
    phrase = kwargs["end_phrase"]
    return rng.choice(
        (
            f"Finish your response with this exact phrase {phrase} No other words should follow this phrase.",
            f'End your answer with the exact phrase "{phrase}" and nothing after it.',
        )
    )


def _render_language(kwargs: Kwargs, rng: random.Random) -> str:
    name = LANGUAGES[kwargs["language"]]
    return rng.choice(
        (
            f"Your ENTIRE response should be in {name} language, no other language is allowed.",
            f"Please respond only in {name}.",
        )
    )


FAMILIES: tuple[ConstraintFamily, ...] = (
    ConstraintFamily(
        "punctuation:no_comma",
        _no_kwargs,
        _fixed(
            "In your entire response, refrain from the use of any commas.",
            "Do not use any commas in your response.",
        ),
    ),
    ConstraintFamily(
        "change_case:english_lowercase",
        _no_kwargs,
        _fixed(
            "Your entire response should be in English, and in all lowercase letters. "
            "No capital letters are allowed.",
            "Write your whole answer in English using only lowercase letters.",
        ),
    ),
    ConstraintFamily(
        "change_case:english_capital",
        _no_kwargs,
        _fixed(
            "Your entire response should be in English, and in all capital letters.",
            "Write your whole answer in English using only capital letters.",
        ),
    ),
    ConstraintFamily(
        "change_case:capital_word_frequency", _sample_capital_word_frequency, _render_capital_word_frequency
    ),
    ConstraintFamily(
        "detectable_format:json_format",
        _no_kwargs,
        _fixed(
            "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
            "Format your entire answer as valid JSON.",
        ),
    ),
    ConstraintFamily(
        "detectable_format:title",
        _no_kwargs,
        _fixed(
            "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
            "Give your response a title wrapped in double angular brackets, like <<my title>>.",
        ),
    ),
    ConstraintFamily(
        "detectable_format:number_bullet_lists",
        lambda rng, ctx: {"num_bullets": rng.randint(2, 6)},
        _render_bullets,
    ),
    ConstraintFamily(
        "detectable_format:number_highlighted_sections",
        lambda rng, ctx: {"num_highlights": rng.randint(1, 4)},
        _render_highlights,
    ),
    ConstraintFamily("detectable_format:multiple_sections", _sample_sections, _render_sections),
    ConstraintFamily(
        "detectable_content:number_placeholders",
        lambda rng, ctx: {"num_placeholders": rng.randint(1, 4)},
        _render_placeholders,
    ),
    ConstraintFamily(
        "detectable_content:postscript",
        lambda rng, ctx: {"postscript_marker": rng.choice(("P.S.", "P.P.S"))},
        _render_postscript,
    ),
    ConstraintFamily("keywords:existence", _sample_existence, _render_existence),
    ConstraintFamily("keywords:forbidden_words", _sample_forbidden, _render_forbidden),
    ConstraintFamily("keywords:frequency", _sample_keyword_frequency, _render_keyword_frequency),
    ConstraintFamily("keywords:letter_frequency", _sample_letter_frequency, _render_letter_frequency),
    ConstraintFamily("length_constraints:number_words", _sample_number_words, _render_number_words),
    ConstraintFamily(
        "length_constraints:number_sentences", _sample_number_sentences, _render_number_sentences
    ),
    ConstraintFamily(
        "length_constraints:number_paragraphs",
        lambda rng, ctx: {"num_paragraphs": rng.randint(2, 5)},
        _render_paragraphs,
    ),
    ConstraintFamily(
        "length_constraints:nth_paragraph_first_word", _sample_nth_paragraph, _render_nth_paragraph
    ),
    ConstraintFamily(
        "startend:end_checker", _sample_end_phrase, _render_end_phrase
    ),
    ConstraintFamily(
        "startend:quotation",
        _no_kwargs,
        _fixed(
            "Wrap your entire response with double quotation marks.",
            "Put your whole answer inside double quotation marks.",
        ),
    ),
    ConstraintFamily(
        "combination:two_responses",
        _no_kwargs,
        _fixed(
            "Give two different responses. Responses and only responses should be separated by 6 asterisk "
            "symbols: ******.",
        ),
    ),
    # prompt_to_repeat is filled in by the generator: it is the whole request that precedes this sentence.
    ConstraintFamily(REPEAT_PROMPT, _no_kwargs, _fixed(REPEAT_PROMPT_TEXT)),
    ConstraintFamily(
        "language:response_language",
        lambda rng, ctx: {"language": rng.choice(sorted(LANGUAGES))},
        _render_language,
    ),
)
FAMILY_BY_ID: dict[str, ConstraintFamily] = {f.instruction_id: f for f in FAMILIES}

# Pairs that may not appear in one prompt (made symmetric below).
_CONFLICTS: dict[str, set[str]] = {
    "change_case:english_lowercase": {
        "change_case:english_capital",
        "change_case:capital_word_frequency",
        "detectable_format:multiple_sections",
    },
    "change_case:english_capital": {
        "change_case:capital_word_frequency",
        "detectable_format:multiple_sections",
    },
    "detectable_format:json_format": {
        "punctuation:no_comma",
        "detectable_format:title",
        "detectable_format:number_bullet_lists",
        "detectable_format:number_highlighted_sections",
        "detectable_format:multiple_sections",
        "detectable_content:postscript",
        "startend:end_checker",
        "startend:quotation",
        "length_constraints:number_paragraphs",
        "length_constraints:nth_paragraph_first_word",
        "combination:two_responses",
    },
    "combination:two_responses": {
        "startend:quotation",
        "length_constraints:number_paragraphs",
        "length_constraints:nth_paragraph_first_word",
        "detectable_content:postscript",
        "detectable_format:multiple_sections",
        "detectable_format:number_bullet_lists",
    },
    "length_constraints:number_paragraphs": {
        "length_constraints:nth_paragraph_first_word",
        "detectable_format:multiple_sections",
    },
    "length_constraints:nth_paragraph_first_word": {"detectable_format:multiple_sections"},
    "keywords:forbidden_words": {"keywords:existence", "keywords:frequency"},
    "length_constraints:number_words": {"length_constraints:number_sentences"},
}
# Families with a short list of allowed companions (everything else conflicts).
_ONLY_WITH: dict[str, set[str]] = {
    # Repeating the request copies its text into the answer, which would satisfy or break most other
    # constraints by itself (a forbidden word, a comma, a "[placeholder]" example, "P.S.").
    REPEAT_PROMPT: {
        "startend:end_checker",
        "change_case:english_lowercase",
        "change_case:english_capital",
        "length_constraints:number_words",
        "length_constraints:number_sentences",
        "keywords:frequency",
    },
    # The language checker needs the whole answer in that language; English keywords, phrases and the
    # English-only case checks cannot hold then.
    "language:response_language": {
        "punctuation:no_comma",
        "length_constraints:number_paragraphs",
        "detectable_format:number_highlighted_sections",
        "detectable_format:number_bullet_lists",
        "detectable_format:title",
        "detectable_content:postscript",
        "startend:quotation",
        "length_constraints:number_words",
        "length_constraints:number_sentences",
        "detectable_content:number_placeholders",
    },
}


def _conflict_table() -> dict[str, frozenset[str]]:
    table: dict[str, set[str]] = {f.instruction_id: set() for f in FAMILIES}
    for a, others in _CONFLICTS.items():
        for b in others:
            table[a].add(b)
            table[b].add(a)
    for a, allowed in _ONLY_WITH.items():
        for b in table:
            if b != a and b not in allowed:
                table[a].add(b)
                table[b].add(a)
    return {k: frozenset(v) for k, v in table.items()}


CONFLICTS: dict[str, frozenset[str]] = _conflict_table()


def compatible(instruction_ids: list[str] | tuple[str, ...]) -> bool:
    """True when the ids are distinct, known families and no two of them conflict."""
    if len(set(instruction_ids)) != len(instruction_ids):
        return False
    for i, a in enumerate(instruction_ids):
        if a not in CONFLICTS:
            return False
        if any(b in CONFLICTS[a] for b in instruction_ids[i + 1 :]):
            return False
    return True


@dataclass(frozen=True)
class SampledConstraints:
    instruction_ids: tuple[str, ...]
    kwargs: tuple[Kwargs, ...]
    texts: tuple[str, ...]


def sample_constraints(rng: random.Random, num_constraints: int) -> SampledConstraints:
    """Draw up to ``num_constraints`` compatible families with kwargs and renderings.

    Fewer come back only if no compatible family is left (never with the current table for n <= 3).
    ``combination:repeat_prompt`` is always placed last, since it repeats everything before it.
    """
    chosen: list[str] = []
    while len(chosen) < num_constraints:
        candidates = [
            f.instruction_id
            for f in FAMILIES
            if f.instruction_id not in chosen and not any(c in CONFLICTS[f.instruction_id] for c in chosen)
        ]
        if not candidates:
            break
        chosen.append(rng.choice(candidates))
    if REPEAT_PROMPT in chosen:
        chosen.remove(REPEAT_PROMPT)
        chosen.append(REPEAT_PROMPT)
    used_words: set[str] = set()
    kwargs_list: list[Kwargs] = []
    for instruction_id in chosen:
        family = FAMILY_BY_ID[instruction_id]
        kwargs = family.sample_kwargs(rng, PromptContext(frozenset(chosen), frozenset(used_words)))
        used_words.update(kwargs.get("keywords", ()))
        used_words.update(kwargs.get("forbidden_words", ()))
        used_words.update(_words_of(kwargs.get("end_phrase", "")))
        if "keyword" in kwargs:
            used_words.add(kwargs["keyword"])
        kwargs_list.append(kwargs)
    leave_room_for_required_text(kwargs_list)
    texts = [FAMILY_BY_ID[i].render(kw, rng) for i, kw in zip(chosen, kwargs_list, strict=True)]
    return SampledConstraints(tuple(chosen), tuple(kwargs_list), tuple(texts))


def required_text(kwargs_list: list[Kwargs]) -> list[str]:
    """Text the other constraints force into every passing response (keywords, phrases, markers)."""
    texts: list[str] = []
    for kwargs in kwargs_list:
        texts += kwargs.get("keywords", [])
        if kwargs.get("relation") == "at least" and "keyword" in kwargs:
            texts += [kwargs["keyword"]] * kwargs["frequency"]
        texts += [kwargs[k] for k in ("end_phrase", "postscript_marker", "first_word") if k in kwargs]
        if "section_spliter" in kwargs:
            texts += [kwargs["section_spliter"]] * kwargs["num_sections"]
    return texts


def leave_room_for_required_text(kwargs_list: list[Kwargs]) -> None:
    """Raise "fewer than N" letter and capital-word limits above what the required text already uses.

    E.g. "the letter p fewer than 5 times" with a "P.P.S" postscript and the closing phrase "Hope this
    helps!" (5 p's) could never be satisfied; the limit becomes the forced count plus a margin.
    """
    forced = required_text(kwargs_list)
    for kwargs in kwargs_list:
        if kwargs.get("let_relation") == "less than":
            count = sum(t.lower().count(kwargs["letter"]) for t in forced)
            kwargs["let_frequency"] = max(kwargs["let_frequency"], count + 3)
        if kwargs.get("capital_relation") == "less than":
            # All-capital tokens such as "P.S", "I" or "PART" count; one more margin for "I" in the text.
            count = sum(sum(w.isupper() for w in re.findall(r"[\w.]+", t)) for t in forced)
            kwargs["capital_frequency"] = max(kwargs["capital_frequency"], count + 2)
