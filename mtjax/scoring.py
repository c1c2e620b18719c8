"""Reward scores of the policy's responses, in the reward model's own tokenization and chat template.

When the reward model shares the policy's tokenizer and chat template, the sampled token ids are scored
as they are (a decode/re-encode round trip would, for instance, append an EOS to a truncated response:
not what the RM saw in training). When they differ (Llama-3-Instruct policy, FsfairX RM with its own
template), each response is decoded to text without its stop token and the conversation is rendered
again in the reward model's template, as TRL does with a separate reward processing class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtjax.prompt_sets import Prompt


def same_tokenization(a: Any, b: Any) -> bool:
    """Whether two tokenizers turn the same conversation into the same ids (same vocabulary, special tokens
    and chat template)."""
    if a is b:
        return True
    return (a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template
            and a.bos_token_id == b.bos_token_id and a.eos_token_id == b.eos_token_id)


def chat_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def conversation_ids(tokenizer: Any, prompt: Prompt, response: str) -> list[int]:
    """Ids of a whole (prompt, response) conversation in `tokenizer`'s chat template; the template carries any
    BOS, so no special tokens are added again."""
    text = tokenizer.apply_chat_template([*chat_messages(prompt), {"role": "assistant", "content": response}],
                                        tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class RewardScorer:
    """Scores (prompt, response) pairs with a reward model; see the module docstring for the two paths.

    `models` provides `reward` (the RewardModel module), `tokenizer` / `reward_tokenizer`, `stop_ids` (the
    policy's) and `reward_pad_id`; `sampling` the batching (`batch_size`, `max_batch_tokens`)."""

    def __init__(self, models: Any, sampling: Any, mesh=None):
        self.models, self.sampling, self.mesh = models, sampling, mesh
        self.reuses_ids = same_tokenization(models.tokenizer, models.reward_tokenizer)
        self.context = models.reward.cfg.max_position_embeddings
        self.truncated = 0  # re-rendered conversations cut to the RM's context (counted, never silent)

    def _score(self, rm_params: Any, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
               progress: bool = True) -> np.ndarray:
        from mtjax.sampling import score

        return np.asarray(score(self.models.reward, rm_params, [list(p) for p in prompts], [list(r) for r in responses],
                                batch_size=self.sampling.batch_size, max_batch_tokens=self.sampling.max_batch_tokens,
                                pad_token_id=self.models.reward_pad_id, mesh=self.mesh, progress=progress),
                          np.float64)

    def response_text(self, response_ids: Sequence[int]) -> str:
        from mtjax.sampling import decode

        return decode(self.models.tokenizer, list(response_ids), self.models.stop_ids)

    def _rendered(self, prompts: Sequence[Prompt], texts: Sequence[str]) -> list[list[int]]:
        rows = []
        for prompt, text in zip(prompts, texts, strict=True):
            ids = conversation_ids(self.models.reward_tokenizer, prompt, text)
            if len(ids) > self.context:
                self.truncated += 1
                ids = ids[: self.context]
            rows.append(ids)
        return rows

    def score_ids(self, rm_params: Any, prompts: Sequence[Prompt], prompt_ids: Sequence[Sequence[int]],
                  response_ids: Sequence[Sequence[int]], progress: bool = True) -> np.ndarray:
        """Rewards of sampled responses: `prompt_ids` / `response_ids` in the policy's tokenization, `prompts`
        the prompts they render (used when the RM tokenizes differently)."""
        if self.reuses_ids:
            return self._score(rm_params, prompt_ids, response_ids, progress)
        texts = [self.response_text(r) for r in response_ids]
        return self._score(rm_params, self._rendered(prompts, texts), [[] for _ in texts], progress)

    def score_texts(self, rm_params: Any, prompts: Sequence[Prompt], responses: Sequence[str],
                    known_ids: Mapping[tuple[str, str], tuple[Sequence[int], Sequence[int]]] | None = None,
                    progress: bool = True) -> np.ndarray:
        """Rewards of text responses (references, benchmark answers). A (prompt text, response) found in
        `known_ids` is scored on its sampled ids; others are tokenised: the response with the policy's first
        stop id when ids are reused, else the conversation in the RM's template."""
        from mtjax import data
        from mtjax.prompt_sets import prompt_text

        known_ids = known_ids or {}
        if not self.reuses_ids:
            pairs = [known_ids.get((prompt_text(p), r)) for p, r in zip(prompts, responses, strict=True)]
            texts = [self.response_text(k[1]) if k else r for k, r in zip(pairs, responses, strict=True)]
            return self._score(rm_params, self._rendered(prompts, texts), [[] for _ in texts], progress)
        tok, eos = self.models.tokenizer, self.models.stop_ids[0]
        p_ids, r_ids = [], []
        for prompt, response in zip(prompts, responses, strict=True):
            known = known_ids.get((prompt_text(prompt), response))
            p, r = (known[0], known[1]) if known else (data.chat_prompt_ids(tok, prompt),
                                                       data.response_ids(tok, response, eos))
            if len(p) + len(r) > self.context:  # a long reference answer or benchmark pair
                self.truncated += 1
                p, r = [*p, *r][: self.context], []
            p_ids.append(p)
            r_ids.append(r)
        return self._score(rm_params, p_ids, r_ids, progress)

    def text_score_fn(self, rm_params: Any, known_ids=None):
        """`score_fn(prompts, responses) -> rewards` for the text-based evaluators of `mtjax.evaluate`."""
        return lambda prompts, responses: self.score_texts(rm_params, list(prompts), list(responses), known_ids,
                                                           progress=False)
