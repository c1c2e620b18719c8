"""Flax Llama/Mistral models with causal-LM and reward heads, and their checkpoint converters."""

from mtjax.models.config import ModelConfig, config_from_hf, config_to_hf
from mtjax.models.gguf import load_gguf, load_gguf_tokenizer, load_smollm2, smollm2_gguf_path
from mtjax.models.hf import load_hf, make_model, param_shapes, save_hf
from mtjax.models.llama import CausalLM, KVCache, RewardModel, init_cache, last_valid_index

__all__ = [
    "CausalLM", "KVCache", "ModelConfig", "RewardModel", "config_from_hf", "config_to_hf", "init_cache",
    "last_valid_index", "load_gguf", "load_gguf_tokenizer", "load_hf", "load_smollm2", "make_model",
    "param_shapes", "save_hf", "smollm2_gguf_path",
]
