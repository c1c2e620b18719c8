"""Model configuration shared by the decoder, the HF/GGUF converters and the sharding rules.

One frozen dataclass covers Llama 2, Llama 3/3.1 (GQA, llama3 RoPE scaling) and Mistral (sliding
window). It is hashable, so a Flax module holding it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# "auto": the cuDNN fused kernel where it runs (GPU, bf16/fp16, head_dim a multiple of 8 up to 128), else
# "einsum"; "einsum": mtjax's grouped einsum (any device, the KV-cache path always uses it); "xla" / "cudnn":
# `jax.nn.dot_product_attention` with that implementation (see `mtjax.models.attention`).
SUPPORTED_ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# The fields below "Numerics and execution": how a model runs, not what it is (a checkpoint never sets them).
EXECUTION_FIELDS = ("dtype", "param_dtype", "remat", "attention_impl", "scan_layers")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    num_labels: int = 1
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Numerics and execution (not part of the checkpoint).
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each decoder block in the backward pass (only its input is saved)
    attention_impl: str = "auto"  # one of SUPPORTED_ATTENTION_IMPLS (None is read as "auto")
    # Run the decoder blocks as one `nn.scan` over stacked params (leading layer axis): compile time and
    # program size stop growing with depth. Changes the param tree ("model/layers/..." instead of
    # "model/layers_0/...") and the KV cache (stacked arrays); HF/GGUF conversion stacks at the edge.
    scan_layers: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type={self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.attention_impl is None:  # configs written before "auto" existed
            object.__setattr__(self, "attention_impl", "auto")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in SUPPORTED_DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {', '.join(SUPPORTED_DTYPES)}")
        if self.attention_impl not in SUPPORTED_ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of "
                             f"{', '.join(repr(i) for i in SUPPORTED_ATTENTION_IMPLS)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be a positive int or None")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def hf_architecture(self) -> str:
        return "MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"


def _rope_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Reads RoPE settings from either transformers<5 (`rope_scaling`, `rope_theta`) or >=5
    (`rope_parameters`, which also holds `rope_theta`)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"RoPE type {rope_type!r} in the checkpoint config is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        out["rope_original_max_position"] = int(params["original_max_position_embeddings"])
    return out


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Builds a ModelConfig from a transformers `config.json` dictionary."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json has model_type={model_type!r}; mtjax supports {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(Llama 2/3/3.1, SmolLM2, Mistral)"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf.get('hidden_act')!r} is not supported; expected 'silu'")
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    sliding = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type == "mistral" and hf.get("use_sliding_window") is False:
        sliding = None
    kwargs: dict[str, Any] = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hidden // num_heads),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        sliding_window=int(sliding) if sliding else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        model_type=model_type,
        num_labels=int(hf.get("num_labels", len(hf.get("id2label") or {}) or 1)),
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
        **_rope_from_hf(hf),
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def config_to_hf(cfg: ModelConfig, architecture: str) -> dict[str, Any]:
    """The transformers `config.json` dictionary for `cfg` (readable by transformers 4.48+ and 5.x)."""
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position,
        )
    eos = list(cfg.eos_token_ids)
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        # transformers 4.x reads `rope_scaling`, 5.x reads `rope_parameters`.
        "rope_scaling": None if cfg.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": cfg.param_dtype,
        "num_labels": cfg.num_labels,
        "id2label": {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(cfg.num_labels)},
    }
    if cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    else:
        hf["attention_bias"] = cfg.attention_bias
        hf["mlp_bias"] = cfg.mlp_bias
    return hf
