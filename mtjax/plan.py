"""Memory planner: per-device bytes of every resident thing in a Mutual-Taught run, phase by phase.

    python -m mtjax.plan --config=configs/mt.py:paper --mesh=1,8,1 --device_gib=80

A run never holds everything at once; it moves through phases, and the peak is the largest phase:

* always resident — π_{t-1}, r_{t-1} and r0 (stored in ``param_dtype``), plus π_t after the E-step;
* sampling — + the KV cache of one sampling batch and, with einsum attention, one layer's float32
  scores of the prefill or of a scoring batch (whichever is larger);
* dpo_train — + the trained copy's float32 weights, gradients, AdamW moments and the activations of
  one micro-batch (reference log-probs are precomputed, so no reference model runs during training);
* rm_train — the same for the reward model (two sequences per pair, no vocabulary logits).

Sharding follows `mtjax.sharding`: parameters and optimizer state are split over ``fsdp x tensor``,
the batch over ``data x fsdp``, heads / MLP width / vocab over ``tensor``.

The train-step model (`train_step_bytes`) reads what runs: the attention implementation the model
config resolves to on the target platform (`attention.resolve_attention_impl`), `remat` and
`scan_layers`. Per layer and token, the backward pass keeps ``b·(6D + 6F + 2NH + 2KH)`` bytes
(b = compute dtype bytes; block input and normed input, q/k/v, attention output, the SwiGLU
intermediates) plus, unless attention is the cuDNN kernel, two float32 score-sized tensors
``2·4·N·S`` (masked scores and probabilities; cuDNN keeps its output and a float32 log-sum-exp
``b·NH + 4·N`` instead). The step's activation peak is the larger of two moments: the start of the
backward pass with the float32 logits and their gradient (``2·B·T·V·4``) live, and the backward pass
of one layer (all saved layers plus one layer's working set). With remat under `scan_layers` only each
layer's input ``b·D`` is saved and the working set is the recomputed layer. Remat of unrolled layers
depends on the XLA that compiles the step (`unrolled_remat_kept`): the XLA of jax 0.11 keeps it (on
XLA:CPU within 1 % of the scanned figure), that of jax 0.10 and earlier hoists every recomputation to
the start of the backward pass, which saves nothing, so it is counted as no remat there.
`tests/test_plan.py` checks the estimate against
XLA's own memory analysis of the jitted DPO and RM steps; on a GPU `scripts/gpu_check.py` compares it
with the measured peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mtjax.models.config import ModelConfig, config_from_hf

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Shapes of the models the presets name (so that planning needs no download). Other sources: a local
# HF directory with config.json.
KNOWN_SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, tie_word_embeddings=True),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                                                tie_word_embeddings=False),
}
KNOWN_SHAPES["sfairXC/FsfairX-LLaMA3-RM-v0.1"] = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B-Instruct"]


def num_params(cfg: ModelConfig, head: str) -> int:
    """Parameters of a `CausalLM` (head='causal_lm') or `RewardModel` (head='reward') with this config."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    attn += (h * (cfg.num_heads + 2 * cfg.num_kv_heads) + d) if cfg.attention_bias else 0  # q, k, v, o biases
    mlp = 3 * d * f + ((2 * f + d) if cfg.mlp_bias else 0)
    out = d * cfg.num_labels if head == "reward" else (0 if cfg.tie_word_embeddings else cfg.vocab_size * d)
    return cfg.num_layers * (attn + mlp + 2 * d) + cfg.vocab_size * d + d + out


def shape_of(source: str) -> ModelConfig:
    """The model config a preset's `source` names, without loading any weights."""
    if source == "tiny":
        from mtjax.sources import tiny_config

        return tiny_config(KNOWN_SHAPES["smollm2"]["vocab_size"])
    if source in KNOWN_SHAPES:
        return ModelConfig(**KNOWN_SHAPES[source])
    config = Path(source) / "config.json"
    if not config.is_file():
        raise ValueError(f"model source {source!r}: not a known shape ({', '.join(KNOWN_SHAPES)}) and no "
                         f"{config}; give a local HF directory")
    return config_from_hf(json.loads(config.read_text()))


@dataclasses.dataclass(frozen=True)
class Mesh:
    data: int
    fsdp: int
    tensor: int

    @property
    def param_shards(self) -> int:
        return self.fsdp * self.tensor

    @property
    def batch_shards(self) -> int:
        return self.data * self.fsdp


# Working set of one layer's backward pass, in units of that layer's saved bytes: without remat its
# cotangents; with remat the recomputed forward plus its cotangents. Calibrated against XLA's buffer
# assignment of the CPU train steps (tests/test_plan.py checks other shapes within 15 %).
WORKING_SET_LAYERS = {False: 1.0, True: 1.3}


def layer_bytes_per_token(shape: ModelConfig, length: int, compute_bytes: int, fused: bool, tensor: int = 1) -> float:
    """Bytes one decoder layer keeps per token for its backward pass (no remat), on one device."""
    d, f = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    split = compute_bytes * (6 * f + 2 * q + 2 * kv)  # sharded over `tensor` (heads, MLP width)
    if fused:
        split += compute_bytes * q + 4 * shape.num_heads  # cuDNN: output and float32 log-sum-exp
    else:
        split += 2 * 4 * shape.num_heads * length  # float32 masked scores and probabilities
    return compute_bytes * 6 * d + split / tensor


def unrolled_remat_kept() -> bool:
    """Whether the installed XLA keeps the recomputation of remat-ed unrolled layers in the backward pass
    (jax >= 0.11; measured on XLA:CPU: a 3-layer DPO step's activations went from 75 MiB, as without
    remat, under jax 0.10.2 to 32 MiB, as with scanned layers, under jax 0.11.2)."""
    import jax

    return tuple(int(part) for part in jax.__version__.split(".")[:2]) >= (0, 11)


def train_step_bytes(shape: ModelConfig, head: str, rows: int, length: int, *, platform: str = "gpu",
                     param_shards: int = 1, tensor: int = 1) -> dict[str, float]:
    """Per-device bytes of one jitted train step of `shape` (its dtype, remat, scan_layers and
    attention_impl included) on `rows` sequences of `length` tokens: the float32 train state (weights and
    AdamW moments), the float32 gradients and the activation peak (see the module docstring)."""
    from mtjax.models.attention import resolve_attention_impl

    n = num_params(shape, head)
    compute = DTYPE_BYTES[shape.dtype]
    fused = resolve_attention_impl(shape, platform) == "cudnn"
    tokens = rows * length
    per_layer = layer_bytes_per_token(shape, length, compute, fused, tensor) * tokens
    remat = shape.remat and (shape.scan_layers or unrolled_remat_kept())
    saved = shape.num_layers * (tokens * shape.hidden_size * compute if remat else per_layer)
    backward_of_one_layer = saved + WORKING_SET_LAYERS[remat] * per_layer
    logits = 2 * tokens * shape.vocab_size * 4 / tensor if head == "causal_lm" else 0.0
    return {"trained copy: float32 weights": n * 4 / param_shards, "AdamW moments (float32)": 2 * n * 4 / param_shards,
            "gradients (float32)": n * 4 / param_shards,
            "activations (one micro-batch)": max(saved + logits, backward_of_one_layer)}


def _model_shape(section, source_shape: ModelConfig) -> ModelConfig:
    """The preset's model shape with the section's execution settings (dtype, remat, scan, attention)."""
    get = section.get if hasattr(section, "get") else lambda key, default=None: getattr(section, key, default)
    return source_shape.replace(dtype=get("dtype", "float32"), param_dtype=get("param_dtype", "float32"),
                                remat=bool(get("remat", False)), scan_layers=bool(get("scan_layers", False)),
                                attention_impl=get("attention_impl", "auto") or "auto")


def plan(cfg, mesh: Mesh, remat: bool | None = None, platform: str = "gpu") -> dict[str, dict[str, float]]:
    """Bytes per device, per phase and item (see the module docstring), for a run on `platform`."""
    policy = _model_shape(cfg.policy, shape_of(cfg.policy.source))
    rm = _model_shape(cfg.reward_model, shape_of(cfg.reward_model.source))
    if remat is not None:
        policy, rm = policy.replace(remat=remat), rm.replace(remat=remat)
    compute = DTYPE_BYTES[policy.dtype]
    stored = DTYPE_BYTES[policy.param_dtype]
    n_pol, n_rm = num_params(policy, "causal_lm"), num_params(rm, "reward")
    shards = mesh.param_shards
    sampling_rows = max(1, cfg.sampling.batch_size // mesh.batch_shards)
    length = cfg.dpo.max_length
    kv = (2 * policy.num_layers * sampling_rows * length * policy.num_kv_heads * policy.head_dim
          * compute / max(1, min(mesh.tensor, policy.num_kv_heads)))
    # The KV-cache path (prefill) always runs the einsum attention; scoring runs the RM's resolved one.
    from mtjax.models.attention import resolve_attention_impl

    prompt = max(1, length - cfg.sampling.max_new_tokens)
    prefill_rows = max(1, sampling_rows // max(1, cfg.sampling.num_samples))
    heads_per_device = policy.num_heads / min(mesh.tensor, policy.num_heads)
    scores = prefill_rows * heads_per_device * prompt * length * 4
    if resolve_attention_impl(rm, platform) != "cudnn":
        scores = max(scores, sampling_rows * rm.num_heads / min(mesh.tensor, rm.num_heads) * length * length * 4)
    # The driver keeps π_{t-1}, r_{t-1} and r0 on device through an iteration (π_t joins after the E-step).
    resident = {"π_{t-1} params": n_pol * stored / shards, "r_{t-1} and r0 params": 2 * n_rm * stored / shards}
    if cfg.mt.get("policy_rewards") == "judge_model":  # a fixed LLM judge of its own (`mt.judge_model`)
        judge = _model_shape(cfg.policy, shape_of(cfg.mt.judge_model))
        resident["judge params (mt.judge_model)"] = num_params(judge, "causal_lm") * stored / shards
    sampling = {"KV cache": kv, "attention scores (one layer, einsum)": scores}

    def train_state(shape: ModelConfig, section, head: str) -> dict[str, float]:
        pairs = max(1, section.batch_size // section.num_micro_batches // mesh.batch_shards)
        return train_step_bytes(shape, head, 2 * pairs, section.max_length, platform=platform,
                                param_shards=shards, tensor=mesh.tensor)  # chosen and rejected rows

    phases = {
        "e_step sampling": {**resident, **sampling},
        "e_step dpo_train": {**resident, **train_state(policy, cfg.dpo, "causal_lm")},
        "m_step sampling": {**resident, "π_t params": n_pol * stored / shards, **sampling},
        "m_step rm_train": {**resident, "π_t params": n_pol * stored / shards, **train_state(rm, cfg.rm, "reward")},
    }
    return {name: {**items, "total": sum(items.values())} for name, items in phases.items()}


def format_plan(result: dict[str, dict[str, float]], device_gib: float | None) -> str:
    lines = []
    for phase, items in result.items():
        lines.append(f"{phase}")
        for name, value in items.items():
            lines.append(f"  {name:<38}{value / GIB:10.2f} GiB")
    peak_phase = max(result, key=lambda p: result[p]["total"])
    peak = result[peak_phase]["total"] / GIB
    lines.append(f"peak: {peak:.2f} GiB per device ({peak_phase})")
    if device_gib:
        verdict = "fits" if peak <= 0.9 * device_gib else "does NOT fit"
        lines.append(f"{verdict} a {device_gib:g} GiB device (keeping 10% for XLA workspace and fragmentation)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mtjax.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/mt.py", help="configs/mt.py[:PRESET]")
    parser.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: the config's mesh)")
    parser.add_argument("--device_gib", type=float, default=None, help="device memory to check against")
    parser.add_argument("--remat", choices=["on", "off"], default=None, help="override the config's remat")
    parser.add_argument("--platform", default="gpu", choices=["gpu", "cpu", "tpu"],
                        help="where the run will execute (decides what attention_impl='auto' resolves to)")
    args = parser.parse_args(argv)
    path, _, preset = args.config.partition(":")
    import importlib.util

    spec = importlib.util.spec_from_file_location("mt_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(preset)
    sizes = [int(x) for x in args.mesh.split(",")] if args.mesh else [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    if len(sizes) != 3 or any(s < 1 for s in sizes):
        sys.exit(f"--mesh={args.mesh!r}: expected three positive sizes data,fsdp,tensor (e.g. 1,8,1)")
    remat = None if args.remat is None else args.remat == "on"
    print(f"plan for {args.config}, mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}")
    print(format_plan(plan(cfg, Mesh(*sizes), remat, platform=args.platform), args.device_gib))


if __name__ == "__main__":
    main(sys.argv[1:])
