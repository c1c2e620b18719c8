"""Tiny random transformers checkpoints for parity tests (built in the test, never downloaded)."""

from __future__ import annotations

import numpy as np
import torch

TINY_CASES = {
    # Llama 3.1 style: GQA and llama3 RoPE scaling (original context shorter than the test inputs'
    # wavelengths, so the scaling is exercised), untied head.
    "llama3_gqa": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                       rope_theta=500000.0, tie_word_embeddings=False),
    # Llama 2 style: multi-head attention, default RoPE, biases on (attention_bias / mlp_bias).
    "llama2_mha_bias": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4,
                            attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    # SmolLM2 style: tied embeddings, GQA 3:1.
    "llama_tied": dict(model_type="llama", num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                       tie_word_embeddings=True),
    # Mistral with a sliding window shorter than the sequence.
    "mistral_window": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=5, tie_word_embeddings=False),
}

VOCAB = 96
PAD_ID = 0


def make_hf_model(case: str, head: str = "causal_lm", seed: int = 0):
    """A float32 transformers model of the given tiny case, with random non-trivial weights."""
    import transformers

    kwargs = dict(TINY_CASES[case])
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("head_dim", 8)
    common = dict(vocab_size=VOCAB, hidden_size=kwargs["num_attention_heads"] * kwargs["head_dim"],
                  intermediate_size=56, num_hidden_layers=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.1)
    config_cls = transformers.LlamaConfig if model_type == "llama" else transformers.MistralConfig
    config = config_cls(**common, **kwargs)
    config.num_labels = 1
    prefix = "Llama" if model_type == "llama" else "Mistral"
    suffix = "ForCausalLM" if head == "causal_lm" else "ForSequenceClassification"
    torch.manual_seed(seed)
    model = getattr(transformers, prefix + suffix)._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms start at 1; perturb them so their mapping is tested
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.eval().float()


def padded_batch(lengths: list[int], total: int, side: str, seed: int = 0):
    """Random token ids (never PAD_ID) padded to `total` on `side` ("right", "left", or "both": the real
    tokens in the middle of the row): (input_ids, attention_mask)."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), total), PAD_ID, np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, n in enumerate(lengths):
        start = {"right": 0, "left": total - n, "both": (total - n) // 2}[side]
        span = slice(start, start + n)
        ids[row, span] = rng.integers(3, VOCAB, size=n)
        mask[row, span] = 1
    return ids, mask


def hf_forward(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()
