"""A word-level tokenizer built in code for the synthetic testbed: one id per vocabulary word.

It exposes the part of the transformers tokenizer interface that `mtjax.data`, `mtjax.sampling` and the
EM driver use (`apply_chat_template`, `__call__(text, add_special_tokens=...)["input_ids"]`, `decode`,
`eos/pad/bos_token_id`, `len`), so prompts and responses flow through the same helpers as with a real
model. Text is words separated by single spaces; tokenising is splitting, decoding is joining, so
`decode(encode(text)) == text` and a chat prompt's ids are a prefix of the ids of prompt + response.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = {"system": "<system>", "user": "<user>", "assistant": "<assistant>"}
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS.values())


class SyntheticTokenizer:
    """Word-level tokenizer over `SPECIAL_TOKENS + words` (ids in that order, so pad = 0, bos = 1, eos = 2).

    Chat rendering: ``<s> <user> WORDS`` per message (``<system>`` / ``<assistant>`` likewise; assistant
    turns end with ``</s>``), then ``<assistant>`` as the generation prompt.
    """

    # What `mtjax.scoring.same_tokenization` compares: the rendering is fixed in code (see the class docstring).
    chat_template = "synthetic: <s> <role> words per message, </s> after an assistant turn; <assistant> to generate"

    def __init__(self, words: Sequence[str]):
        vocab = [*SPECIAL_TOKENS, *words]
        duplicated = sorted({w for w in vocab if vocab.count(w) > 1})
        if duplicated:
            raise ValueError(f"tokenizer words must be distinct and not special tokens; repeated: {duplicated}")
        bad = [w for w in words if not w or any(c.isspace() for c in w)]
        if bad:
            raise ValueError(f"tokenizer words must be non-empty and hold no whitespace; got {bad!r}")
        self.vocab: tuple[str, ...] = tuple(vocab)
        self._ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_token, self.bos_token, self.eos_token = PAD, BOS, EOS
        self.pad_token_id, self.bos_token_id, self.eos_token_id = (self._ids[t] for t in (PAD, BOS, EOS))
        self.all_special_ids = [self._ids[t] for t in SPECIAL_TOKENS]

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._ids)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._ids[token]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of the space-separated words of `text` (a BOS first with `add_special_tokens`)."""
        unknown = [w for w in text.split() if w not in self._ids]
        if unknown:
            raise ValueError(f"text {text!r} holds words outside the synthetic vocabulary: {unknown[:5]}")
        ids = [self._ids[w] for w in text.split()]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"token id {i} is outside the synthetic vocabulary of {len(self.vocab)} ids")
            if not (skip_special_tokens and i in self.all_special_ids):
                out.append(self.vocab[i])
        return " ".join(out)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str | list[int]:
        parts = [BOS]
        for index, message in enumerate(messages):
            role = message.get("role")
            if role not in ROLE_TOKENS:
                raise ValueError(f"messages[{index}] has role {role!r}; expected one of {sorted(ROLE_TOKENS)}")
            parts += [ROLE_TOKENS[role], message.get("content", "").strip()]
            if role == "assistant":
                parts.append(EOS)
        if add_generation_prompt:
            parts.append(ROLE_TOKENS["assistant"])
        text = " ".join(p for p in parts if p)
        return self.encode(text) if tokenize else text

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes the word list (`synthetic_vocab.json`); `from_pretrained` reads it back."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        words = list(self.vocab[len(SPECIAL_TOKENS):])
        (path / "synthetic_vocab.json").write_text(json.dumps({"words": words}))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SyntheticTokenizer:
        file = Path(directory) / "synthetic_vocab.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: not a directory written by SyntheticTokenizer.save_pretrained")
        return cls(json.loads(file.read_text())["words"])

    def __repr__(self) -> str:
        return f"SyntheticTokenizer({len(self)} ids)"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, SyntheticTokenizer) and other.vocab == self.vocab

    def __hash__(self) -> int:
        return hash(self.vocab)
