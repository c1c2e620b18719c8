"""Device mesh, partition rules for the Llama/Mistral parameter tree, and batch shardings.

Every jitted step in `train.py` (and the sampler) places parameters with `tree_shardings` and batches
with `batch_sharding`, so the whole layout of a run is decided here. Mesh axes:

* ``data``   — pure data parallelism (parameters replicated);
* ``fsdp``   — data parallelism with parameters (and optimizer state) sharded on their non-tensor dim;
* ``tensor`` — Megatron-style tensor parallelism over heads, MLP width and vocab.

The batch is split over ``("data", "fsdp")``. Any dimension that does not divide its mesh axis falls back
to replication, so a rule table written for 8B models also runs a 2-layer test model on 8 devices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

PartitionRules = Sequence[tuple[str, P]]

# One row per tensor of docs/model_api.md. Patterns are searched (re.search) in the "/"-joined path, so
# the same table shards params, optimizer moments ("opt_state/.../mu/model/...") and train states.
# Shapes: D hidden, N/K query/kv heads, H head dim, F MLP width, V vocab.
LLAMA_PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    (r"self_attn/[qkv]_proj/kernel$", P("fsdp", "tensor", None)),  # [D, N|K, H]
    (r"self_attn/[qkv]_proj/bias$", P("tensor", None)),  # [N|K, H]
    (r"self_attn/o_proj/kernel$", P("tensor", None, "fsdp")),  # [N, H, D]
    (r"mlp/(gate|up)_proj/kernel$", P("fsdp", "tensor")),  # [D, F]
    (r"mlp/(gate|up)_proj/bias$", P("tensor")),  # [F]
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),  # [F, D]
    (r"score/kernel$", P("fsdp", None)),  # [D, num_labels]
    (r"(scale|bias)$", P()),  # norms, o_proj / down_proj biases: small, replicated
)


# Params of scanned decoder layers (`ModelConfig.scan_layers`: "model/layers/...", not "model/layers_0/...")
# carry a leading layer axis in front of the shapes above; it is never sharded.
SCANNED_LAYERS = re.compile(r"(^|/)layers/")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (default: all). One size may be -1 (fill the rest).

    Uses the first data*fsdp*tensor devices, so a 1x1x1 mesh works on a multi-device host.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes (data, fsdp, tensor) = {tuple(sizes)}: use positive ints and at most one -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh sizes {tuple(sizes)}")
        sizes[sizes.index(-1)] = len(devices) // known
    needed = math.prod(sizes)
    if needed > len(devices):
        raise ValueError(f"mesh (data, fsdp, tensor) = {tuple(sizes)} needs {needed} devices, have {len(devices)}")
    # Auto axes: jit + NamedSharding decide the collectives (the default changed to Explicit in some jax
    # releases, so say it). `AxisType` only exists from jax 0.5.x on; older meshes are Auto anyway.
    axis_type = getattr(jax.sharding, "AxisType", None)
    kwargs = {} if axis_type is None else {"axis_types": (axis_type.Auto,) * len(MESH_AXES)}
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices[:needed], **kwargs)


def path_to_str(path: Sequence[Any]) -> str:
    """Joins a pytree key path with '/', e.g. `model/layers_0/self_attn/q_proj/kernel`."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[name] for name in names)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: PartitionRules = LLAMA_PARTITION_RULES) -> P:
    """The PartitionSpec of one array: the first matching rule, with non-dividing dims replicated.

    Unmatched arrays (step counters, unknown extras) are replicated; a scanned layer's param gets the
    rule's spec behind an unsharded layer axis.
    """
    matched = next(((pattern, spec) for pattern, spec in rules if re.search(pattern, path)), None)
    if matched is None:
        return P()
    pattern, spec = matched
    if SCANNED_LAYERS.search(path):
        spec = P(None, *spec)
    if len(spec) > len(shape):
        raise ValueError(
            f"partition rule {pattern!r} gives {spec} ({len(spec)} dims) for {path!r} of shape {tuple(shape)}"
        )
    axes = [axis if dim % _axis_size(mesh, axis) == 0 else None for axis, dim in zip(spec, shape, strict=False)]
    return P(*axes)


def tree_specs(tree: Any, mesh: Mesh, rules: PartitionRules = LLAMA_PARTITION_RULES) -> Any:
    """PartitionSpecs for every leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s), matched by path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: spec_for(path_to_str(path), np.shape(leaf), mesh, rules), tree
    )


def tree_shardings(tree: Any, mesh: Mesh, rules: PartitionRules = LLAMA_PARTITION_RULES) -> Any:
    """NamedShardings for every leaf of `tree` (params, optimizer state or a whole train state)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_specs(tree, mesh, rules))


def to_global(value: Any, sharding: NamedSharding) -> jax.Array:
    """Places `value` with `sharding`. A host or process-local value must be the same on every process
    (as when all of them computed it from the same seed): each process places only its devices' slices.
    Arrays that already span processes are resharded."""
    if isinstance(value, jax.Array) and (sharding.is_fully_addressable or not value.is_fully_addressable):
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params: Any, mesh: Mesh, rules: PartitionRules = LLAMA_PARTITION_RULES) -> Any:
    """Places a parameter pytree (host or device arrays) on `mesh` by the partition rules."""
    return jax.tree.map(to_global, params, tree_shardings(params, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over ("data", "fsdp"), other dims replicated; a prefix for a batch dict."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh | None) -> int:
    """Per-step (micro-)batch sizes must be multiples of this (1 without a mesh)."""
    if mesh is None:
        return 1
    missing = [a for a in BATCH_AXES if a not in mesh.shape]
    if missing:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}; the batch is split over {BATCH_AXES}, missing {missing}")
    return _axis_size(mesh, BATCH_AXES)


def micro_batches_split(size: int, num_micro_batches: int, mesh: Mesh | None) -> bool:
    """Whether `size` rows split into `num_micro_batches` micro-batches that each divide evenly over the
    data*fsdp devices (the train steps shard a micro-batch's rows over them)."""
    return size % num_micro_batches == 0 and (size // num_micro_batches) % batch_divisor(mesh) == 0


def micro_batch_problems(batches: Mapping[str, tuple[int, int]], mesh: Mesh) -> list[str]:
    """`{section: (batch_size, num_micro_batches)}` checked against `mesh` before a run starts: a batch must split
    into its micro-batches, and the train steps split each micro-batch's rows over the data*fsdp devices, so a
    micro-batch must be a whole multiple of them (a misfit found at the first step would come after the phases
    before it had run)."""
    divisor = batch_divisor(mesh)
    devices = f"data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} of {mesh.size} devices"
    problems = []
    for name, (size, micro) in batches.items():
        if micro_batches_split(size, micro, mesh):
            continue
        where = f"{name}.batch_size={size} in {name}.num_micro_batches={micro}"
        if size % micro:
            problems.append(f"{where}: the batch does not split into {micro} equal micro-batches; use a multiple "
                            f"of {divisor * micro} or fewer micro-batches")
        else:
            problems.append(f"{where}: each micro-batch must be a whole multiple of the data*fsdp mesh size "
                            f"{divisor} ({devices}); use a multiple of {divisor * micro} or set "
                            "--config.mesh.data / --config.mesh.fsdp")
    return problems


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a dict of `[B, ...]` arrays on `mesh`, batch over ("data", "fsdp").

    On one process `batch` is the global batch. With several processes each passes its local rows
    (the global batch is their concatenation in process order).
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value) if not isinstance(value, jax.Array) else value
        if value.ndim == 0:
            raise ValueError(f"batch[{name!r}] is a scalar; every batch entry needs a leading batch dim")
        if jax.process_count() == 1:
            if value.shape[0] % batch_divisor(mesh):
                raise ValueError(
                    f"batch[{name!r}] has {value.shape[0]} rows, not a multiple of the data*fsdp mesh size "
                    f"{batch_divisor(mesh)}"
                )
            out[name] = jax.device_put(value, sharding)
        else:
            out[name] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out


def shard_global_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Like `shard_batch` for a batch that every process holds in full (the EM driver builds the same pairs
    on every process from the same seeds): each process places only its own rows."""
    sharding = batch_sharding(mesh)
    return {name: to_global(value, sharding) for name, value in batch.items()}
