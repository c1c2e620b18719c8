"""Import and export of transformers checkpoints (config.json + safetensors), without torch.

One table maps every HF tensor name to its place in the Flax tree and says how to reshape it;
import and export both read the same table. Everything else (GGUF, reward heads grown from
causal-LM checkpoints) goes through `params_from_hf_tensors`; `load_hf(..., mesh=...)` streams
each shard of each param from the safetensors files with the same table (`_Layout.hf_slice`).
"""

from __future__ import annotations

import contextlib
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
from jax.sharding import Mesh, NamedSharding

from mtjax.models.config import ModelConfig, config_from_hf, config_to_hf
from mtjax.models.llama import CausalLM, RewardModel
from mtjax.sharding import LLAMA_PARTITION_RULES, PartitionRules, tree_shardings

Model = CausalLM | RewardModel
HEADS = ("causal_lm", "reward")


# ----------------------------------------------------------------------------- the mapping table


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one HF tensor becomes a Flax param: optionally transposed (2-D), then one axis split into
    `(heads, head_dim)`. Import, export and the sharded reader all derive from these two fields."""

    transpose: bool = False
    split: tuple[int, Callable[[ModelConfig], int]] | None = None  # (axis after transposing, number of heads)

    def _split_sizes(self, cfg: ModelConfig) -> tuple[int, int, int]:
        axis, n_heads = self.split
        return axis, n_heads(cfg), cfg.head_dim

    def flax_shape(self, hf_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...] | None:
        """The Flax shape `to_flax` gives for an HF tensor of `hf_shape` (None: it cannot be reshaped)."""
        shape = tuple(reversed(hf_shape)) if self.transpose else tuple(hf_shape)
        if self.split is None:
            return shape
        axis, n, h = self._split_sizes(cfg)
        if len(shape) <= axis or shape[axis] != n * h:
            return None
        return shape[:axis] + (n, h) + shape[axis + 1:]

    def to_flax(self, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        w = w.T if self.transpose else w
        if self.split is None:
            return w
        axis, n, h = self._split_sizes(cfg)
        return w.reshape(w.shape[:axis] + (n, h) + w.shape[axis + 1:])

    def to_hf(self, k: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        if self.split is not None:
            axis = self.split[0]
            k = k.reshape(k.shape[:axis] + (-1,) + k.shape[axis + 2:])
        return k.T if self.transpose else k

    def hf_slice(self, index: tuple[slice, ...], flax_shape: tuple[int, ...],
                 cfg: ModelConfig) -> tuple[tuple[slice, ...], Callable[[np.ndarray], np.ndarray]]:
        """The block of the HF tensor that holds the Flax slice `index`, and how to turn it into that slice.

        The block is exactly the requested elements when the split axis is read in whole heads (all
        partition rules shard heads, never head_dim) or within one head. A slice over several heads
        and part of head_dim reads those whole heads, then cuts head_dim after reshaping.
        """
        index = tuple(index) + (slice(None),) * (len(flax_shape) - len(index))
        bounds = []
        for s, dim in zip(index, flax_shape, strict=True):
            start, stop, step = s.indices(dim)
            if step != 1:
                raise ValueError(f"strided slice {s} is not supported")
            bounds.append((start, stop))
        hf_axes = [slice(a, b) for a, b in bounds]
        rest = [slice(None)] * len(bounds)
        split_shape = None
        if self.split is not None:
            axis, _, h = self._split_sizes(cfg)
            (n0, n1), (h0, h1) = bounds[axis], bounds[axis + 1]
            if (h0, h1) == (0, h):
                merged, split_shape = slice(n0 * h, n1 * h), (n1 - n0, h)
            elif n1 - n0 == 1:
                merged, split_shape = slice(n0 * h + h0, n0 * h + h1), (1, h1 - h0)
            else:
                merged, split_shape = slice(n0 * h, n1 * h), (n1 - n0, h)
                rest[axis + 1] = slice(h0, h1)
            hf_axes[axis: axis + 2] = [merged]

        def finish(block: np.ndarray) -> np.ndarray:
            block = block.T if self.transpose else block
            if split_shape is not None:
                axis = self.split[0]
                block = block.reshape(block.shape[:axis] + split_shape + block.shape[axis + 1:])
            return block[tuple(rest)]

        return tuple(reversed(hf_axes)) if self.transpose else tuple(hf_axes), finish


_Q, _KV = (lambda c: c.num_heads), (lambda c: c.num_kv_heads)
_COPY = _Layout()
_TRANSPOSE = _Layout(transpose=True)
_O_PROJ = _Layout(transpose=True, split=(0, _Q))  # HF [D, N*H] -> Flax [N, H, D]


def _heads_in(n_heads: Callable[[ModelConfig], int]) -> _Layout:
    """HF `[N*H, D]` projection -> Flax `[D, N, H]` kernel."""
    return _Layout(transpose=True, split=(1, n_heads))


def _head_bias(n_heads: Callable[[ModelConfig], int]) -> _Layout:
    """HF `[N*H]` -> Flax `[N, H]`."""
    return _Layout(split=(0, n_heads))


# (HF name, Flax path, layout); "{i}" is the layer number.
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
    layout: _Layout


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_ROWS = [_Row(_compile(h), h, _compile(f), f, layout) for h, f, layout in _TABLE]


def _match(name: str, side: str) -> tuple[_Row, str | None] | None:
    for row in _ROWS:
        m = getattr(row, side).match(name)
        if m:
            return row, (m.group(1) if m.groups() else None)
    return None


def hf_to_flax_name(hf_name: str) -> str | None:
    found = _match(hf_name, "hf")
    return None if found is None else found[0].flax_template.replace("{i}", found[1] or "")


# ----------------------------------------------------------------------------- scanned (stacked) layers

# The table names layers one by one ("model/layers_{i}/..."); a `scan_layers` model holds each of those
# params once, stacked on a leading layer axis ("model/layers/..."). Conversion stacks and unstacks here,
# at the edge, so the table, the GGUF reader and the shape checks stay per layer.
_PER_LAYER = re.compile(r"^(.*/)?layers_(\d+)/(.*)$")
_STACKED = re.compile(r"^(.*/)?layers/(.*)$")


def _stacked_path(path: str) -> tuple[str, int] | None:
    """`("model/layers/X", i)` for a per-layer path `model/layers_i/X`, None for any other path."""
    m = _PER_LAYER.match(path)
    return None if m is None else (f"{m.group(1) or ''}layers/{m.group(3)}", int(m.group(2)))


def stack_layers(flat: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Flat per-layer params (`model/layers_i/X`) → the `scan_layers` tree's flat params (`model/layers/X`
    of shape `[num_layers, ...]`); other entries pass through."""
    out: dict[str, Any] = {}
    layers: dict[str, dict[int, Any]] = {}
    for path, value in flat.items():
        found = _stacked_path(path)
        if found is None:
            out[path] = value
        else:
            layers.setdefault(found[0], {})[found[1]] = value
    for path, per_layer in layers.items():
        if sorted(per_layer) != list(range(num_layers)):
            raise ValueError(f"{path}: have layers {sorted(per_layer)}, expected 0..{num_layers - 1}")
        values = [per_layer[i] for i in range(num_layers)]
        stack = jnp.stack if isinstance(values[0], jax.Array) else np.stack
        out[path] = stack(values)
    return out


def unstack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `stack_layers` (works on arrays and on `ShapeDtypeStruct`s)."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        m = _STACKED.match(path)
        if m is None:
            out[path] = value
            continue
        for i in range(value.shape[0]):
            name = f"{m.group(1) or ''}layers_{i}/{m.group(2)}"
            out[name] = jax.ShapeDtypeStruct(value.shape[1:], value.dtype) if isinstance(
                value, jax.ShapeDtypeStruct) else value[i]
    return out


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


class _Placement:
    """Where the tensors of one checkpoint go in `model`'s param tree: the single place that skips,
    maps and shape-checks HF names, and names what is unexpected or missing. Shared by the eager
    (`params_from_hf_tensors`) and the streaming (`params_from_safetensors_sharded`) loaders."""

    def __init__(self, model: Model, source: str):
        self.cfg = model.cfg
        self.source = source
        self.model_shapes = param_shapes(model)  # stacked under scan_layers
        self.expected = unstack_layers(self.model_shapes)  # per layer, as the table names them
        self.unexpected: list[str] = []

    def place(self, hf_name: str, hf_shape: tuple[int, ...]) -> tuple[str, _Layout] | None:
        """`(flax path, layout)` for a tensor to load, None for one to skip (unexpected ones are noted)."""
        if _IGNORED_HF.match(hf_name):
            return None
        found = _match(hf_name, "hf")
        if found is None:
            self.unexpected.append(hf_name)
            return None
        row, layer = found
        path = row.flax_template.replace("{i}", layer or "")
        if path not in self.expected:
            if not path.startswith(("lm_head/", "score/")):  # else: the other head's weights
                self.unexpected.append(hf_name)
            return None
        mapped = row.layout.flax_shape(tuple(hf_shape), self.cfg)
        if mapped != self.expected[path].shape:
            raise ValueError(
                f"{self.source}: tensor {hf_name!r} has shape {tuple(hf_shape)}, which maps to "
                f"{mapped if mapped is not None else 'no valid shape'} for {path}, but the config expects "
                f"{self.expected[path].shape}; config.json and the weights disagree"
            )
        return path, row.layout

    def check_complete(self, loaded: Iterable[str]) -> bool:
        """Raises on unexpected or missing tensors; True when a seeded `score` head must be added."""
        if self.unexpected:
            raise ValueError(f"{self.source}: tensors not part of a {self.cfg.model_type} model: "
                             f"{sorted(self.unexpected)[:10]}")
        loaded = set(loaded)
        new_score = "score/kernel" in self.expected and "score/kernel" not in loaded
        missing = sorted(set(self.expected) - loaded - ({"score/kernel"} if new_score else set()))
        if missing:
            raise ValueError(f"{self.source}: missing tensors for {missing[:10]} (of {len(missing)}); "
                             "is the checkpoint complete and of the right architecture?")
        return new_score

    def score_head(self, seed: int) -> jax.Array:
        return jnp.asarray(init_score_head(self.cfg, seed), dtype=jnp.dtype(self.cfg.param_dtype))


def params_from_hf_tensors(model: Model, tensors: Iterable[tuple[str, np.ndarray]], *, source: str,
                           seed: int = 0) -> dict:
    """Converts `(hf_name, array)` pairs into the Flax param tree of `model`, checking every shape.

    A reward model built from a causal-LM checkpoint drops `lm_head` and gets a seeded `score` head.
    """
    placement = _Placement(model, source)
    pdtype = jnp.dtype(model.cfg.param_dtype)
    flat: dict[str, jax.Array] = {}
    for hf_name, array in tensors:
        target = placement.place(hf_name, np.shape(array))
        if target is not None:
            path, layout = target
            flat[path] = jnp.asarray(layout.to_flax(np.asarray(array), model.cfg), dtype=pdtype)
    if placement.check_complete(flat):
        flat["score/kernel"] = placement.score_head(seed)
    if model.cfg.scan_layers:
        flat = stack_layers(flat, model.cfg.num_layers)
    return traverse_util.unflatten_dict(flat, sep="/")


def params_to_hf_tensors(model: Model, params: Mapping) -> Iterator[tuple[str, np.ndarray]]:
    for path, value in unstack_layers(traverse_util.flatten_dict(dict(params), sep="/")).items():
        found = _match(path, "flax")
        if found is None:
            raise ValueError(f"parameter {path!r} has no HF name; is this an mtjax model's param tree?")
        row, layer = found
        yield row.hf_template.replace("{i}", layer or ""), row.layout.to_hf(np.asarray(value), model.cfg)


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


@contextlib.contextmanager
def _reading(f: Path) -> Iterator[None]:
    try:
        yield
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{f}: could not read safetensors file ({type(e).__name__}: {e}); "
                         "is it truncated or corrupt?") from e


def _read_safetensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    for f in files:
        with _reading(f), safe_open(str(f), framework="numpy") as handle:  # host memory; bf16 via ml_dtypes
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def _read_slice(handle: Any, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """Reads `tensor[index]` from an open safetensors file, and nothing more (the only read of the
    streaming loader; tests wrap it to count what is read)."""
    return handle.get_slice(name)[index]


def _sharded_array(shape: tuple[int, ...], sharding: NamedSharding, dtype: Any,
                   read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array built shard by shard: `read(index)` is called once per distinct index among this
    process's devices (replicas share the block), and only for addressable devices."""
    blocks: dict[tuple, np.ndarray] = {}

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            blocks[key] = np.ascontiguousarray(read(index), dtype=dtype)
        return blocks[key]

    return jax.make_array_from_callback(tuple(shape), sharding, callback, dtype=dtype)


def params_from_safetensors_sharded(model: Model, files: list[Path], mesh: Mesh,
                                    rules: PartitionRules = LLAMA_PARTITION_RULES, *, source: str,
                                    seed: int = 0) -> dict:
    """Like `params_from_hf_tensors` on safetensors `files`, but every param is created directly with
    its NamedSharding from `rules` on `mesh`: each device's shard is read from the file as a slice
    (`safe_open(...).get_slice(name)[...]`), transformed and cast to the param dtype on its own.
    Nothing beyond the requested shards is read (`_Layout.hf_slice` maps every shard the partition
    rules make to one block of the file; only replicated params, e.g. norms, are read whole). Host
    memory holds at most one param's local shards at a time, the full model never sits on one
    device, and in a multi-process run each process reads only the shards of its own devices.
    """
    from safetensors import safe_open

    cfg = model.cfg
    placement = _Placement(model, source)
    pdtype = jnp.dtype(cfg.param_dtype)
    shardings = traverse_util.flatten_dict(
        tree_shardings(traverse_util.unflatten_dict(placement.model_shapes, sep="/"), mesh, rules), sep="/")
    with contextlib.ExitStack() as stack:
        sources: dict[str, tuple[Path, Any, str, _Layout]] = {}
        for f in files:
            with _reading(f):
                handle = stack.enter_context(safe_open(str(f), framework="numpy"))
                entries = [(name, tuple(handle.get_slice(name).get_shape())) for name in handle.keys()]
            for name, hf_shape in entries:
                target = placement.place(name, hf_shape)
                if target is not None:
                    sources[target[0]] = (f, handle, name, target[1])
        new_score = placement.check_complete(sources)

        def reader(path: str) -> Callable[[tuple[slice, ...]], np.ndarray]:
            f, handle, name, layout = sources[path]
            shape = placement.expected[path].shape

            def read(index: tuple[slice, ...]) -> np.ndarray:
                hf_index, finish = layout.hf_slice(index, shape, cfg)
                with _reading(f):
                    block = _read_slice(handle, name, hf_index)
                return finish(block)
            return read

        def stacked_reader(path: str) -> Callable[[tuple[slice, ...]], np.ndarray]:
            """A `model/layers/X` shard: the same block of each of its layers' tensors, stacked."""
            m = _STACKED.match(path)
            per_layer = [reader(f"{m.group(1) or ''}layers_{i}/{m.group(2)}") for i in range(cfg.num_layers)]

            def read(index: tuple[slice, ...]) -> np.ndarray:
                layers = range(*index[0].indices(cfg.num_layers)) if index else range(cfg.num_layers)
                return np.stack([per_layer[i](tuple(index[1:])) for i in layers])
            return read

        targets = [p for p in placement.model_shapes if p != "score/kernel" or not new_score]
        flat = {path: _sharded_array(placement.model_shapes[path].shape, shardings[path], pdtype,
                                     (stacked_reader if _STACKED.match(path) else reader)(path))
                for path in targets}
    if new_score:
        head = np.asarray(placement.score_head(seed))  # [D, num_labels]: small, made whole on the host
        flat["score/kernel"] = _sharded_array(head.shape, shardings["score/kernel"], pdtype, head.__getitem__)
    return traverse_util.unflatten_dict(flat, sep="/")


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
            seed: int = 0, mesh: Mesh | None = None, rules: PartitionRules = LLAMA_PARTITION_RULES,
            **config_overrides: Any) -> tuple[Model, dict]:
    """Loads a transformers Llama/Mistral checkpoint directory as `(model, params)`.

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded index).
      dtype: compute dtype. param_dtype: storage dtype of the params (default: `dtype`).
      head: 'causal_lm' or 'reward'; default from the checkpoint's `architectures`. Asking for
        'reward' on a causal-LM checkpoint builds a reward model with a new score head seeded by `seed`.
      mesh: if given, every param is streamed from the files straight into its shards on `mesh`
        (laid out by `rules`, as `mtjax.sharding.shard_params` would place it); each device's
        shard is read as a slice of its tensor, so the whole model is never on one device or
        (for one tensor) in host memory. Values equal the eager load exactly.
      rules: partition rules for `mesh` (default: `LLAMA_PARTITION_RULES`).
      config_overrides: extra ModelConfig fields, e.g. `remat=True`, `attention_impl='cudnn'`.
    """
    path = Path(path)
    hf = read_hf_config(path)
    head = head or _head_from_architectures(hf)
    cfg = config_from_hf(hf, dtype=_dtype_name(dtype), param_dtype=_dtype_name(param_dtype or dtype),
                         **config_overrides)
    model = make_model(cfg, head)
    files = _safetensor_files(path)
    if mesh is None:
        params = params_from_hf_tensors(model, _read_safetensors(files), source=str(path), seed=seed)
    else:
        params = params_from_safetensors_sharded(model, files, mesh, rules, source=str(path), seed=seed)
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
