"""Tiny Llama-3-shaped checkpoints with their own tokenizer files, built in the test (never downloaded).

The policy has Llama-3's special-token ids (BOS 128000, `<|end_of_text|>` 128001, `<|eot_id|>` 128009) and
its chat template; like Meta-Llama-3-8B-Instruct, its `config.json` names only 128001 as EOS while its
`generation_config.json` names [128001, 128009]. Its weights are random but shaped so that it ends a turn
with `<|eot_id|>` now and then and never emits 128001: the embeddings carry a large constant in dimension 0
which survives the (small) layers and the final norm, so column 0 of the LM head acts as a per-token bias.
The reward model is a `LlamaForSequenceClassification` with the same vocabulary and another chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB_SIZE = 128256
BOS, END_OF_TEXT, START_HEADER, END_HEADER, EOT = 128000, 128001, 128006, 128007, 128009
WORDS = ("the a of to and in is you that it for on with as are be this an or by not can your what how which "
         "write explain why list give describe story poem code python function short answer question please "
         "example summary about one two three time people world water light energy data model help make").split()
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# The reward model's own template: roles upper-cased, no blank line (so its ids differ from the policy's).
RM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] | upper }}<|end_header_id|>"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}")


def make_tokenizer(chat_template: str):
    """A word-level tokenizer over `WORDS` (+ punctuation) with Llama-3's special tokens at their ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers import decoders as dec
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate([*WORDS, *".,?!:;'\"()-"])}}
    for i in range(len(vocab), BOS):
        vocab[f"<|unused_{i}|>"] = i
    specials = {BOS: "<|begin_of_text|>", END_OF_TEXT: "<|end_of_text|>", START_HEADER: "<|start_header_id|>",
                END_HEADER: "<|end_header_id|>", EOT: "<|eot_id|>"}
    for i in range(BOS, VOCAB_SIZE):
        vocab[specials.get(i, f"<|reserved_special_token_{i - BOS}|>")] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = dec.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=specials[BOS],
                                        eos_token=specials[END_OF_TEXT], unk_token="<unk>",
                                        additional_special_tokens=[specials[i] for i in
                                                                   (START_HEADER, END_HEADER, EOT)],
                                        chat_template=chat_template, clean_up_tokenization_spaces=False)
    return tokenizer


def _config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                       rope_theta=500000.0, bos_token_id=BOS, eos_token_id=END_OF_TEXT, tie_word_embeddings=False,
                       initializer_range=0.02, **overrides)


def save_policy(out: Path, seed: int = 0) -> Path:
    """The policy checkpoint folder: safetensors, config.json (EOS 128001 only), generation_config.json
    (EOS [128001, 128009]), tokenizer files with the Llama-3 chat template."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config()).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 8.0  # the constant that becomes a bias through the LM head's column 0
        bias = np.full(VOCAB_SIZE, -20.0)  # unused and special tokens: never sampled
        bias[1:len(WORDS) + 12] = rng.normal(0.0, 0.5, len(WORDS) + 11)
        bias[[1, 2]] = 4.0  # "the", "a": greedy decoding repeats a word (never stops)
        bias[EOT] = 3.0  # a turn ends after ~15 sampled tokens on average
        head = model.lm_head.weight
        head[:, 0] = torch.tensor(bias / 5.66, dtype=head.dtype)  # h[0] ≈ 8 / rms ≈ 5.66 after the final norm
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=BOS, eos_token_id=[END_OF_TEXT, EOT], do_sample=True, temperature=0.6,
                     top_p=0.9).save_pretrained(out)
    make_tokenizer(LLAMA3_TEMPLATE).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == END_OF_TEXT  # as Meta-Llama-3-8B-Instruct's config.json
    return out


def save_reward_model(out: Path, seed: int = 1) -> Path:
    """A LlamaForSequenceClassification (num_labels 1, pad id set) with its own chat template."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_config(num_labels=1, pad_token_id=END_OF_TEXT)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer = make_tokenizer(RM_TEMPLATE)
    tokenizer.pad_token = "<|end_of_text|>"
    tokenizer.save_pretrained(out)
    return out
