"""The paper's comparison on a testbed: every arm on identical prompts and seeds, then aggregated.

Arms: the named arms of ``mtjax.arms`` (``configs/mt.py:PRESET,ARM``; ``--override key=value`` applies to every
arm, before the arm's own settings): mutual (Mutual-Taught), iterative_dpo, frozen, offline, offline_ipo,
offline_simpo, sppo, self_rewarding, meta_rewarding, ser, self_only, contrastive_only, mutual_filtered, oracle,
random.

A seed sets ``cfg.seed`` and ``cfg.reward_model.head_seed``; ``prompts.seed`` stays fixed, so every arm and
seed sees the same prompt splits. Per seed, ``mutual`` runs first in ``WORKDIR/seed_S/mutual``; every other
arm starts in ``WORKDIR/seed_S/ARM`` from mutual's finished base phases (prompts, π0, r0, iteration-0 eval:
``em.share_base_phases``), and the first seed's prompts and π0 (an `sft` phase has its own seed) are shared
by the later seeds (``em.share_phases``). Seed-major order, so partial results are useful; rerunning resumes
(finished arms, those with a ``summary.json``, are skipped; an unfinished one resumes by phase).

Extra evaluation per arm/seed/iteration on the testbed task (``ARM/alpaca_eval/iter_t.json``, computed
once): the RM-judged AlpacaEval-2-style win rate of π_t (greedy, ``cfg.sampling.max_new_tokens``) against
the GPT-4-turbo references on the first ``--alpaca-prompts`` prompts, judged by that seed's base RM r0.

    python scripts/replicate.py --preset default --seeds 0,1,2 --workdir runs/replicate
    python scripts/replicate.py --preset synthetic --workdir runs/synthetic   # the controlled study (issue 18)
    python scripts/replicate.py --workdir runs/replicate --report-only      # aggregate what is finished

Writes ``WORKDIR/results.md``, ``WORKDIR/results.json`` and PNG plots (see docs/replicate.md).
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import math
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtjax import layout
from mtjax.arms import ARMS, apply_arm, arm_keys

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ALPACA = REPO.parent / "shared" / "data" / "alpaca_eval_gpt4_baseline.json"

# What a preset runs unless the command line says otherwise (the synthetic study of issue 18: six arms, five
# seeds, no AlpacaEval: its tokenizer holds 21 words, not English).
DEFAULTS = {"arms": "mutual,frozen,self_only,contrastive_only,offline", "seeds": "0,1,2", "alpaca_prompts": 16}
PRESET_DEFAULTS = {"synthetic": {"arms": "mutual,frozen,self_only,contrastive_only,oracle,random",
                                 "seeds": "0,1,2,3,4", "alpaca_prompts": 0}}
# The arms Table 1 of the paper (and its related work) compares Mutual-Taught with, beyond the ablations.
TABLE_1_ARMS = ("offline", "offline_ipo", "offline_simpo", "iterative_dpo", "sppo", "self_rewarding", "meta_rewarding",
                "ser")
# Keys the script or the arms set: an override may not touch them.
RESERVED = ("seed", "reward_model.head_seed", *sorted(arm_keys()))

# (key in results.json, label, where: "eval" = flattened eval/iter_t.json name, "alpaca" = alpaca json key),
# per task (`task.name`).
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("gold_reward", "gold reward", "eval", "policy/gold_reward"),
    ("prompt_level_strict", "IFEval prompt strict", "eval", "policy/heldout/prompt_level_strict"),
    ("prompt_level_loose", "IFEval prompt loose", "eval", "policy/heldout/prompt_level_loose"),
    ("instruction_level_strict", "IFEval instr. strict", "eval", "policy/heldout/instruction_level_strict"),
    ("instruction_level_loose", "IFEval instr. loose", "eval", "policy/heldout/instruction_level_loose"),
    ("length_mean_tokens", "mean length (tokens)", "eval", "policy/length_mean_tokens"),
    ("truncated_fraction", "truncated fraction", "eval", "policy/truncated_fraction"),
    ("alpaca_win_rate", "AlpacaEval WR vs GPT-4-turbo (%)", "alpaca", "win_rate"),
    ("rm_accuracy_current_policy", "RM acc. current policy", "eval", "rm/accuracy_current_policy"),
    ("rm_accuracy_base_policy", "RM acc. base policy", "eval", "rm/accuracy_base_policy"),
)
_BY_KEY = {m[0]: m for m in METRICS}
# The synthetic task has no IFEval checks nor English text: gold, its readable parts (coverage) and what gold does
# not reward (words, the decoy), and r0's accuracy on π_t's samples next to r_t's (the method's premise).
SYNTHETIC_METRICS: tuple[tuple[str, str, str, str], ...] = (
    _BY_KEY["gold_reward"],
    ("coverage", "item coverage", "eval", "policy/coverage"),
    ("length_mean_words", "words", "eval", "policy/length_mean_words"),
    ("decoy_rate", "decoy rate", "eval", "policy/decoy_rate"),
    _BY_KEY["truncated_fraction"],
    ("rm_accuracy_current_policy", "r_t acc. on π_t", "eval", "rm/accuracy_current_policy"),
    ("rm_accuracy_base_policy", "r_t acc. on π0", "eval", "rm/accuracy_base_policy"),
    ("rm_r0_accuracy_current_policy", "r0 acc. on π_t", "eval", "rm/r0_accuracy_current_policy"),
)
METRICS_OF_TASK = {"testbed": METRICS, "synthetic": SYNTHETIC_METRICS}
LABELS = {m[0]: m[1] for m in METRICS}


def metric_groups(metrics: Sequence[tuple[str, str, str, str]]) -> tuple[list[str], list[str], dict[str, str]]:
    """(policy metric keys, RM metric keys, key -> label) of a task's metrics."""
    keys = [m[0] for m in metrics]
    return ([k for k in keys if not k.startswith("rm_")], [k for k in keys if k.startswith("rm_")],
            {m[0]: m[1] for m in metrics})


# ----------------------------------------------------------------------------- configs


def load_preset(preset: str):
    sys.path.insert(0, str(REPO / "configs"))
    try:
        import mt
    finally:
        sys.path.pop(0)
    return mt.preset_config(preset)


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def apply_overrides(cfg, overrides: Sequence[str]):
    """`key.path=value` pairs onto a ConfigDict (values parsed to the existing key's type)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("config.")
        if not sep or not key:
            raise ValueError(f"--override {item!r}: expected key=value")
        if key in RESERVED:
            raise ValueError(f"--override {key}: set by the script per arm/seed ({', '.join(RESERVED)})")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            if p not in node:
                raise ValueError(f"--override {key}: unknown config key {p!r}")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"--override {key}: unknown config key {leaf!r}")
        try:
            node[leaf] = _parse_value(text, node[leaf])
        except (TypeError, ValueError) as e:
            raise ValueError(f"--override {item!r}: {e}") from e
    return cfg


def arm_config(preset: str, overrides: Sequence[str], arm: str, seed: int):
    """The preset, the overrides, then the arm (`mtjax.arms.apply_arm`) and the seed."""
    cfg = apply_arm(apply_overrides(load_preset(preset), overrides), arm)
    cfg.seed = seed
    cfg.reward_model.head_seed = seed
    return cfg


# ----------------------------------------------------------------------------- AlpacaEval (base-RM judge)


def alpaca_settings(cfg, num_prompts: int, data: str) -> dict:
    """What an alpaca_eval/iter_t.json was computed with; a stored file is reused only if it matches."""
    return {"num_prompts": num_prompts, "data": str(data), "max_new_tokens": int(cfg.sampling.max_new_tokens),
            "temperature": 0.0, "judge": "base_rm", "seed": int(cfg.seed)}


def run_dir(workdir: str | Path, seed: int, arm: str) -> Path:
    """The run directory of one arm and seed of the study in `workdir`."""
    return Path(workdir) / layout.study_run(seed, arm)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def alpaca_done(arm_dir: Path, t: int, settings: Mapping) -> bool:
    stored = read_json(arm_dir / layout.replicate_alpaca_eval(t))
    return bool(stored) and stored.get("settings") == dict(settings)


def alpaca_eval(run, t: int, examples, settings: Mapping, reference_cache: Path | None = None) -> dict:
    """π_t (greedy) on the AlpacaEval prompts vs the GPT-4-turbo references, judged by the run's r0.

    The headline number is the raw RM-judged win rate (ties half); the length-controlled one is stored
    too, but with a few prompts and ≤ max_new_tokens-token answers against long references it is an
    extrapolation of a 2-parameter fit far outside the data, not a measurement."""
    import dataclasses

    from mtjax import data
    from mtjax.em import response_text, sample_responses
    from mtjax.evaluate import reward_model_win_rate

    start = time.perf_counter()
    models = run.models
    policy, _ = run.params_at(t)
    _, r0 = run.params_at(0)
    instructions = [e.instruction for e in examples]
    references = [e.reference_output for e in examples]
    prompt_ids = [data.chat_prompt_ids(models.tokenizer, x) for x in instructions]
    greedy = dataclasses.replace(run.sampling, temperature=0.0)
    samples = [s[0] for s in sample_responses(models, policy, prompt_ids, 1, greedy, seed=0, mesh=run.mesh,
                                              progress=False)]
    responses = [response_text(models, s) for s in samples]
    # The policy's responses are scored on their sampled ids; the references as text (`RewardScorer.score_texts`:
    # text + stop id, cut to the RM's context, counted).
    known = {(x, text): (p, list(s.ids))
             for x, p, s, text in zip(instructions, prompt_ids, samples, responses, strict=True)}

    # r0 and the references are the same for every arm and iteration of a seed: their (long, slow to
    # score) rewards are computed once per seed and stored next to mutual's AlpacaEval results.
    stored = read_json(reference_cache) if reference_cache else None
    cached = stored and stored.get("settings") == dict(settings)
    ref_scores = dict(stored["scores"]) if cached else {}
    cut = stored.get("references_cut_to_context", 0) if cached else 0
    ref_of = dict(zip(instructions, references, strict=True))

    def score_fn(prompts, texts):
        nonlocal cut
        is_ref = all(ref_of.get(p) == r for p, r in zip(prompts, texts, strict=True))
        if is_ref and all(p in ref_scores for p in prompts):
            return np.asarray([ref_scores[p] for p in prompts], np.float64)
        before = run.scorer.truncated
        scores = run.scorer.score_texts(r0, list(prompts), list(texts), known, progress=False)
        if is_ref:
            cut += run.scorer.truncated - before
            ref_scores.update(zip(prompts, map(float, scores), strict=True))
            if reference_cache:
                write_json(reference_cache, {"settings": dict(settings), "scores": sorted(ref_scores.items()),
                                             "references_cut_to_context": cut})
        return scores

    try:
        result = reward_model_win_rate(score_fn, instructions, responses, references, progress=False)
    except ValueError as e:  # e.g. the length-controlled fit; keep the raw numbers
        result = {"error": str(e)}
    result.update(truncated_fraction=float(np.mean([not s.stopped for s in samples])),
                  references_cut_to_context=cut, seconds=time.perf_counter() - start)
    return {"iteration": t, "settings": dict(settings), "headline": "win_rate", "metrics": result,
            "responses": [{"instruction": x, "output": r, "stopped": s.stopped}
                          for x, r, s in zip(instructions, responses, samples, strict=True)]}


def _no_nan(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Atomic, and only when the content changes (a rerun leaves files untouched); NaN is written as null."""
    write_bytes(path, (json.dumps(_no_nan(obj), indent=2, default=float) + "\n").encode())


def write_bytes(path: Path, content: bytes) -> None:
    if path.is_file() and path.read_bytes() == content:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    tmp.replace(path)


# ----------------------------------------------------------------------------- running


def arm_iterations(cfg) -> list[int]:
    """0 (π0 and r0) and the arm's iterations (`settings.MTConfig.iterations`)."""
    from mtjax import settings

    return [0, *settings.build(settings.MTConfig, cfg.mt).iterations(cfg.iterations)]


def check_config(arm_dir: Path, cfg) -> None:
    """The run directory's own guard, without loading any model (for arms skipped as finished)."""
    from mtjax.rundir import ConfigMismatchError, RunDir, config_changes

    changes = config_changes(RunDir.read_config(arm_dir), cfg.to_dict())
    if changes:
        raise ConfigMismatchError(f"{arm_dir} was written by a different config ({'; '.join(changes[:5])}); "
                                  "use another --workdir or the same --preset/--override as before")


def run_arm(args, arm: str, seed: int, examples) -> dict:
    """Runs (or resumes) one arm of one seed and its AlpacaEval evaluations; returns timing info."""
    from mtjax import em
    from mtjax.settings import validate_config

    cfg = arm_config(args.preset, args.override, arm, seed)
    arm_dir, mutual_dir = run_dir(args.workdir, seed, arm), run_dir(args.workdir, seed, "mutual")
    iterations = arm_iterations(cfg)
    settings = alpaca_settings(cfg, args.alpaca_prompts, args.alpaca_data)
    want_alpaca = [t for t in iterations if args.alpaca_prompts > 0 and not alpaca_done(arm_dir, t, settings)]
    finished = (arm_dir / layout.SUMMARY_FILE).is_file()
    if finished:
        check_config(arm_dir, cfg)
    if arm != "mutual" and 0 in want_alpaca:  # π0 greedy and r0 are the same for every arm of a seed
        stored = read_json(mutual_dir / layout.replicate_alpaca_eval(0))
        if stored and stored.get("settings") == settings:
            write_json(arm_dir / layout.replicate_alpaca_eval(0), stored)
            want_alpaca.remove(0)
    if finished and not want_alpaca:
        return {"status": "done", "seconds": 0.0}
    start, cpu = time.perf_counter(), time.process_time()
    if arm != "mutual":
        validate_config(cfg)
        em.share_base_phases(str(mutual_dir), cfg, str(arm_dir))
    elif seed != args.seeds_list[0] and not finished:  # the first seed's prompts and π0 (sft has its own seed)
        first = run_dir(args.workdir, args.seeds_list[0], "mutual")
        if (first / layout.SUMMARY_FILE).is_file():
            validate_config(cfg)
            em.share_phases(str(first), cfg, str(arm_dir))
    run = em.MutualTaught(cfg, str(arm_dir))
    if not finished:
        run.run()
    for t in want_alpaca:
        cache = mutual_dir / layout.REPLICATE_REFERENCE_SCORES
        write_json(arm_dir / layout.replicate_alpaca_eval(t), alpaca_eval(run, t, examples, settings, cache))
    del run
    seconds = time.perf_counter() - start
    add_arm_seconds(arm_dir, seconds, time.process_time() - cpu)
    return {"status": "resumed" if finished else "ran", "seconds": seconds}


# ----------------------------------------------------------------------------- aggregation


def _flatten(d: Mapping, prefix: str = "") -> dict[str, float]:
    from mtjax.report import flatten_metrics

    return flatten_metrics(d, prefix)


def read_arm(arm_dir: Path, metrics: Sequence[tuple[str, str, str, str]] = METRICS) -> dict[int, dict[str, float]]:
    """iteration -> metric -> value for one run directory (eval/iter_t.json, alpaca_eval/iter_t.json)."""
    out: dict[int, dict[str, float]] = {}
    for path in sorted(arm_dir.glob(layout.eval_metrics("*"))):
        record = read_json(path)
        t = int(record["iteration"])
        flat = _flatten(record["metrics"])
        out[t] = {key: flat.get(name, math.nan) for key, _, where, name in metrics if where == "eval"}
    for path in sorted(arm_dir.glob(layout.replicate_alpaca_eval("*"))):
        record = read_json(path)
        t = int(record["iteration"])
        if t in out:
            for key, _, where, name in metrics:
                if where == "alpaca":
                    value = record["metrics"].get(name)
                    out[t][key] = math.nan if value is None else float(value)
    return out


SECONDS_FILE = layout.REPLICATE_SECONDS_FILE  # per arm directory: what running it took (summed over resumes)


def arm_seconds(arm_dir: Path) -> dict[str, float] | None:
    """Wall and CPU seconds (all threads of the process) that running the arm took, AlpacaEval included,
    shared phases not (they count where they ran)."""
    return read_json(arm_dir / SECONDS_FILE)


def add_arm_seconds(arm_dir: Path, wall: float, cpu: float) -> None:
    before = arm_seconds(arm_dir) or {"wall": 0.0, "cpu": 0.0}
    write_json(arm_dir / SECONDS_FILE, {"wall": before["wall"] + wall, "cpu": before["cpu"] + cpu})


def _stats(values: Sequence[float]) -> dict:
    """Mean, std (ddof 1) and the half-width of the 95 % Student-t confidence interval of the mean."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if not len(v):
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    std = float(v.std(ddof=1)) if len(v) > 1 else None
    ci = t_critical(len(v)) * std / math.sqrt(len(v)) if std is not None else None
    return {"mean": float(v.mean()), "std": std, "ci95": ci, "n": int(len(v))}


# Two-sided 95% critical values of Student's t for n − 1 = 1..9 degrees of freedom (then ~normal): with
# 3 seeds a mean difference must exceed 4.3 standard errors, not 2, to count.
T_CRITICAL_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)


def t_critical(n: int) -> float:
    return T_CRITICAL_95[n - 2] if n - 2 < len(T_CRITICAL_95) else 1.96


def compare(name: str, metric: str, a: Mapping[int, float], b: Mapping[int, float], expect: str) -> dict:
    """a − b over the seeds both have (paired: same seed = same prompts, r0 and π0). `expect` '>' means the
    claim predicts a > b, '<' that a < b. Noise: the standard error of the mean paired difference; the
    difference counts when |mean| > t·SE, t the 95% two-sided Student critical value for n − 1 degrees of
    freedom (the paired t-test at p < 0.05; `p` is its two-sided p-value, `z` the difference in SEs)."""
    seeds = sorted(set(a) & set(b))
    diffs = np.asarray([a[s] - b[s] for s in seeds if not (math.isnan(a[s]) or math.isnan(b[s]))], np.float64)
    row = {"claim": name, "metric": metric, "n": int(len(diffs)), "mean_diff": None, "se": None}
    if not len(diffs):
        return {**row, "verdict": "no data yet"}
    mean = float(diffs.mean())
    right = mean > 0 if expect == ">" else mean < 0
    row["mean_diff"] = mean
    if mean == 0:
        return {**row, "se": float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else None,
                "verdict": "no difference" + (" (1 seed: no noise estimate)" if len(diffs) < 2 else "")}
    if len(diffs) < 2:
        return {**row, "verdict": ("direction as claimed" if right else "opposite to claim")
                + " (1 seed: no noise estimate)"}
    se = float(diffs.std(ddof=1) / math.sqrt(len(diffs)))
    t = t_critical(len(diffs))
    row.update(se=se, t=t, z=mean / se if se > 0 else math.inf, p=paired_p_value(mean, se, len(diffs)))
    beyond = abs(mean) > t * se
    if right:
        verdict = f"supported (|diff| > {t:.1f} SE)" if beyond else "direction as claimed, within noise"
    else:
        verdict = f"contradicted (|diff| > {t:.1f} SE)" if beyond else "opposite to claim, within noise"
    return {**row, "verdict": verdict}


def paired_p_value(mean: float, se: float, n: int) -> float:
    """Two-sided p-value of the paired t-test (n − 1 degrees of freedom)."""
    from scipy import stats

    return 0.0 if se == 0 else float(2 * stats.t.sf(abs(mean) / se, n - 1))


def _policy_pairs(arm_dir: Path, t: int) -> dict[tuple, tuple] | None:
    from mtjax.rundir import read_jsonl

    path = arm_dir / layout.pairs_file(layout.e_step(t))
    if not path.is_file():
        return None
    rows = read_jsonl(path)
    return {tuple(r["prompt_ids"]): (tuple(r["chosen_ids"]), tuple(r["rejected_ids"])) for r in rows}


def pair_agreement(workdir: Path, arms: Sequence[str], seeds: Sequence[int], iterations: Sequence[int]) -> dict:
    """arm -> t -> stats over seeds of the fraction of mutual's E-step pairs at iteration t that the arm's
    E-step chose identically (same prompt, same chosen and rejected response). An M-step variant can only
    change the policy through these pairs: at 1.0 its π_t is mutual's."""
    out: dict[str, dict[str, dict]] = {}
    for arm in arms:
        if arm in ("mutual", "frozen", "offline"):  # frozen and offline see other prompts in their E-steps
            continue
        for t in iterations:
            if t < 2:  # iteration 1's E-step uses r0 and π0 in every arm
                continue
            fractions = []
            for seed in seeds:
                ours = _policy_pairs(run_dir(workdir, seed, "mutual"), t)
                theirs = _policy_pairs(run_dir(workdir, seed, arm), t)
                if ours and theirs is not None:
                    fractions.append(float(np.mean([theirs.get(k) == v for k, v in ours.items()])))
            if fractions:
                out.setdefault(arm, {})[str(t)] = {**_stats(fractions), "values": fractions}
    return out


# The pairs files a run stores (the phase's step, the pairs' kind: `layout.pairs_file`) and how the tables
# name them.
PAIR_FILES = {(layout.E_STEP, None): "E-step (policy)", (layout.M_STEP, layout.SELF_PAIRS): "M-step self-training",
              (layout.M_STEP, layout.CONTRASTIVE_PAIRS): "M-step contrastive"}


def pair_gold_agreement(workdir: Path, arms: Sequence[str], seeds: Sequence[int]) -> dict:
    """arm -> pair kind -> t -> stats over seeds of the fraction of the arm's stored training pairs whose chosen
    response has the higher gold reward (gold ties left out): how right the labels each step trains on are.
    For the synthetic task, whose token ids decode to the exact response text."""
    from mtjax import settings, synthetic
    from mtjax.rundir import read_jsonl
    from mtjax.tasks import SyntheticTask

    tokenizer = synthetic.make_tokenizer()
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for arm in arms:
        for seed in seeds:
            arm_dir = run_dir(workdir, seed, arm)
            config = read_json(arm_dir / layout.CONFIG_FILE)
            if config is None:
                continue
            task = SyntheticTask(settings.build(synthetic.TaskConfig, config["task"]))
            for (step, pairs_kind), kind in PAIR_FILES.items():
                for path in sorted(arm_dir.glob(layout.pairs_file(layout.iteration_phase("*", step), pairs_kind))):
                    rows = read_jsonl(path)
                    texts = [[tokenizer.decode(r[k], skip_special_tokens=True) for k in ("chosen_ids", "rejected_ids")]
                             for r in rows]
                    prompts = [{"prompt": tokenizer.decode(r["prompt_ids"], skip_special_tokens=True)} for r in rows]
                    right = [a > b for a, b in task.gold_rewards(prompts, texts) if a != b]
                    if right:
                        t = str(layout.iteration_and_kind("/".join(path.relative_to(arm_dir).parts[:2]))[0])
                        out.setdefault(arm, {}).setdefault(kind, {}).setdefault(t, []).append(float(np.mean(right)))
    return {arm: {kind: {t: {**_stats(v), "values": v} for t, v in sorted(by_t.items())}
                  for kind, by_t in by_kind.items()} for arm, by_kind in out.items()}


def aggregate(workdir: Path, arms: Sequence[str], seeds: Sequence[int], task: str = "testbed") -> dict:
    metrics = METRICS_OF_TASK[task]
    labels = metric_groups(metrics)[2]
    per_seed: dict[str, dict[int, dict[int, dict[str, float]]]] = {}  # arm -> seed -> t -> metric
    seconds: dict[str, dict[int, dict[str, float]]] = {}
    for arm in arms:
        for seed in seeds:
            arm_dir = run_dir(workdir, seed, arm)
            if (arm_dir / layout.EVAL_FOLDER).is_dir():
                per_seed.setdefault(arm, {})[seed] = read_arm(arm_dir, metrics)
            s = arm_seconds(arm_dir)
            if s is not None:
                seconds.setdefault(arm, {})[seed] = s
    table: dict[str, dict[str, dict[str, dict]]] = {}
    for arm, by_seed in per_seed.items():
        iterations = sorted({t for runs in by_seed.values() for t in runs})
        table[arm] = {}
        for t in iterations:
            table[arm][str(t)] = {}
            for key in labels:
                values = {s: runs[t].get(key, math.nan) for s, runs in by_seed.items() if t in runs}
                table[arm][str(t)][key] = {**_stats(list(values.values())),
                                           "values": {str(s): (None if math.isnan(v) else v)
                                                      for s, v in values.items()}}

    def at(arm: str, t: int | str, key: str) -> dict[int, float]:
        return {s: runs[int(t)].get(key, math.nan) for s, runs in per_seed.get(arm, {}).items() if int(t) in runs}

    def final(arm: str, key: str) -> dict[int, float]:
        # The arm's last iteration, per seed, only from seeds whose arm finished (summary.json).
        last = {}
        for s, runs in per_seed.get(arm, {}).items():
            done = (run_dir(workdir, s, arm) / layout.SUMMARY_FILE).is_file()
            if done and runs:
                last[s] = runs[max(runs)].get(key, math.nan)
        return last

    claims = []
    mutual_its = sorted(int(t) for t in table.get("mutual", {}))
    gold, current, base, r0_current = ("gold_reward", "rm_accuracy_current_policy", "rm_accuracy_base_policy",
                                       "rm_r0_accuracy_current_policy")
    for t in mutual_its[1:]:
        claims.append(compare(f"(1) policy improves: mutual iter {t} vs {t - 1}", gold, at("mutual", t, gold),
                              at("mutual", t - 1, gold), ">"))
    if len(mutual_its) > 2:
        last = mutual_its[-1]
        claims.append(compare(f"(1) policy improves over the run: mutual iter {last} vs 0", gold,
                              at("mutual", last, gold), at("mutual", 0, gold), ">"))
    for t in mutual_its[1:]:
        claims.append(compare(f"(2) RM improves on current policy: mutual r_{t} on π_{t} vs r_0 on π_0", current,
                              at("mutual", t, current), at("mutual", 0, current), ">"))
        if r0_current in labels:  # the same pairs judged by both: the M-step's own effect on the RM
            claims.append(compare(f"(2) M-step improves the RM on π_{t}: mutual r_{t} vs r_0 on π_{t}'s samples",
                                  current, at("mutual", t, current), at("mutual", t, r0_current), ">"))
        claims.append(compare(f"(2) RM on base policy: mutual r_{t} vs r_0 on π_0's samples", base,
                              at("mutual", t, base), at("mutual", 0, base), ">"))
    if "frozen" in per_seed:
        claims.append(compare("(2) RM on current policy, final: mutual r_T on π_T vs frozen r_0 on its π_T", current,
                              final("mutual", current), final("frozen", current), ">"))
    for other in ("frozen", "self_only", "contrastive_only"):
        if other in per_seed:
            for key in (k for k in (gold, "alpaca_win_rate") if k in labels):
                claims.append(compare(f"(3) final iteration: mutual > {other}", key, final("mutual", key),
                                      final(other, key), ">"))
    if "mutual_filtered" in per_seed:  # the paper's revision: does the contrastive filter rescue the M-step?
        for other in ("mutual", "frozen"):
            claims.append(compare(f"(3, revision) final iteration: mutual_filtered > {other}", gold,
                                  final("mutual_filtered", gold), final(other, gold), ">"))
    for other in TABLE_1_ARMS:  # the paper's baselines and the related methods (issue 21)
        if other in per_seed:
            its = sorted({t for runs in per_seed[other].values() for t in runs})
            claims.append(compare(f"(baseline) {other} improves over the run: iter {its[-1]} vs 0", gold,
                                  at(other, its[-1], gold), at(other, 0, gold), ">"))
            for key in (k for k in (gold, "alpaca_win_rate") if k in labels):
                claims.append(compare(f"(Table 1) final iteration: mutual > {other}", key, final("mutual", key),
                                      final(other, key), ">"))
    claims += control_claims(per_seed, at, final)
    return {"arms": table, "claims": claims,
            "pair_agreement": pair_agreement(workdir, arms, seeds, mutual_its),
            "pair_gold_agreement": pair_gold_agreement(workdir, arms, seeds) if task == "synthetic" else {},
            "wall_seconds": {arm: {str(s): v["wall"] for s, v in by.items()} for arm, by in seconds.items()},
            "cpu_seconds": {arm: {str(s): v["cpu"] for s, v in by.items()} for arm, by in seconds.items()},
            "per_seed": {arm: {str(s): {str(t): m for t, m in runs.items()} for s, runs in by.items()}
                         for arm, by in per_seed.items()}}


def control_claims(per_seed: Mapping, at, final) -> list[dict]:
    """The study's controls and the method's premise: the oracle M-step must raise gold (positive control),
    random labels must not help (negative control), and r0 should judge the samples of the policies trained
    against it worse than π0's (the premise that the RM needs updating)."""
    gold, current, r0_current = "gold_reward", "rm_accuracy_current_policy", "rm_r0_accuracy_current_policy"
    claims = []
    for arm in ("oracle", "random"):
        its = sorted({t for runs in per_seed.get(arm, {}).values() for t in runs})
        if len(its) > 1:
            claims.append(compare(f"(control) policy improves over the run: {arm} iter {its[-1]} vs 0", gold,
                                  at(arm, its[-1], gold), at(arm, 0, gold), ">"))
    if "oracle" in per_seed:
        claims.append(compare("(control) final iteration: oracle > mutual", gold, final("oracle", gold),
                              final("mutual", gold), ">"))
    if "random" in per_seed:
        claims.append(compare("(control) final iteration: mutual > random", gold, final("mutual", gold),
                              final("random", gold), ">"))
    frozen_its = sorted({t for runs in per_seed.get("frozen", {}).values() for t in runs})
    if len(frozen_its) > 1:  # frozen keeps r0: its current-policy accuracy is r0's on π_t
        claims.append(compare(f"(premise) r0 less accurate on frozen's π_{frozen_its[-1]} than on π_0", current,
                              at("frozen", frozen_its[-1], current), at("frozen", 0, current), "<"))
    mutual_its = sorted({t for runs in per_seed.get("mutual", {}).values() for t in runs})
    if len(mutual_its) > 1 and any(not math.isnan(v) for v in at("mutual", mutual_its[-1], r0_current).values()):
        claims.append(compare(f"(premise) r0 less accurate on mutual's π_{mutual_its[-1]} than on π_0", r0_current,
                              at("mutual", mutual_its[-1], r0_current), at("mutual", 0, current), "<"))
    return claims


def _cell(stat: Mapping, scale: float = 1.0) -> str:
    """mean ± half-width of the 95 % CI (n)."""
    if stat["mean"] is None:
        return "-"
    text = f"{stat['mean'] * scale:.3f}"
    if stat.get("ci95") is not None:
        text += f" ± {stat['ci95'] * scale:.3f}"
    return f"{text} ({stat['n']})"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:+.4f}"


def markdown(results: Mapping) -> str:
    table, meta = results["arms"], results["meta"]
    policy_keys, rm_keys, labels = metric_groups(METRICS_OF_TASK[meta.get("task", "testbed")])
    lines = [f"# Mutual-Taught ablation: preset `{meta['preset']}`, seeds {meta['seeds']}", "",
             "Cells: mean ± half-width of the 95 % confidence interval of the mean (Student t) over finished "
             "seeds (n). Same prompts for every arm and seed; a seed sets `seed` and `reward_model.head_seed`."]
    if "alpaca_win_rate" in labels:
        lines[-1] += (" AlpacaEval WR: π_t greedy vs GPT-4-turbo on the first "
                      f"{meta['alpaca_prompts']} AlpacaEval prompts, judged by the seed's base RM r0 (raw win rate, "
                      "ties half).")
    lines.append("")
    if meta.get("overrides"):
        lines += [f"Overrides: `{' '.join(meta['overrides'])}`", ""]
    for title, keys in (("Policy", policy_keys), ("Reward model", rm_keys)):
        lines += [f"## {title}", "", "| arm | iter | " + " | ".join(labels[k] for k in keys) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in keys) + " |"]
        for arm, by_t in table.items():
            for t, stats in by_t.items():
                lines.append(f"| {arm} | {t} | " + " | ".join(_cell(stats[k]) for k in keys) + " |")
        lines.append("")
    lines += ["## Claims", "", "Differences are paired over seeds (a − b per seed, then mean); SE = std of the "
              "per-seed differences / √n; z = mean diff / SE; p = two-sided p-value of the paired t-test; a "
              "difference counts when p < 0.05, i.e. |mean diff| > t·SE, t the two-sided 95% Student critical "
              "value for n − 1 degrees of freedom (4.3 for 3 seeds, 2.8 for 5).", "",
              "| claim | metric | mean diff | SE | z | p | n | verdict |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c in results["claims"]:
        z, p = c.get("z"), c.get("p")
        lines.append(f"| {c['claim']} | {c['metric']} | {_num(c['mean_diff'])} | "
                     f"{'-' if c['se'] is None else format(c['se'], '.4f')} | {'-' if z is None else f'{z:+.1f}'} | "
                     f"{'-' if p is None else f'{p:.3g}'} | {c['n']} | {c['verdict']} |")
    if results.get("pair_agreement"):
        lines += ["", "## E-step pairs shared with mutual", "",
                  "Fraction of mutual's E-step pairs at iteration t that the arm chose identically (same prompt, "
                  "chosen and rejected): an M-step variant reaches the policy only through these pairs, so at 1.0 "
                  "its π_t equals mutual's.", "", "| arm | iter | shared pairs |", "| --- | ---: | ---: |"]
        for arm, by_t in results["pair_agreement"].items():
            for t, stat in by_t.items():
                lines.append(f"| {arm} | {t} | {_cell(stat)} |")
    if results.get("pair_gold_agreement"):
        lines += ["", "## How often the training pairs agree with gold", "",
                  "Fraction of each step's stored training pairs whose chosen response has the higher gold reward "
                  "(gold ties left out): E-step pairs chosen by r_{t-1}; M-step self-training pairs labelled by "
                  "r_{t-1}; contrastive pairs labelled 'π_t's response wins' (oracle: by gold, random: by a coin).",
                  "", "| arm | pairs | iter | agreement with gold |", "| --- | --- | ---: | ---: |"]
        for arm, by_kind in results["pair_gold_agreement"].items():
            for kind, by_t in by_kind.items():
                for t, stat in by_t.items():
                    lines.append(f"| {arm} | {kind} | {t} | {_cell(stat)} |")
    lines += ["", "## Time per arm (s; wall / CPU of all threads; shared phases count where they ran)", "",
              "| arm | " + " | ".join(f"seed {s}" for s in meta["seeds"]) + " |",
              "| --- | " + " | ".join("---:" for _ in meta["seeds"]) + " |"]
    for arm, by_seed in results["wall_seconds"].items():
        cpu = results["cpu_seconds"][arm]
        lines.append(f"| {arm} | " + " | ".join(f"{by_seed[str(s)]:.0f} / {cpu[str(s)]:.0f}" if str(s) in by_seed
                                                 else "-" for s in meta["seeds"]) + " |")
    wall = sum(v for by in results["wall_seconds"].values() for v in by.values())
    cpu = sum(v for by in results["cpu_seconds"].values() for v in by.values())
    lines += ["", f"Total: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU."]
    lines += ["", "![gold reward](gold_reward.png) ![RM accuracy](rm_accuracy_current_policy.png) "
              "![final iteration](final_iteration.png)", ""]
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def plot(results: Mapping, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["arms"]
    labels = metric_groups(METRICS_OF_TASK[results["meta"].get("task", "testbed")])[2]
    paths = []
    lines = {"gold_reward": "Policy gold reward (held-out)",
             "rm_accuracy_current_policy": "RM accuracy on the current policy's gold pairs",
             "rm_r0_accuracy_current_policy": "r0's accuracy on the current policy's gold pairs"}
    colors, markers = plt.get_cmap("tab20").colors, "os^vDP*Xhp<>d"  # one look per arm, up to 20 arms
    style = {arm: dict(color=colors[i % len(colors)], marker=markers[i % len(markers)])
             for i, arm in enumerate(table)}
    for key, title in ((k, v) for k, v in lines.items() if k in labels):
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        for i, (arm, by_t) in enumerate(table.items()):
            pts = [(int(t), s[key]) for t, s in by_t.items() if s[key]["mean"] is not None]
            if pts:
                xs = np.asarray([t for t, _ in pts], np.float64) + 0.03 * (i - (len(table) - 1) / 2)
                ax.errorbar(xs, [s["mean"] for _, s in pts], yerr=[s.get("ci95") or 0.0 for _, s in pts],
                            capsize=3, label=arm, **style[arm])
        ax.set_title(f"{title}\nmean ± 95 % CI over seeds", fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_xticks(sorted({int(t) for by_t in table.values() for t in by_t}))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        else:
            ax.text(0.5, 0.5, "no data (e.g. every gold pair tied)", ha="center", transform=ax.transAxes)
        fig.tight_layout()
        path = out / f"{key}.png"
        write_bytes(path, _png(fig))
        plt.close(fig)
        paths.append(path)
    keys = [k for k in ("gold_reward", "alpaca_win_rate", "rm_accuracy_current_policy",
                        "rm_r0_accuracy_current_policy") if k in labels]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4))
    arms = list(table)
    for ax, key in zip(axes, keys, strict=True):
        stats = [table[a][max(table[a], key=int)][key] for a in arms]
        ax.bar(range(len(arms)), [s["mean"] if s["mean"] is not None else 0.0 for s in stats],
               yerr=[s.get("ci95") or 0.0 for s in stats], capsize=3, color=[style[a]["color"] for a in arms])
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(labels[key] + " (final iter, ± 95 % CI)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = out / "final_iteration.png"
    write_bytes(path, _png(fig))
    plt.close(fig)
    paths.append(path)
    return paths


def write_results(args, arms: Sequence[str], seeds: Sequence[int]) -> dict:
    workdir = Path(args.workdir)
    results = aggregate(workdir, arms, seeds, args.task)
    results["meta"] = {"preset": args.preset, "task": args.task, "seeds": list(seeds), "arms": list(arms),
                       "overrides": list(args.override), "alpaca_prompts": args.alpaca_prompts,
                       "alpaca_data": str(args.alpaca_data), "alpaca_headline": "raw RM-judged win_rate (%)"}
    text = markdown(results)
    write_bytes(workdir / "results.md", text.encode())
    write_json(workdir / "results.json", results)
    if results["arms"]:
        plot(results, workdir)
    return {**results, "markdown": text}


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default", help="configs/mt.py preset (default: default)")
    parser.add_argument("--seeds", help=f"comma-separated seeds (default {DEFAULTS['seeds']}; synthetic: "
                        f"{PRESET_DEFAULTS['synthetic']['seeds']})")
    parser.add_argument("--arms", help=f"comma-separated subset of {', '.join(ARMS)} (default {DEFAULTS['arms']}; "
                        f"synthetic: {PRESET_DEFAULTS['synthetic']['arms']})")
    parser.add_argument("--workdir", default="runs/replicate")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every arm (repeatable), e.g. sampling.max_new_tokens=64")
    parser.add_argument("--alpaca-prompts", type=int, help="AlpacaEval prompts per evaluation (0 = off; default "
                        f"{DEFAULTS['alpaca_prompts']}, synthetic: 0)")
    parser.add_argument("--alpaca-data", default=str(DEFAULT_ALPACA),
                        help="AlpacaEval-2 file (or hub id) with GPT-4-turbo reference outputs")
    parser.add_argument("--report-only", action="store_true", help="only aggregate what is finished")
    parser.add_argument("--compilation-cache", default="~/.cache/mtjax/xla",
                        help="jax's persistent compilation cache, as for python -m mtjax.run (empty: off)")
    args = parser.parse_args(argv)
    for name, value in {**DEFAULTS, **PRESET_DEFAULTS.get(args.preset, {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.seeds_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.arms_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms_list if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    if "mutual" not in args.arms_list:
        parser.error("the arms need `mutual`: the others start from its base phases")
    args.arms_list = ["mutual"] + [a for a in ARMS if a in args.arms_list and a != "mutual"]
    try:
        for arm in args.arms_list:  # bad overrides fail here, before anything runs
            cfg = arm_config(args.preset, args.override, arm, args.seeds_list[0] if args.seeds_list else 0)
    except ValueError as e:
        parser.error(str(e))
    args.task = cfg.task.name
    if args.task != "testbed" and args.alpaca_prompts > 0:
        parser.error(f"--alpaca-prompts {args.alpaca_prompts}: AlpacaEval needs the testbed task (English prompts); "
                     f"preset {args.preset!r} runs the {args.task} task (use --alpaca-prompts 0)")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    args = parse_args(argv)
    arms, seeds = args.arms_list, args.seeds_list
    failures = []
    if not args.report_only:
        from tqdm.auto import tqdm

        from mtjax.run import enable_compilation_cache

        if args.compilation_cache:
            enable_compilation_cache(args.compilation_cache)
        examples = []
        if args.alpaca_prompts > 0:
            from mtjax.testbed.benchmarks import load_alpaca_eval

            examples = load_alpaca_eval(args.alpaca_data)[: args.alpaca_prompts]
        jobs = [(seed, arm) for seed in seeds for arm in arms]
        bar = tqdm(jobs, desc="replicate", unit="arm", position=0, leave=True)
        failed_mutual: set[int] = set()
        for seed, arm in bar:
            bar.set_postfix_str(f"seed {seed} {arm}")
            if seed in failed_mutual:
                print(f"replicate: seed {seed} {arm}: skipped (mutual failed)", flush=True)
                continue
            try:
                info = run_arm(args, arm, seed, examples)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one failed arm should not lose the rest of a long run
                traceback.print_exc()
                failures.append(f"seed {seed} {arm}: {type(e).__name__}: {e}")
                mutual_dir = run_dir(args.workdir, seed, "mutual")
                if arm == "mutual" and not (mutual_dir / layout.SUMMARY_FILE).is_file():
                    failed_mutual.add(seed)  # (a failed AlpacaEval alone does not block the other arms)
                print(f"replicate: seed {seed} {arm}: FAILED ({e})", flush=True)
                continue
            status = "already done" if info["status"] == "done" else f"{info['status']} in {info['seconds']:.0f}s"
            tqdm.write(f"replicate: seed {seed} {arm}: {status}")
            if info["status"] != "done":
                write_results(args, arms, seeds)  # partial results after every arm
        bar.close()
    results = write_results(args, arms, seeds)
    print("\n" + results["markdown"])
    print(f"replicate: this invocation took {(time.perf_counter() - start) / 60:.1f} min wall, "
          f"{(time.process_time() - cpu) / 60:.1f} min CPU")
    print(f"replicate: wrote {Path(args.workdir) / 'results.md'}, results.json and PNGs")
    if failures:
        print("replicate: failures:\n  " + "\n  ".join(failures), file=sys.stderr)
        results["failures"] = failures
    return results


if __name__ == "__main__":
    out = main()
    sys.exit(1 if out.get("failures") else 0)
