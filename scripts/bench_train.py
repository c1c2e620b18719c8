"""Train-step throughput: mtjax DPO / reward-model steps against the same steps in PyTorch + transformers.

Both sides run the same shapes, dtype and objective: DPO = policy forward+backward on chosen and rejected
plus a frozen reference forward, sigmoid loss, AdamW with grad clipping; RM = Bradley-Terry on a scalar
head. PyTorch uses `LlamaForCausalLM` / `LlamaForSequenceClassification` with sdpa attention (bf16 via
autocast over float32 weights, matching mtjax's bf16 compute over float32 master weights).

MFU is model FLOPs (6N per trained token, 2N per reference token, plus attention) over the peak: the
datasheet dense bf16 peak on a known GPU, otherwise a matmul peak measured here (max of jax and torch).

    python scripts/bench_train.py --shapes smollm2-135m --pairs 1 --seq-len 128 --steps 2
    python scripts/bench_train.py --shapes llama-3.2-1b --pairs 4 --seq-len 2048 --dtype bfloat16 --remat \\
        --json bench.json       # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import sharding, train
from mtjax.models import CausalLM, ModelConfig, RewardModel, config_to_hf

# Architecture shapes (random weights). "llama-3.2-1b" is Llama-3.2-1B: GQA 32/8, tied, llama3 RoPE.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=32, tie_word_embeddings=True),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0),
    "smollm2-360m": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_layers=32, num_heads=15,
                         num_kv_heads=5, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                         num_heads=32, num_kv_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_theta=500000.0, rope_type="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
                         rope_high_freq_factor=4.0, rope_original_max_position=8192,
                         max_position_embeddings=131072),
}

# Dense bf16 datasheet peaks (FLOP/s) by substring of `device_kind`.
GPU_BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}

BETA = 0.1


@dataclasses.dataclass
class Result:
    framework: str
    objective: str
    shape: str
    pairs: int
    seq_len: int
    dtype: str
    step_seconds: float
    tokens_per_second: float
    model_tflops_per_second: float
    mfu: float
    peak_tflops: float
    peak_source: str
    step_seconds_all: list[float]


# ----------------------------------------------------------------------------- shapes and FLOPs


def model_config(shape: str, dtype: str, remat: bool, num_labels: int = 1, **options: Any) -> ModelConfig:
    """`options`: further ModelConfig fields (attention_impl, scan_layers)."""
    return ModelConfig(**SHAPES[shape], dtype=dtype, param_dtype="float32", remat=remat, num_labels=num_labels,
                       pad_token_id=0, **options)


def matmul_params(cfg: ModelConfig, objective: str) -> int:
    """Parameters that take part in a matmul per token (the embedding lookup does not; the LM head does)."""
    attention = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    head = cfg.hidden_size * (cfg.vocab_size if objective == "dpo" else 1)
    return cfg.num_layers * (attention + mlp) + head


def step_flops(cfg: ModelConfig, objective: str, pairs: int, seq_len: int) -> float:
    """Model FLOPs of one step (PaLM appendix B): 2N+4LTd_attn forward per token, 3x that trained.

    DPO trains on 2*pairs sequences and runs the reference forward on them too; RM trains on 2*pairs.
    """
    tokens = 2 * pairs * seq_len
    forward_per_token = 2 * matmul_params(cfg, objective) + 4 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    passes = 3 + (1 if objective == "dpo" else 0)
    return float(tokens * forward_per_token * passes)


def random_batch(cfg: ModelConfig, objective: str, pairs: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length rows (no padding); the loss mask covers everything after a quarter-length prompt."""
    rng = np.random.default_rng(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_input_ids"] = rng.integers(1, cfg.vocab_size, (pairs, seq_len)).astype(np.int32)
        batch[f"{side}_attention_mask"] = np.ones((pairs, seq_len), np.int32)
        if objective == "dpo":
            loss_mask = np.ones((pairs, seq_len), np.int32)
            loss_mask[:, : seq_len // 4] = 0
            batch[f"{side}_loss_mask"] = loss_mask
    return batch


def time_interleaved(runners: dict[str, Callable[[], None]], warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each runner, timed in alternating rounds (a, b, a, b, ...).

    On a shared, noisy machine a burst of load then hits both frameworks alike instead of whichever
    happened to be running; the caller reports medians.
    """
    for name, run_step in runners.items():
        for _ in range(warmup):
            start = time.perf_counter()
            run_step()
            print(f"    {name}: warm-up {time.perf_counter() - start:.3f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(steps):
        for name, run_step in runners.items():
            start = time.perf_counter()
            run_step()
            times[name].append(time.perf_counter() - start)
            print(f"    {name}: {times[name][-1]:.3f} s", file=sys.stderr, flush=True)
    return times


# ----------------------------------------------------------------------------- peaks


def measure_matmul_peak(dtype: str, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of FLOP/s of a square matmul in jax and in torch on the default device."""
    peaks = {}
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = min(_timed(lambda: matmul(a, a).block_until_ready()) for _ in range(repeats))
    peaks["jax"] = 2 * size**3 / best
    try:
        import torch
    except ImportError:
        return peaks
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = torch.ones((size, size), dtype=getattr(torch, dtype), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(t, t)
    sync()
    best = min(_timed(lambda: (torch.mm(t, t), sync())) for _ in range(repeats))
    peaks["torch"] = 2 * size**3 / best
    return peaks


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def device_peak(dtype: str) -> tuple[float, str]:
    device = jax.devices()[0]
    if device.platform == "gpu" and dtype == "bfloat16":
        for name, peak in GPU_BF16_PEAKS.items():
            if name in device.device_kind:
                return peak * jax.device_count(), f"datasheet {device.device_kind} x{jax.device_count()}"
    measured = measure_matmul_peak(dtype)
    best = max(measured, key=measured.get)
    detail = ", ".join(f"{k} {v / 1e12:.3f}" for k, v in measured.items())
    return max(measured.values()) * jax.local_device_count(), f"measured matmul ({detail} TFLOP/s; {best})"


# ----------------------------------------------------------------------------- mtjax steps


def jax_step(cfg: ModelConfig, objective: str, batch: dict[str, np.ndarray], mesh_shape: tuple[int, int, int],
             micro_batches: int) -> tuple[Callable, Any, tuple]:
    """`(jitted step, initial train state, the step's other arguments)` of the mtjax DPO (reference
    forward in the step) or RM step on random weights."""
    mesh = sharding.make_mesh(*mesh_shape)
    model = CausalLM(cfg) if objective == "dpo" else RewardModel(cfg)
    seq_len = batch["chosen_input_ids"].shape[1]
    init = jax.jit(
        lambda key: model.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"],
        out_shardings=sharding.tree_shardings(
            jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]),
            mesh,
        ),
    )
    params = init(jax.random.PRNGKey(0))
    optimizer = train.OptimizerConfig(learning_rate=1e-6, total_steps=1000, warmup_ratio=0.0, weight_decay=0.01)
    device_batch = sharding.shard_batch(batch, mesh)
    if objective == "dpo":
        step = train.make_dpo_step(model, train.DPOConfig(beta=BETA, num_micro_batches=micro_batches), optimizer, mesh)
        args: tuple = (jax.tree.map(jnp.copy, params), device_batch)  # the frozen reference
    else:
        step = train.make_reward_model_step(model, train.RewardConfig(num_micro_batches=micro_batches), optimizer,
                                            mesh)
        args = (device_batch,)
    return step, train.init_train_state(params, optimizer, mesh), args


def setup_jax(cfg: ModelConfig, objective: str, batch: dict[str, np.ndarray], mesh_shape: tuple[int, int, int],
              micro_batches: int) -> Callable[[], None]:
    """The mtjax step as a no-argument callable that runs one step and waits for it."""
    step, state, args = jax_step(cfg, objective, batch, mesh_shape, micro_batches)
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = step(holder["state"], *args)
        jax.block_until_ready((holder["state"], metrics))

    return run_step


# ----------------------------------------------------------------------------- PyTorch steps


def setup_torch(cfg: ModelConfig, objective: str, batch: dict[str, np.ndarray], micro_batches: int,
                threads: int | None) -> Callable[[], None]:
    """The equivalent PyTorch step as a no-argument callable."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = config_to_hf(cfg, "LlamaForCausalLM")
    hf_config = LlamaConfig(**{k: v for k, v in hf.items() if k != "architectures"}, attn_implementation="sdpa")
    torch.manual_seed(0)
    if objective == "dpo":
        policy = LlamaForCausalLM(hf_config).to(device)
        reference = LlamaForCausalLM(hf_config).to(device).eval().requires_grad_(False)
        reference.load_state_dict(policy.state_dict())
    else:
        policy = LlamaForSequenceClassification(hf_config).to(device)
    if cfg.remat:
        policy.gradient_checkpointing_enable()
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.01)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    tensors = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
    pairs = tensors["chosen_input_ids"].shape[0]
    micro = pairs // micro_batches

    def concatenated(name: str, rows: slice) -> Any:
        return torch.cat([tensors[f"chosen_{name}"][rows], tensors[f"rejected_{name}"][rows]])

    def logps(model, ids, attention, loss_mask):
        logits = model(input_ids=ids, attention_mask=attention).logits.float()
        token_logps = torch.gather(logits[:, :-1].log_softmax(-1), 2, ids[:, 1:, None])[..., 0]
        return (token_logps * loss_mask[:, 1:]).sum(-1)

    def run_step():
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, pairs, micro):
            rows = slice(start, start + micro)
            ids, attention = concatenated("input_ids", rows), concatenated("attention_mask", rows)
            with autocast:
                if objective == "dpo":
                    loss_mask = concatenated("loss_mask", rows)
                    with torch.no_grad():
                        ref_c, ref_r = logps(reference, ids, attention, loss_mask).chunk(2)
                    pol_c, pol_r = logps(policy, ids, attention, loss_mask).chunk(2)
                    margin = (pol_c - ref_c) - (pol_r - ref_r)
                    loss = -F.logsigmoid(BETA * margin).sum() / pairs
                else:
                    chosen, rejected = policy(input_ids=ids, attention_mask=attention).logits.float()[:, 0].chunk(2)
                    loss = -F.logsigmoid(chosen - rejected).sum() / pairs
            loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run_step


# ----------------------------------------------------------------------------- driver


def _limit_cpu_threads(threads: int) -> None:
    """Must run before jax initialises its backend (the first device query)."""
    flags = [f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}",
             f"intra_op_parallelism_threads={threads}"]
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def _format_table(results: list[Result]) -> str:
    header = f"{'shape':<14}{'obj':<5}{'framework':<10}{'pairs':>6}{'seq':>6}{'dtype':>10}{'step s':>9}" \
             f"{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>8}{'vs torch':>9}"
    lines = [header, "-" * len(header)]
    torch_speed = {(r.shape, r.objective): r.tokens_per_second for r in results if r.framework == "torch"}
    for r in results:
        ratio = torch_speed.get((r.shape, r.objective))
        versus = f"{r.tokens_per_second / ratio:.2f}x" if ratio and r.framework == "mtjax" else ""
        lines.append(f"{r.shape:<14}{r.objective:<5}{r.framework:<10}{r.pairs:>6}{r.seq_len:>6}{r.dtype:>10}"
                     f"{r.step_seconds:>9.3f}{r.tokens_per_second:>10.1f}{r.model_tflops_per_second:>9.3f}"
                     f"{r.mfu:>8.1%}{versus:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2-135m", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--objectives", default="dpo,rm", help="comma list of dpo, rm")
    parser.add_argument("--frameworks", default="mtjax,torch", help="comma list of mtjax, torch")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", action="store_true", help="rematerialise each decoder block (both sides)")
    parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes for mtjax")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (compilation) before timing")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="CPU only: threads for both sides (XLA intra-op pool and torch.set_num_threads); "
                             "1 avoids OpenMP stalls on a machine shared with other jobs")
    parser.add_argument("--json", default=None, help="write results (and the environment) to this path")
    args = parser.parse_args(argv)

    if args.cpu_threads:
        _limit_cpu_threads(args.cpu_threads)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    mesh_shape = tuple(int(x) for x in args.mesh.split(","))
    if len(mesh_shape) != 3:
        parser.error(f"--mesh needs three sizes data,fsdp,tensor; got {args.mesh!r}")
    peak, peak_source = device_peak(args.dtype)
    print(f"devices: {jax.devices()}; peak {peak / 1e12:.3f} TFLOP/s ({peak_source})", file=sys.stderr)

    results = []
    paired_ratios: list[dict[str, Any]] = []
    for shape in shapes:
        for objective in args.objectives.split(","):
            cfg = model_config(shape, args.dtype, args.remat)
            batch = random_batch(cfg, objective, args.pairs, args.seq_len)
            flops = step_flops(cfg, objective, args.pairs, args.seq_len)
            runners = {}
            for framework in args.frameworks.split(","):
                if framework == "mtjax":
                    runners[framework] = setup_jax(cfg, objective, batch, mesh_shape, args.micro_batches)
                elif framework == "torch":
                    runners[framework] = setup_torch(cfg, objective, batch, args.micro_batches, args.cpu_threads)
                else:
                    parser.error(f"unknown framework {framework!r}; use mtjax or torch")
            times = time_interleaved(runners, args.warmup, args.steps)
            runners.clear()
            if "mtjax" in times and "torch" in times:
                # Same-round ratios cancel load that hits both frameworks within a round.
                per_round = [t / j for j, t in zip(times["mtjax"], times["torch"], strict=True)]
                paired_ratios.append({"shape": shape, "objective": objective,
                                      "torch_over_mtjax_per_round": [round(r, 3) for r in per_round],
                                      "median": statistics.median(per_round)})
                print(f"  {shape} {objective}: torch/mtjax step time per round {[round(r, 2) for r in per_round]}, "
                      f"median {statistics.median(per_round):.2f}x", file=sys.stderr)
            for framework, samples in times.items():
                seconds = statistics.median(samples)
                result = Result(framework, objective, shape, args.pairs, args.seq_len, args.dtype, seconds,
                                2 * args.pairs * args.seq_len / seconds, flops / seconds / 1e12,
                                flops / seconds / peak, peak / 1e12, peak_source, [round(t, 4) for t in samples])
                print(f"  {shape} {objective} {framework}: median {seconds:.3f} s/step of "
                      f"{[round(t, 3) for t in samples]}", file=sys.stderr)
                results.append(result)

    print(_format_table(results))
    if args.json:
        environment = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "argv": sys.argv[1:]}
        with open(args.json, "w") as f:
            json.dump({"environment": environment, "results": [dataclasses.asdict(r) for r in results],
                       "paired_ratios": paired_ratios}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
