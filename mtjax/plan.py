"""Memory planner: per-device bytes of every resident thing in a Mutual-Taught run, phase by phase.

    python -m mtjax.plan --config=configs/mt.py:paper --mesh=1,8,1 --device_gib=80

A run never holds everything at once; it moves through phases, and the peak is the largest phase:

* always resident — π_{t-1}, r_{t-1} and r0 (stored in ``param_dtype``), plus π_t after the E-step;
* sampling — + the KV cache of one sampling batch (scoring needs less: no cache, one forward);
* dpo_train — + the trained copy's float32 weights, gradients, AdamW moments and the activations of
  one micro-batch (reference log-probs are precomputed, so no reference model runs during training);
* rm_train — the same for the reward model (two sequences per pair, no vocabulary logits).

Sharding follows `mtjax.sharding`: parameters and optimizer state are split over ``fsdp x tensor``,
the batch over ``data x fsdp``, heads / MLP width / vocab over ``tensor``. Activation estimates
(per layer, bytes): without remat ``T·B·D·(34 + 5·N·T/D)/2·b`` (Korthikanti et al., 2022, with the
attention-score term dropped when a fused attention kernel is used), with remat only the layer inputs
``2·B·T·D·b`` plus one layer's working set; the float32 logits and their gradient (``2·B·T·V·4``)
are counted separately because with a 128k vocabulary they dominate. These are estimates: check them
against a measured peak (``jax.devices()[0].memory_stats()['peak_bytes_in_use']``) on your hardware.
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


def _activations(shape: ModelConfig, rows: int, length: int, compute_bytes: int, remat: bool, fused_attention: bool,
                 tensor: int) -> tuple[float, float]:
    """(decoder activations, float32 logits + their gradient) for `rows` sequences on one device."""
    d, t = shape.hidden_size, length
    if remat:
        saved_inputs = shape.num_layers * rows * t * d * compute_bytes  # one [B,T,D] per block
        one_layer = rows * t * 34 * d * compute_bytes / 2 / tensor  # recomputed block during backward
        decoder = saved_inputs + one_layer
    else:
        score_term = 0 if fused_attention else 5 * shape.num_heads * t
        decoder = shape.num_layers * rows * t * (34 * d + score_term) * compute_bytes / 2 / tensor
    logits = 2 * rows * t * shape.vocab_size * 4 / tensor
    return decoder, logits


def plan(cfg, mesh: Mesh, remat: bool | None = None, fused_attention: bool = True) -> dict[str, dict[str, float]]:
    """Bytes per device, per phase and item (see the module docstring)."""
    policy, rm = shape_of(cfg.policy.source), shape_of(cfg.reward_model.source)
    compute = DTYPE_BYTES[cfg.policy.dtype]
    stored = DTYPE_BYTES[cfg.policy.param_dtype]
    n_pol, n_rm = num_params(policy, "causal_lm"), num_params(rm, "reward")
    shards = mesh.param_shards
    sampling_rows = max(1, cfg.sampling.batch_size // mesh.batch_shards)
    length = cfg.dpo.max_length
    kv = (2 * policy.num_layers * sampling_rows * length * policy.num_kv_heads * policy.head_dim
          * compute / max(1, min(mesh.tensor, policy.num_kv_heads)))
    remat = bool(cfg.policy.remat) if remat is None else remat
    # The driver keeps π_{t-1}, r_{t-1} and r0 on device through an iteration (π_t joins after the E-step).
    resident = {"π_{t-1} params": n_pol * stored / shards, "r_{t-1} and r0 params": 2 * n_rm * stored / shards}

    def train_state(n: int, shape: ModelConfig, section, lm_head: bool) -> dict[str, float]:
        pairs = max(1, section.batch_size // section.num_micro_batches // mesh.batch_shards)
        decoder, logits = _activations(shape, 2 * pairs, section.max_length, compute, remat, fused_attention,
                                       mesh.tensor)  # chosen and rejected rows
        items = {"trained copy: float32 weights": n * 4 / shards, "gradients (float32)": n * 4 / shards,
                 "AdamW moments (float32)": 2 * n * 4 / shards, "activations (one micro-batch)": decoder}
        if lm_head:
            items["float32 logits + grad"] = logits
        return items

    phases = {
        "e_step sampling": {**resident, "KV cache": kv},
        "e_step dpo_train": {**resident, **train_state(n_pol, policy, cfg.dpo, lm_head=True)},
        "m_step sampling": {**resident, "π_t params": n_pol * stored / shards, "KV cache": kv},
        "m_step rm_train": {**resident, "π_t params": n_pol * stored / shards,
                            **train_state(n_rm, rm, cfg.rm, lm_head=False)},
    }
    return {name: {**items, "total": sum(items.values())} for name, items in phases.items()}


def format_plan(result: dict[str, dict[str, float]], device_gib: float | None) -> str:
    lines = []
    for phase, items in result.items():
        lines.append(f"{phase}")
        for name, value in items.items():
            lines.append(f"  {name:<32}{value / GIB:10.2f} GiB")
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
    print(format_plan(plan(cfg, Mesh(*sizes), remat), args.device_gib))


if __name__ == "__main__":
    main(sys.argv[1:])
