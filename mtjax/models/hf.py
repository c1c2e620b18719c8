"""Import and export of transformers checkpoints (config.json + safetensors), without torch.

One table maps every HF tensor name to its place in the Flax tree and says how to reshape it;
import and export both read the same table. Everything else (GGUF, reward heads grown from
causal-LM checkpoints) goes through `params_from_hf_tensors`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mtjax.models.config import ModelConfig, config_from_hf, config_to_hf
from mtjax.models.llama import CausalLM, RewardModel

Model = CausalLM | RewardModel
HEADS = ("causal_lm", "reward")


# ----------------------------------------------------------------------------- the mapping table


def _heads_in(n_heads: Callable[[ModelConfig], int]):
    """HF `[N*H, D]` projection ↔ Flax `[D, N, H]` kernel."""
    to_flax = lambda w, c: w.T.reshape(w.shape[1], n_heads(c), c.head_dim)
    to_hf = lambda k, c: k.reshape(k.shape[0], -1).T
    return to_flax, to_hf


def _head_bias(n_heads: Callable[[ModelConfig], int]):
    return (lambda b, c: b.reshape(n_heads(c), c.head_dim)), (lambda b, c: b.reshape(-1))


_COPY = (lambda x, c: x), (lambda x, c: x)
_TRANSPOSE = (lambda x, c: x.T), (lambda x, c: x.T)
_O_PROJ = (
    lambda w, c: w.T.reshape(c.num_heads, c.head_dim, w.shape[0]),  # [D, N*H] -> [N, H, D]
    lambda k, c: k.reshape(-1, k.shape[-1]).T,
)
_Q, _KV = (lambda c: c.num_heads), (lambda c: c.num_kv_heads)

# (HF name, Flax path, (to_flax, to_hf)); "{i}" is the layer number.
_TABLE = [
    ("model.embed_tokens.weight", "model/embed_tokens/embedding", _COPY),
    ("model.norm.weight", "model/norm/scale", _COPY),
    ("lm_head.weight", "lm_head/kernel", _TRANSPOSE),
    ("score.weight", "score/kernel", _TRANSPOSE),
    ("model.layers.{i}.input_layernorm.weight", "model/layers_{i}/input_layernorm/scale", _COPY),
    ("model.layers.{i}.post_attention_layernorm.weight", "model/layers_{i}/post_attention_layernorm/scale", _COPY),
    ("model.layers.{i}.self_attn.q_proj.weight", "model/layers_{i}/self_attn/q_proj/kernel", _heads_in(_Q)),
    ("model.layers.{i}.self_attn.k_proj.weight", "model/layers_{i}/self_attn/k_proj/kernel", _heads_in(_KV)),
    ("model.layers.{i}.self_attn.v_proj.weight", "model/layers_{i}/self_attn/v_proj/kernel", _heads_in(_KV)),
    ("model.layers.{i}.self_attn.q_proj.bias", "model/layers_{i}/self_attn/q_proj/bias", _head_bias(_Q)),
    ("model.layers.{i}.self_attn.k_proj.bias", "model/layers_{i}/self_attn/k_proj/bias", _head_bias(_KV)),
    ("model.layers.{i}.self_attn.v_proj.bias", "model/layers_{i}/self_attn/v_proj/bias", _head_bias(_KV)),
    ("model.layers.{i}.self_attn.o_proj.weight", "model/layers_{i}/self_attn/o_proj/kernel", _O_PROJ),
    ("model.layers.{i}.self_attn.o_proj.bias", "model/layers_{i}/self_attn/o_proj/bias", _COPY),
    ("model.layers.{i}.mlp.gate_proj.weight", "model/layers_{i}/mlp/gate_proj/kernel", _TRANSPOSE),
    ("model.layers.{i}.mlp.up_proj.weight", "model/layers_{i}/mlp/up_proj/kernel", _TRANSPOSE),
    ("model.layers.{i}.mlp.down_proj.weight", "model/layers_{i}/mlp/down_proj/kernel", _TRANSPOSE),
    ("model.layers.{i}.mlp.gate_proj.bias", "model/layers_{i}/mlp/gate_proj/bias", _COPY),
    ("model.layers.{i}.mlp.up_proj.bias", "model/layers_{i}/mlp/up_proj/bias", _COPY),
    ("model.layers.{i}.mlp.down_proj.bias", "model/layers_{i}/mlp/down_proj/bias", _COPY),
]
# Buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class _Row:
    hf: re.Pattern
    hf_template: str
    flax: re.Pattern
    flax_template: str
    to_flax: Callable
    to_hf: Callable


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_ROWS = [_Row(_compile(h), h, _compile(f), f, tf, th) for h, f, (tf, th) in _TABLE]


def _match(name: str, side: str) -> tuple[_Row, str | None] | None:
    for row in _ROWS:
        m = getattr(row, side).match(name)
        if m:
            return row, (m.group(1) if m.groups() else None)
    return None


def hf_to_flax_name(hf_name: str) -> str | None:
    found = _match(hf_name, "hf")
    return None if found is None else found[0].flax_template.replace("{i}", found[1] or "")


# ----------------------------------------------------------------------------- building models


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def make_model(cfg: ModelConfig, head: str) -> Model:
    if head not in HEADS:
        raise ValueError(f"head={head!r}; expected one of {HEADS}")
    return CausalLM(cfg) if head == "causal_lm" else RewardModel(cfg)


def head_of(model: Model) -> str:
    return "reward" if isinstance(model, RewardModel) else "causal_lm"


def param_shapes(model: Model) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat `{path: ShapeDtypeStruct}` of the params `model.init` would create (no compute)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"]
    return traverse_util.flatten_dict(shapes, sep="/")


def init_score_head(cfg: ModelConfig, seed: int) -> np.ndarray:
    """A fresh reward head `[D, num_labels]` ~ N(0, 0.02²), as transformers initialises `score`."""
    key = jax.random.PRNGKey(seed)
    return np.asarray(0.02 * jax.random.normal(key, (cfg.hidden_size, cfg.num_labels), jnp.float32))


def params_from_hf_tensors(model: Model, tensors: Iterable[tuple[str, np.ndarray]], *, source: str,
                           seed: int = 0) -> dict:
    """Converts `(hf_name, array)` pairs into the Flax param tree of `model`, checking every shape.

    A reward model built from a causal-LM checkpoint drops `lm_head` and gets a seeded `score` head.
    """
    cfg = model.cfg
    expected = param_shapes(model)
    pdtype = jnp.dtype(cfg.param_dtype)
    flat: dict[str, jax.Array] = {}
    unexpected = []
    for hf_name, array in tensors:
        if _IGNORED_HF.match(hf_name):
            continue
        found = _match(hf_name, "hf")
        if found is None:
            unexpected.append(hf_name)
            continue
        row, layer = found
        path = row.flax_template.replace("{i}", layer or "")
        if path not in expected:
            if path.startswith(("lm_head/", "score/")):
                continue  # the other head's weights (e.g. lm_head when building a reward model)
            unexpected.append(hf_name)
            continue
        value = row.to_flax(np.asarray(array), cfg)
        if value.shape != expected[path].shape:
            raise ValueError(
                f"{source}: tensor {hf_name!r} has shape {tuple(np.shape(array))}, which maps to "
                f"{value.shape} for {path}, but the config expects {expected[path].shape}; "
                "config.json and the weights disagree"
            )
        flat[path] = jnp.asarray(value, dtype=pdtype)
    if unexpected:
        raise ValueError(f"{source}: tensors not part of a {cfg.model_type} model: {sorted(unexpected)[:10]}")
    if "score/kernel" in expected and "score/kernel" not in flat:
        flat["score/kernel"] = jnp.asarray(init_score_head(cfg, seed), dtype=pdtype)
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(f"{source}: missing tensors for {missing[:10]} (of {len(missing)}); "
                         "is the checkpoint complete and of the right architecture?")
    return traverse_util.unflatten_dict(flat, sep="/")


def params_to_hf_tensors(model: Model, params: Mapping) -> Iterator[tuple[str, np.ndarray]]:
    for path, value in traverse_util.flatten_dict(dict(params), sep="/").items():
        found = _match(path, "flax")
        if found is None:
            raise ValueError(f"parameter {path!r} has no HF name; is this an mtjax model's param tree?")
        row, layer = found
        yield row.hf_template.replace("{i}", layer or ""), row.to_hf(np.asarray(value), model.cfg)


# ----------------------------------------------------------------------------- safetensors files

_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"


def _safetensor_files(path: Path) -> list[Path]:
    if (path / _INDEX).exists():
        try:
            weight_map = json.loads((path / _INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path / _INDEX} is not a valid safetensors index (needs 'weight_map'): {e}") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
    elif (path / _SINGLE).exists():
        files = [path / _SINGLE]
    else:
        present = sorted(p.name for p in path.iterdir())
        hint = " (PyTorch .bin weights are not read; re-save with safe_serialization=True)" if any(
            n.endswith(".bin") for n in present) else ""
        raise FileNotFoundError(f"{path}: no {_SINGLE} or {_INDEX} found; directory holds {present[:10]}{hint}")
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f} is listed in {path / _INDEX} but does not exist")
    return files


def _read_safetensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as handle:  # host memory; bf16 via ml_dtypes
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"{f}: could not read safetensors file ({type(e).__name__}: {e}); "
                             "is it truncated or corrupt?") from e


def read_hf_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory; expected a transformers checkpoint directory "
                                "with config.json and model.safetensors")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json; expected a transformers checkpoint directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e


def _head_from_architectures(hf: Mapping) -> str:
    archs = hf.get("architectures") or []
    return "reward" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"


def load_hf(path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = None, head: str | None = None,
            seed: int = 0, **config_overrides: Any) -> tuple[Model, dict]:
    """Loads a transformers Llama/Mistral checkpoint directory as `(model, params)`.

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded index).
      dtype: compute dtype. param_dtype: storage dtype of the params (default: `dtype`).
      head: 'causal_lm' or 'reward'; default from the checkpoint's `architectures`. Asking for
        'reward' on a causal-LM checkpoint builds a reward model with a new score head seeded by `seed`.
      config_overrides: extra ModelConfig fields, e.g. `remat=True`, `attention_impl='cudnn'`.
    """
    path = Path(path)
    hf = read_hf_config(path)
    head = head or _head_from_architectures(hf)
    cfg = config_from_hf(hf, dtype=_dtype_name(dtype), param_dtype=_dtype_name(param_dtype or dtype),
                         **config_overrides)
    model = make_model(cfg, head)
    params = params_from_hf_tensors(model, _read_safetensors(_safetensor_files(path)), source=str(path), seed=seed)
    return model, params


def save_hf(model: Model, params: Mapping, out_dir: str | os.PathLike, tokenizer: Any = None,
            max_shard_bytes: int = 5 * 2**30) -> Path:
    """Writes `model`/`params` as a transformers checkpoint directory (config.json + safetensors,
    sharded with an index above `max_shard_bytes`), loadable by `AutoModelFor*.from_pretrained`."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = "ForSequenceClassification" if head_of(model) == "reward" else "ForCausalLM"
    arch = ("Mistral" if model.cfg.model_type == "mistral" else "Llama") + kind
    (out / "config.json").write_text(json.dumps(config_to_hf(model.cfg, arch), indent=2))

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in params_to_hf_tensors(model, params):
        value = np.ascontiguousarray(value)
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / _SINGLE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata=metadata)
            weight_map.update({name: fname for name in shard})
        total = sum(v.nbytes for shard in shards for v in shard.values())
        (out / _INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
