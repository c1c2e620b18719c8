"""Calibrate the synthetic gold-reward testbed with the library directly (not the EM driver).

    python scripts/calibrate_synthetic.py [--seed 0] [--json out.json] [--SETTING VALUE ...]

(a) SFT of π0 on imperfect demonstrations (`train.make_sft_step`), samples (`sampling.generate`): π0's gold
    reward and diversity. (b) r0: the reward model trained (`train.make_reward_model_step`) on one
    gold-labelled pair per "human" prompt of π0's samples; its pairwise accuracy against gold on the
    untied pairs among π0's held-out samples. (c) T rounds of DPO (`train.make_dpo_step`) from π0 on pairs
    picked by the length-controlled rule with the GOLD reward (positive control) and with r0 (the frozen
    RM, i.e. iterative DPO): gold reward per round with its standard error, and r0's accuracy on each
    π_t's samples against its accuracy on π0's (the premise of Mutual-Taught). Prints per-phase seconds
    and a table; `--json` writes every number. Every setting is a flag (see `Settings`).

A throwaway for phase A of issue 18: the driver integration (a `synthetic` preset) replaces it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.serialization
import jax
import numpy as np

from mtjax import data, sampling, sharding, synthetic, train


@dataclasses.dataclass
class Settings:
    seed: int = 0
    # prompts
    sft_prompts: int = 2000
    demos_per_prompt: int = 2
    label_prompts: int = 2048  # the "human" budget: one gold-labelled pair of π0's samples per prompt
    policy_prompts: int = 256  # per DPO round
    eval_prompts: int = 256
    rounds: int = 3
    # sampling
    num_samples: int = 4
    eval_samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 12
    sample_batch: int = 256
    seq_len: int = 20  # every training batch is padded to this length (one compiled shape)
    # SFT (π0)
    sft_lr: float = 3e-3
    sft_batch: int = 64
    sft_epochs: int = 8
    # reward model (r0)
    rm_lr: float = 1e-3
    rm_batch: int = 32
    rm_epochs: int = 4
    # DPO
    dpo_lr: float = 3e-4
    dpo_beta: float = 0.1
    dpo_batch: int = 32
    dpo_epochs: int = 2
    arms: str = "gold,r0"
    only_pi0: bool = False  # stop after π0's evaluation (tuning the supervised phase)
    pi0_file: str = ""  # read π0's params from this file if it exists, else write them there after SFT


# ----------------------------------------------------------------------------- small pieces


def padded_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int, weight_key: str
                   ) -> Iterator[dict[str, np.ndarray]]:
    """One shuffled epoch of exactly `batch_size` rows; the last batch is padded with weight-0 rows."""
    num_rows = len(next(iter(arrays.values())))
    order = np.random.default_rng(seed).permutation(num_rows)
    for start in range(0, num_rows, batch_size):
        idx = order[start:start + batch_size]
        real = len(idx)
        idx = np.concatenate([idx, np.full(batch_size - real, idx[0])])
        yield {**{k: v[idx] for k, v in arrays.items()}, weight_key: (np.arange(batch_size) < real).astype(np.float32)}


def run_epochs(step: Callable, state: Any, arrays: dict[str, np.ndarray], batch_size: int, epochs: int, seed: int,
               weight_key: str, *extra: Any) -> tuple[Any, list[dict[str, float]]]:
    history = []
    for epoch in range(epochs):
        for batch in padded_batches(arrays, batch_size, seed + epoch, weight_key):
            start = time.perf_counter()
            state, metrics = step(state, *extra, batch)
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
            history[-1]["seconds"] = time.perf_counter() - start  # the first step includes compilation
    return state, history


def step_seconds(history: Sequence[dict[str, float]]) -> dict[str, float]:
    rest = [h["seconds"] for h in history[1:]]
    return {"steps": len(history), "first_step_with_compile": history[0]["seconds"],
            "step_mean": float(np.mean(rest)) if rest else float("nan")}


def num_steps(num_rows: int, batch_size: int, epochs: int) -> int:
    return max(1, math.ceil(num_rows / batch_size)) * epochs


@dataclasses.dataclass
class Samples:
    """K samples per prompt: token ids (EOS included when stopped) and decoded text."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    ids: list[list[tuple[int, ...]]]
    texts: list[list[str]]

    def gold(self) -> list[list[float]]:
        return [[synthetic.gold_reward(p, t) for t in group] for p, group in zip(self.prompts, self.texts, strict=True)]


class Testbed:
    def __init__(self, settings: Settings):
        self.s = settings
        self.tok = synthetic.make_tokenizer()
        self.cfg = synthetic.model_config(self.tok)
        self.mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        self.seconds: dict[str, float] = {}
        prompts = synthetic.make_prompts(settings.sft_prompts + settings.label_prompts
                                         + settings.rounds * settings.policy_prompts + settings.eval_prompts,
                                         seed=settings.seed)
        sizes = [settings.sft_prompts, settings.label_prompts, *[settings.policy_prompts] * settings.rounds,
                 settings.eval_prompts]
        cuts = np.cumsum([0, *sizes])
        parts = [prompts[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        self.sft_prompts, self.label_prompts, *self.policy_prompts, self.eval_prompts = parts

    def timed(self, name: str):
        testbed = self

        class Timer:
            """Wall seconds, and CPU seconds of this process (all threads): the latter barely depends on
            what else the machine runs, so it extrapolates to an idle machine."""

            def __enter__(self):
                self.start, self.cpu = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                testbed.seconds[name] = testbed.seconds.get(name, 0.0) + time.perf_counter() - self.start
                cpu_name = f"{name}_cpu"
                testbed.seconds[cpu_name] = testbed.seconds.get(cpu_name, 0.0) + time.process_time() - self.cpu

        return Timer()

    # -- phases

    def sft(self) -> tuple[Any, Any, list[dict]]:
        s = self.s
        model, params = synthetic.init_policy(self.cfg, seed=s.seed)
        rows = synthetic.demonstrations(self.sft_prompts, s.demos_per_prompt, seed=s.seed + 1)
        arrays = data.collate(synthetic.sft_completions(self.tok, rows, s.seq_len), self.tok.pad_token_id, s.seq_len)
        opt = train.OptimizerConfig(learning_rate=s.sft_lr, total_steps=num_steps(len(rows), s.sft_batch, s.sft_epochs),
                                    warmup_ratio=0.05)
        step = train.make_sft_step(model, train.SFTConfig(), opt, self.mesh)
        state, history = run_epochs(step, train.init_train_state(params, opt, self.mesh), arrays, s.sft_batch,
                                    s.sft_epochs, s.seed, "sequence_weight")
        return model, jax.device_get(state.params), history

    def sample(self, model, params, prompts: Sequence[str], num_samples: int, seed: int) -> Samples:
        prompt_ids = [data.chat_prompt_ids(self.tok, p) for p in prompts]
        out = sampling.generate(model, params, prompt_ids, max_new_tokens=self.s.max_new_tokens,
                                temperature=self.s.temperature, top_p=self.s.top_p, num_samples=num_samples,
                                eos_token_ids=[self.tok.eos_token_id], pad_token_id=self.tok.pad_token_id,
                                seed=seed, batch_size=self.s.sample_batch, progress=False)
        ids = [[tuple(g.token_ids) for g in group] for group in out]
        texts = [[self.tok.decode(x, skip_special_tokens=True) for x in group] for group in ids]
        return Samples(list(prompts), prompt_ids, ids, texts)

    def score(self, rm, rm_params, samples: Samples) -> list[list[float]]:
        flat_p = [p for p, group in zip(samples.prompt_ids, samples.ids, strict=True) for _ in group]
        flat_r = [list(x) for group in samples.ids for x in group]
        scores = sampling.score(rm, rm_params, flat_p, flat_r, batch_size=self.s.sample_batch,
                                pad_token_id=self.tok.pad_token_id, progress=False)
        k = len(samples.ids[0])
        return np.asarray(scores, np.float64).reshape(-1, k).tolist()

    def pair_arrays(self, samples: Samples, pairs: Sequence[tuple[int, int, int]]) -> dict[str, np.ndarray]:
        length = self.s.seq_len
        chosen = [data.encode_completion(samples.prompt_ids[p], samples.ids[p][hi], length) for p, hi, _ in pairs]
        rejected = [data.encode_completion(samples.prompt_ids[p], samples.ids[p][lo], length) for p, _, lo in pairs]
        return data.collate_pairs(chosen, rejected, self.tok.pad_token_id, length, length_multiple=length)

    def train_rm(self, policy_params, samples: Samples) -> tuple[Any, Any, int, list[dict]]:
        s = self.s
        pairs = synthetic.one_pair_per_prompt(samples.gold(), samples.texts, seed=s.seed + 2)
        rm, params = synthetic.reward_model_from_policy(self.cfg, policy_params, seed=s.seed)
        opt = train.OptimizerConfig(learning_rate=s.rm_lr, total_steps=num_steps(len(pairs), s.rm_batch, s.rm_epochs),
                                    warmup_ratio=0.05, weight_decay=0.001)
        step = train.make_reward_model_step(rm, train.RewardConfig(), opt, self.mesh)
        arrays = self.pair_arrays(samples, pairs)
        state, history = run_epochs(step, train.init_train_state(params, opt, self.mesh), arrays, s.rm_batch,
                                    s.rm_epochs, s.seed + 3, "pair_weight")
        return rm, jax.device_get(state.params), len(pairs), history

    def dpo(self, model, params, samples: Samples, rewards: list[list[float]], seed: int) -> tuple[Any, int, list]:
        s = self.s
        pairs = []
        for p, (group, scores) in enumerate(zip(samples.ids, rewards, strict=True)):
            keep, _ = data.drop_duplicate_responses(group)
            choice = data.select_length_controlled_pair([scores[i] for i in keep], [len(group[i]) for i in keep])
            if not isinstance(choice, str):
                pairs.append((p, keep[choice.chosen], keep[choice.rejected]))
        arrays = self.pair_arrays(samples, pairs)
        arrays.update(train.precompute_reference_logprobs(model, params, arrays, self.mesh, batch_size=s.dpo_batch))
        opt = train.OptimizerConfig(learning_rate=s.dpo_lr,
                                    total_steps=num_steps(len(pairs), s.dpo_batch, s.dpo_epochs), warmup_ratio=0.05)
        step = train.make_dpo_step(model, train.DPOConfig(beta=s.dpo_beta, reference="precomputed"), opt, self.mesh)
        state, history = run_epochs(step, train.init_train_state(params, opt, self.mesh), arrays, s.dpo_batch,
                                    s.dpo_epochs, seed, "pair_weight")
        return jax.device_get(state.params), len(pairs), history


# ----------------------------------------------------------------------------- statistics


def policy_summary(samples: Samples) -> dict[str, float]:
    """Gold mean and its standard error over prompts (samples of a prompt are averaged first)."""
    gold = np.asarray([np.mean(g) for g in samples.gold()])
    flat = [t for group in samples.texts for t in group]
    features = [synthetic.spurious_features(t) for t in flat]
    distinct = np.mean([len(set(group)) / len(group) for group in samples.texts])
    coverage = np.mean([synthetic.coverage(p, t) for p, group in zip(samples.prompts, samples.texts, strict=True)
                        for t in group])
    flat_gold = [x for g in samples.gold() for x in g]
    return {"gold_mean": float(gold.mean()), "gold_se": float(gold.std(ddof=1) / math.sqrt(len(gold))),
            "corr_gold_length": float(np.corrcoef(flat_gold, [f["length"] for f in features])[0, 1]),
            "corr_gold_decoys": float(np.corrcoef(flat_gold, [f["decoys"] for f in features])[0, 1]),
            "gold_sample_std": float(np.std([x for g in samples.gold() for x in g])),
            "distinct_fraction": float(distinct), "coverage": float(coverage),
            "length_mean": float(np.mean([f["length"] for f in features])),
            "decoy_rate": float(np.mean([f["decoys"] > 0 for f in features])),
            "stopped_fraction": float(np.mean([x[-1:] == (2,) for group in samples.ids for x in group]))}


def paired_gain(after: Samples, before: Samples) -> dict[str, float]:
    """Gold(after) - gold(before) on the same prompts: mean, SE over prompts and z = mean / SE."""
    diff = np.asarray([np.mean(a) - np.mean(b) for a, b in zip(after.gold(), before.gold(), strict=True)])
    se = float(diff.std(ddof=1) / math.sqrt(len(diff)))
    return {"gain": float(diff.mean()), "gain_se": se, "z": float(diff.mean() / se) if se > 0 else float("nan")}


def rm_accuracy(scores: list[list[float]], samples: Samples) -> dict[str, float]:
    pairs, tied = synthetic.untied_pairs(samples.gold(), samples.texts)
    acc = synthetic.pairwise_accuracy(scores, pairs)
    return {"accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / len(pairs)), "pairs": len(pairs),
            "tied": tied, **feature_agreement(scores, samples, pairs)}


def feature_agreement(scores, samples: Samples, pairs) -> dict[str, float]:
    """How often the RM prefers the longer response / the one with more decoys, on pairs where they differ."""
    out = {}
    for name in ("length", "decoys"):
        agree = []
        for p, hi, lo in pairs:
            a, b = (synthetic.spurious_features(samples.texts[p][i])[name] for i in (hi, lo))
            if a != b and scores[p][hi] != scores[p][lo]:
                agree.append((scores[p][hi] > scores[p][lo]) == (a > b))
        out[f"rm_prefers_more_{name}"] = float(np.mean(agree)) if agree else float("nan")
    return out


def show_samples(name: str, samples: Samples, num_prompts: int = 3) -> None:
    for prompt, texts in zip(samples.prompts[:num_prompts], samples.texts[:num_prompts], strict=False):
        scored = ", ".join(f"{t!r}: {synthetic.gold_reward(prompt, t):.2f}" for t in texts)
        print(f"  {name} [{prompt}] {scored}")


# ----------------------------------------------------------------------------- main


def calibrate(s: Settings) -> dict[str, Any]:
    bed = Testbed(s)
    result: dict[str, Any] = {"settings": dataclasses.asdict(s)}
    if s.pi0_file and os.path.exists(s.pi0_file):
        policy, pi0 = synthetic.init_policy(bed.cfg, seed=s.seed)
        with open(s.pi0_file, "rb") as f:
            pi0 = flax.serialization.from_bytes(pi0, f.read())
        result["sft"] = {"loaded": s.pi0_file}
    else:
        with bed.timed("sft"):
            policy, pi0, history = bed.sft()
        result["sft"] = {"first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
                         "parameters": synthetic.num_parameters(pi0), **step_seconds(history)}
        if s.pi0_file:
            with open(s.pi0_file, "wb") as f:
                f.write(flax.serialization.to_bytes(pi0))
    with bed.timed("sample_eval"):
        eval0 = bed.sample(policy, pi0, bed.eval_prompts, s.eval_samples, seed=s.seed + 100)
    result["pi0"] = policy_summary(eval0)
    print("pi0", json.dumps(result["pi0"]), json.dumps(result["sft"]), flush=True)
    show_samples("π0", eval0)
    if s.only_pi0:
        result["seconds"] = bed.seconds
        return result

    with bed.timed("sample_labels"):
        labelled = bed.sample(policy, pi0, bed.label_prompts, s.num_samples, seed=s.seed + 200)
    with bed.timed("train_r0"):
        rm, r0, num_pairs, history = bed.train_rm(pi0, labelled)
    with bed.timed("score_eval"):
        result["r0"] = {"label_pairs": num_pairs, "train_first_loss": history[0]["loss"],
                        "train_last_loss": history[-1]["loss"], "train_last_accuracy": history[-1]["accuracy"],
                        **step_seconds(history),
                        "on_pi0": rm_accuracy(bed.score(rm, r0, eval0), eval0)}
    print("r0", json.dumps(result["r0"]), flush=True)

    for arm in filter(None, s.arms.split(",")):
        params, rounds = pi0, []
        for t in range(1, s.rounds + 1):
            with bed.timed("sample_policy"):
                samples = bed.sample(policy, params, bed.policy_prompts[t - 1], s.num_samples, seed=s.seed + 300 + t)
            with bed.timed("label_policy"):
                rewards = samples.gold() if arm == "gold" else bed.score(rm, r0, samples)
            with bed.timed("dpo"):
                params, num_pairs, history = bed.dpo(policy, params, samples, rewards, seed=s.seed + 400 + t)
            with bed.timed("sample_eval"):
                evaluated = bed.sample(policy, params, bed.eval_prompts, s.eval_samples, seed=s.seed + 100)
            with bed.timed("score_eval"):
                row = {"round": t, "pairs": num_pairs, "dpo_last_loss": history[-1]["loss"],
                       "dpo_steps": step_seconds(history),
                       "dpo_last_accuracy": history[-1]["accuracy"], **policy_summary(evaluated),
                       **paired_gain(evaluated, eval0),
                       "r0_on_pi_t": rm_accuracy(bed.score(rm, r0, evaluated), evaluated)}
            rounds.append(row)
            show_samples(f"{arm} π_{t}", evaluated)
            print(arm, json.dumps(row), flush=True)
        result[f"arm_{arm}"] = rounds
    result["seconds"] = bed.seconds
    return result


def print_table(result: dict[str, Any]) -> None:
    if "r0" not in result:
        print("seconds:", {k: round(v, 1) for k, v in result["seconds"].items()})
        return
    r0 = result["r0"]["on_pi0"]
    print(f"\nπ0: gold {result['pi0']['gold_mean']:.3f} ± {result['pi0']['gold_se']:.3f}; r0 accuracy on π0's samples "
          f"{r0['accuracy']:.3f} ± {r0['accuracy_se']:.3f} ({r0['pairs']} pairs)")
    print("| arm | t | gold | gain over π0 (z) | length | decoy rate | r0 acc. on π_t | pairs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, rounds in result.items():
        if key.startswith("arm_"):
            for row in rounds:
                acc = row["r0_on_pi_t"]
                print(f"| {key[4:]} | {row['round']} | {row['gold_mean']:.3f} ± {row['gold_se']:.3f} | "
                      f"{row['gain']:+.3f} ({row['z']:.1f}) | {row['length_mean']:.2f} | {row['decoy_rate']:.2f} | "
                      f"{acc['accuracy']:.3f} ± {acc['accuracy_se']:.3f} ({acc['pairs']}) | {row['pairs']} |")
    print("seconds:", {k: round(v, 1) for k, v in result["seconds"].items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(Settings):
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(field.default, bool) else type(field.default)
        parser.add_argument(f"--{field.name}", type=kind, default=field.default)
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args()
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    result = calibrate(settings)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
