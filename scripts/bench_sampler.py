"""Sampler throughput: `mtjax.sampling.generate` against `transformers.generate` (PyTorch) on SmolLM2-135M-Instruct.

Both sides load the same weights (mtjax's params written with `save_hf` and read back by
`AutoModelForCausalLM.from_pretrained`), use the same dtype, batch of real chat prompts (left padded),
temperature / top-p, and generate exactly `max_new_tokens` tokens per row: mtjax gets no stop ids and
transformers gets `min_new_tokens = max_new_tokens`, so both do equal work. Tokens/s counts generated
tokens (batch x max_new_tokens) over the wall time of one warm call; the first (compiling / warm-up) call
is timed separately and reported as `first_call_s`.

With `--gpu-bound` (default on a GPU) the decode step time (from a 1-token call and the full call) is
compared with the memory-bandwidth bound: bytes of weights + KV cache read per step / bandwidth.

    python scripts/bench_sampler.py --batch-sizes 8,32 --max-new-tokens 64 --out docs/bench/sampler_cpu.json

With `--samples P:K:N` (e.g. 8:4:48) it instead times `generate` with `num_samples=K` on P prompts x N new
tokens (batch_size = P*K: one batch), and with `--old-sampler FILE` also an older copy of mtjax/sampling.py in
the same process (alternating calls, best of `--repeats`), checking both return the same tokens:

    python scripts/bench_sampler.py --samples 8:4:48 --old-sampler /tmp/sampling_old.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mtjax import sampling  # noqa: E402
from mtjax.models import load_smollm2, save_hf  # noqa: E402

INSTRUCTIONS = [
    "Give me three tips for writing a clear email to a busy colleague.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a short poem about the sea at night.",
    "What are the main causes of inflation? Answer briefly.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I make a simple tomato sauce for pasta?",
    "List five healthy snacks that are easy to prepare.",
    "Why is the sky blue? Explain it to a ten-year-old.",
    "Suggest a name for a small bakery that specialises in sourdough bread.",
    "What should I pack for a three-day hiking trip in the mountains in autumn?",
    "Translate 'Good morning, how are you?' into French and Spanish.",
    "Describe how photosynthesis works in plain language.",
    "Write a friendly reminder message about tomorrow's team meeting at 10am.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Give me a one-week plan to start running for a complete beginner.",
    "Compare electric cars and petrol cars in terms of running costs.",
]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = tokenizer.apply_chat_template([{"role": "user", "content": INSTRUCTIONS[i % len(INSTRUCTIONS)]}],
                                             tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text)["input_ids"])
    return out


def bench_mtjax(model, params, prompts, max_new_tokens, args) -> dict:
    kwargs = dict(temperature=args.temperature, top_p=args.top_p, eos_token_ids=[], pad_token_id=args.pad_id,
                  batch_size=len(prompts), progress=False)
    t0 = time.perf_counter()
    sampling.generate(model, params, prompts, max_new_tokens=max_new_tokens, seed=0, **kwargs)
    first = time.perf_counter() - t0
    times = []
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        out = sampling.generate(model, params, prompts, max_new_tokens=max_new_tokens, seed=rep + 1, **kwargs)
        times.append(time.perf_counter() - t0)
    assert all(g.length == max_new_tokens for per in out for g in per)
    wall = min(times)
    res = dict(framework="mtjax", first_call_s=first, wall_s=wall, wall_all_s=times,
               tokens_per_s=len(prompts) * max_new_tokens / wall)
    if args.gpu_bound:
        sampling.generate(model, params, prompts, max_new_tokens=1, seed=0, **kwargs)  # compile the 1-token call
        t0 = time.perf_counter()
        sampling.generate(model, params, prompts, max_new_tokens=1, seed=1, **kwargs)
        prefill = time.perf_counter() - t0
        res["prefill_s"] = prefill
        res["decode_step_s"] = max(wall - prefill, 0.0) / max(max_new_tokens - 1, 1)
    return res


def bench_samples(model, params, tokenizer, spec: str, args) -> list[dict]:
    """`num_samples=K` sampling with the current sampler (and an older copy), same seeds, alternating calls."""
    import importlib.util

    n_prompts, k, n_new = (int(x) for x in spec.split(":"))
    prompts = chat_prompts(tokenizer, n_prompts)
    samplers = {"current": sampling}
    if args.old_sampler:
        mod_spec = importlib.util.spec_from_file_location("sampling_old", args.old_sampler)
        old = importlib.util.module_from_spec(mod_spec)
        sys.modules["sampling_old"] = old  # dataclasses look their module up while it executes
        mod_spec.loader.exec_module(old)
        samplers["old"] = old
    kwargs = dict(temperature=args.temperature, top_p=args.top_p, eos_token_ids=[], pad_token_id=args.pad_id,
                  batch_size=n_prompts * k, num_samples=k, max_new_tokens=n_new, progress=False)
    first, times, outs = {}, {name: [] for name in samplers}, {}
    for name, mod in samplers.items():
        t0 = time.perf_counter()
        outs[name] = mod.generate(model, params, prompts, seed=0, **kwargs)
        first[name] = time.perf_counter() - t0
    for rep in range(args.repeats):
        for name, mod in samplers.items():
            t0 = time.perf_counter()
            mod.generate(model, params, prompts, seed=rep + 1, **kwargs)
            times[name].append(time.perf_counter() - t0)
    same = None
    if "old" in outs:  # compare tokens and finish reasons (the two modules' Generation classes differ)
        def key(out):
            return [[(g.token_ids, g.finish_reason) for g in per] for per in out]

        same = key(outs["old"]) == key(outs["current"])
    prefill = {}  # a 1-token call: the prefill (+ one sampling step), best of 3 warm calls
    for name, mod in samplers.items():
        one = dict(kwargs, max_new_tokens=1)
        mod.generate(model, params, prompts, seed=0, **one)
        walls = []
        for rep in range(3):
            t0 = time.perf_counter()
            mod.generate(model, params, prompts, seed=rep + 1, **one)
            walls.append(time.perf_counter() - t0)
        prefill[name] = min(walls)
    lens = [len(p) for p in prompts]
    rows = []
    for name in samplers:
        wall = min(times[name])
        rows.append(dict(prompts=n_prompts, num_samples=k, max_new_tokens=n_new, prompt_len_min=min(lens),
                         prompt_len_max=max(lens), sampler=name, first_call_s=first[name], wall_s=wall,
                         wall_all_s=times[name], one_token_call_s=prefill[name],
                         tokens_per_s=n_prompts * k * n_new / wall,
                         same_tokens_as_old=same))
    return rows


def bench_hf(hf_model, prompts, max_new_tokens, args, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), args.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1

    def run(n, seed):
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                                    top_p=args.top_p, top_k=0, max_new_tokens=n, min_new_tokens=n,
                                    pad_token_id=args.pad_id)
        return out

    t0 = time.perf_counter()
    run(min(8, max_new_tokens), 0)  # warm-up (allocator, kernels)
    first = time.perf_counter() - t0
    times = []
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        out = run(max_new_tokens, rep + 1)
        times.append(time.perf_counter() - t0)
    assert out.shape[1] == width + max_new_tokens
    wall = min(times)
    return dict(framework=f"transformers ({threads} thr)", torch_threads=threads, first_call_s=first, wall_s=wall,
                wall_all_s=times,
                tokens_per_s=len(prompts) * max_new_tokens / wall)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="8,32,128")
    ap.add_argument("--max-new-tokens", default="64,256")
    ap.add_argument("--pairs", default="", help="explicit batch:max_new_tokens list, e.g. 8:64,32:64,8:256 "
                                                "(overrides the product of --batch-sizes x --max-new-tokens)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per setting (the best is reported)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--torch-threads", default=f"1,{os.cpu_count()}",
                    help="torch intra-op thread counts to try; the speed-up is against the fastest (on a busy "
                         "machine torch with all cores can be several times slower than with one)")
    ap.add_argument("--gpu-bound", action="store_true", default=None,
                    help="report decode step time vs the memory-bandwidth bound (default: on when on a GPU)")
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="memory bandwidth in B/s (H100 SXM)")
    ap.add_argument("--out", default="", help="JSON results path")
    ap.add_argument("--md", default="", help="markdown table path")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    ap.add_argument("--samples", default="", help="P:K:N = P prompts x num_samples K x N new tokens (mtjax only)")
    ap.add_argument("--old-sampler", default="", help="path of an older mtjax/sampling.py to compare with --samples")
    args = ap.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if args.gpu_bound is None:
        args.gpu_bound = on_gpu
    if args.pairs:
        settings = [tuple(int(x) for x in p.split(":")) for p in args.pairs.split(",")]
    else:
        settings = [(int(b), int(n)) for n in args.max_new_tokens.split(",") for b in args.batch_sizes.split(",")]

    load_start = os.getloadavg()  # a shared machine's load (other processes) makes CPU timings noisy
    model, params, tokenizer = load_smollm2(dtype=args.dtype)
    params = jax.device_put(params)
    args.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    hf_model = None
    if not args.skip_hf:
        import torch
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            save_hf(model, jax.tree.map(np.asarray, params), tmp)
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=getattr(torch, args.dtype)).eval()

    if args.samples:
        rows = bench_samples(model, params, tokenizer, args.samples, args)
        for r in rows:
            print(json.dumps(r), flush=True)
        if args.out:
            meta = dict(model="SmolLM2-135M-Instruct", dtype=args.dtype, temperature=args.temperature,
                        top_p=args.top_p, cpu_count=os.cpu_count(), jax=jax.__version__, note=args.note,
                        loadavg_start=load_start, loadavg_end=os.getloadavg())
            Path(args.out).write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
        return 0

    rows = []
    for batch, n_new in settings:
        prompts = chat_prompts(tokenizer, batch)
        lens = [len(p) for p in prompts]
        base = dict(batch=batch, max_new_tokens=n_new, prompt_len_min=min(lens), prompt_len_max=max(lens))
        r = {**base, **bench_mtjax(model, params, prompts, n_new, args)}
        if args.gpu_bound:
            cfg = model.cfg
            cache_len = sampling.bucket_length(max(lens)) + n_new
            kv_bytes = 2 * cfg.num_layers * batch * cache_len * cfg.num_kv_heads * cfg.head_dim * np.dtype(
                cfg.dtype).itemsize
            r["bound_step_s"] = (weight_bytes + kv_bytes) / args.bandwidth
            r["step_over_bound"] = r["decode_step_s"] / r["bound_step_s"]
        rows.append(r)
        print(json.dumps(r), flush=True)
        if hf_model is not None:
            for threads in (int(t) for t in args.torch_threads.split(",")):
                h = {**base, **bench_hf(hf_model, prompts, n_new, args, threads)}
                rows.append(h)
                print(json.dumps(h), flush=True)

    table = format_table(rows, args)
    print(table)
    meta = dict(model="SmolLM2-135M-Instruct", torch_threads_tried=args.torch_threads, dtype=args.dtype,
                temperature=args.temperature, top_p=args.top_p,
                equal_work="both generate exactly max_new_tokens per row (mtjax: no stop ids; "
                           "transformers: min_new_tokens=max_new_tokens)",
                timing="tokens_per_s = batch*max_new_tokens / best warm wall time; first_call_s = the compiling "
                       "(mtjax) / warm-up (transformers, 8 tokens) call, excluded",
                device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), cpu_count=os.cpu_count(),
                platform=platform.platform(), python=sys.version.split()[0], jax=jax.__version__,
                weight_bytes=weight_bytes, note=args.note, loadavg_start=load_start, loadavg_end=os.getloadavg())
    try:
        import torch
        import transformers

        meta.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        lines = [f"# Sampler throughput: mtjax vs transformers ({meta['device']}, {args.dtype})", "",
                 f"SmolLM2-135M-Instruct, temperature {args.temperature}, top-p {args.top_p}; "
                 f"{meta['equal_work']}.", f"{meta['timing']}.", ""]
        lines += [f"{meta['cpu_count']} CPU cores; load average (1/5/15 min) at start {load_start}, at end "
                  f"{meta['loadavg_end']}.", ""]
        if args.note:
            lines += [args.note, ""]
        Path(args.md).write_text("\n".join(lines) + table + "\n")
    return 0


def format_table(rows: list[dict], args) -> str:
    head = "| batch | new tokens | prompt len | framework | first call s | wall s | tokens/s | speed-up vs best HF |"
    lines = [head, "|" + "|".join(["---"] * 8) + "|"]
    hf: dict = {}
    for r in rows:  # the fastest transformers setting per shape
        key = (r["batch"], r["max_new_tokens"])
        if r["framework"].startswith("transformers") and r["tokens_per_s"] > hf.get(key, {}).get("tokens_per_s", 0):
            hf[key] = r
    for r in rows:
        ref = hf.get((r["batch"], r["max_new_tokens"]))
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref and r["framework"] == "mtjax" else ""
        lines.append(f"| {r['batch']} | {r['max_new_tokens']} | {r['prompt_len_min']}-{r['prompt_len_max']} | "
                     f"{r['framework']} | {r['first_call_s']:.1f} | {r['wall_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{speed} |")
    if args.gpu_bound and any("bound_step_s" in r for r in rows):
        lines += ["", "| batch | new tokens | decode step ms | bandwidth bound ms | ratio |", "|---|---|---|---|---|"]
        for r in rows:
            if "bound_step_s" in r:
                lines.append(f"| {r['batch']} | {r['max_new_tokens']} | {1e3 * r['decode_step_s']:.2f} | "
                             f"{1e3 * r['bound_step_s']:.3f} | {r['step_over_bound']:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
