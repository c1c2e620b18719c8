"""Compile time against depth: a deep, narrow Llama with its layers unrolled and under `scan_layers`.

Times `jax.jit(fn).lower(...)` (tracing) and `.compile()` (XLA) of a jitted program per setting — the
DPO train step (policy forward/backward + reference forward + AdamW) and the reward-model forward that
scoring runs — with each setting in a fresh process, so no cache is shared between them.

    python scripts/bench_compile.py --layers 4,32 --remat off,on --json docs/bench/compile_cpu.json \
        --md docs/bench/compile_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=4, head_dim=32,
             tie_word_embeddings=False)
PROGRAMS = ("dpo_step", "score_forward")


def measure(program: str, layers: int, scan: bool, remat: bool, pairs: int, seq_len: int) -> dict:
    """Lowering and compile seconds of one program (runs in this process)."""
    import jax
    import jax.numpy as jnp

    from mtjax import sharding, train
    from mtjax.models import CausalLM, ModelConfig, RewardModel

    cfg = ModelConfig(**SHAPE, num_layers=layers, scan_layers=scan, remat=remat)
    mesh = sharding.make_mesh(1, 1, 1)
    ids = jnp.ones((pairs, seq_len), jnp.int32)
    if program == "dpo_step":
        model = CausalLM(cfg)
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids[:, :1])["params"])
        optimizer = train.OptimizerConfig(learning_rate=1e-5, total_steps=10)
        step = train.make_dpo_step(model, train.DPOConfig(beta=0.1), optimizer, mesh)
        state = jax.eval_shape(lambda p: train.TrainState(jnp.zeros((), jnp.int32), p,
                                                          train.make_optimizer(optimizer).init(p)), params)
        batch = {f"{side}_{key}": jax.ShapeDtypeStruct((pairs, seq_len), jnp.int32)
                 for side in ("chosen", "rejected") for key in ("input_ids", "attention_mask", "loss_mask")}
        args = (state, params, batch)
        fn = step
    else:
        model = RewardModel(cfg)
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids[:, :1])["params"])
        fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m))
        args = (params, jax.ShapeDtypeStruct((2 * pairs, seq_len), jnp.int32),
                jax.ShapeDtypeStruct((2 * pairs, seq_len), jnp.int32))
    start, cpu_start = time.perf_counter(), time.process_time()
    lowered = fn.lower(*args)
    lower_s, lower_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    start, cpu_start = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    hlo_bytes = len(compiled.as_text() or "")
    return dict(program=program, layers=layers, scan_layers=scan, remat=remat, pairs=pairs, seq_len=seq_len,
                lower_s=round(lower_s, 3), compile_s=round(compile_s, 3), total_s=round(lower_s + compile_s, 3),
                lower_cpu_s=round(lower_cpu_s, 3), compile_cpu_s=round(compile_cpu_s, 3),
                cpu_s=round(lower_cpu_s + compile_cpu_s, 3),
                optimized_hlo_chars=hlo_bytes, backend=jax.default_backend(), jax=jax.__version__,
                shape=SHAPE)


def _in_subprocess(**kwargs) -> dict:
    """`measure(**kwargs)` in a fresh interpreter (no warm jax caches between settings)."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "from bench_compile import measure; print(json.dumps(measure(**json.loads(sys.argv[1]))))")
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    lines = ["| program | layers | remat | scan_layers | lower s | compile s | total s | scan / unrolled | "
             "CPU s | scan / unrolled (CPU s) |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    unrolled = {(r["program"], r["remat"], r["layers"]): r for r in rows if not r["scan_layers"]}
    for r in rows:
        base = unrolled.get((r["program"], r["remat"], r["layers"])) if r["scan_layers"] else None
        wall = f"{r['total_s'] / base['total_s']:.2f}" if base else ""
        cpu = f"{r['cpu_s'] / base['cpu_s']:.2f}" if base else ""
        lines.append(f"| {r['program']} | {r['layers']} | {r['remat']} | {r['scan_layers']} | {r['lower_s']:.2f} | "
                     f"{r['compile_s']:.2f} | {r['total_s']:.2f} | {wall} | {r['cpu_s']:.2f} | {cpu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="32", help="comma list of depths, e.g. 4,32")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--programs", default=",".join(PROGRAMS))
    parser.add_argument("--remat", default="off", help="comma list of off,on")
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_args(argv)
    rows = []
    depths = [int(x) for x in args.layers.split(",")]
    for program in args.programs.split(","):
        for remat in args.remat.split(","):
            for layers in depths:
                for scan in (False, True):
                    row = _in_subprocess(program=program, layers=layers, scan=scan, remat=remat == "on",
                                         pairs=args.pairs, seq_len=args.seq_len)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    table = format_table(rows)
    print(table)
    meta = dict(command="python scripts/bench_compile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                cpu_count=os.cpu_count(), platform=platform.platform(), loadavg_end=os.getloadavg())
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    if args.md:
        Path(args.md).write_text(
            f"# Compile time vs depth ({rows[0]['backend']}, jax {rows[0]['jax']})\n\n"
            f"`{meta['command']}`: Llamas of {args.layers} layers at reduced width ({SHAPE}), "
            f"{args.pairs} pairs x {args.seq_len} tokens, each setting in a fresh process; lower = tracing to "
            f"StableHLO, compile = XLA; CPU s = the process's CPU time for both (all threads), the figure to read "
            f"on a shared machine, where wall time mostly measures waiting. {meta['cpu_count']} CPU cores, load "
            f"average at the end {tuple(round(x, 2) for x in meta['loadavg_end'])}.\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
