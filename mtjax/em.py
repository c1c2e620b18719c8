"""The Mutual-Taught loop (Shi et al., 2025): E-step trains the policy on pairs chosen by the reward
model, M-step retrains the reward model (from the base RM r0) on contrastive pairs (new policy vs old)
and on self-labelled pairs of the new policy's samples.

Every phase writes its outputs into the run directory and is then recorded as done, so a rerun
resumes after the last finished phase (see `mtjax.rundir`). Phases, in order:

    prompts                  the task's prompt splits (recorded ids; `mtjax.tasks`)
    sft                      (optional) π0: the policy trained on the task's demonstrations
    base_rm                  r0: the RM trained on the gold-labelled "human" split
    iter_0/eval              base policy and r0 on held-out prompts
    iter_t/e_step            sample K from π_{t-1} on D_t, score with r_{t-1} (or an LLM judge, `mt.policy_rewards`),
                             length-controlled (or best-vs-worst) pairs, DPO / IPO / SimPO / SPPO from π_{t-1}
                             (reference π_{t-1}) → π_t
    iter_t/m_step            samples of π_t and π_{t-1} on D_R → contrastive + self pairs → r_t (the oracle
                             and random controls relabel the same pairs by gold / a coin; SER labels every pair
                             of π_t's samples itself and keeps the confident ones, for `mt.ser_rounds` rounds)
    iter_t/eval              π_t and r_t on held-out prompts
    iter_t/gate              (optional) keep π_t only if r_t prefers it to the kept policy at a rate ≥ τ
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from mtjax import data, layout, settings, tracking
from mtjax.device_memory import explain, is_out_of_memory, working_on
from mtjax.distributed import barrier, is_primary
from mtjax.divergence import DivergenceError, DivergenceGuard, nonfinite_count
from mtjax.interrupts import Interrupted, stop_if_preempted
from mtjax.phases import depends_on, independent_of, training_section
from mtjax.rundir import RunDir, read_jsonl_prefix
from mtjax.train_checkpoint import TrainCheckpoint, host_metrics

# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class Models:
    policy: Any  # CausalLM module
    reward: Any  # RewardModel module
    tokenizer: Any  # the policy's
    reward_tokenizer: Any
    policy_params: Any  # π0
    reward_init_params: Any  # the RM's starting point (backbone + seeded score head, or a trained RM)
    stop_ids: tuple[int, ...]  # the policy's stop ids (config, generation config and tokenizer)
    pad_id: int  # the policy's
    reward_pad_id: int

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.stop_ids


def describe_models(cfg: ConfigDict) -> dict[str, Any]:
    """The policy's and the reward model's `sources.ModelSpec`: checkpoint configs with the run's model
    settings on top, tokenizers and stop ids, read without loading any weights."""
    from mtjax.models.config import ModelConfig
    from mtjax.sources import ModelSource, describe

    return {name: describe(settings.build(ModelSource, cfg[name]), settings.set_values(ModelConfig, cfg[name]), name)
            for name in ("policy", "reward_model")}


def load_models(specs: Mapping[str, Any], run_seed: int, mesh=None) -> Models:
    """π0 and the RM's starting point from described sources (`describe_models`), placed on `mesh` by the
    partition rules (an HF checkpoint is streamed shard by shard: no host or device holds a whole model)."""
    from mtjax.sharding import shard_params
    from mtjax.sources import load

    policy, policy_params = load(specs["policy"], "causal_lm", run_seed, mesh)
    reward, reward_params = load(specs["reward_model"], "reward", run_seed, mesh)
    if mesh is not None:
        policy_params, reward_params = shard_params(policy_params, mesh), shard_params(reward_params, mesh)
    p, r = specs["policy"], specs["reward_model"]
    return Models(policy, reward, p.tokenizer, r.tokenizer, policy_params, reward_params, p.stop_ids, p.pad_id,
                  r.pad_id)


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class Sample:
    ids: tuple[int, ...]  # response tokens, the stop token included when `stopped`
    stopped: bool


def sample_responses(models: Models, params: Any, prompt_ids: Sequence[Sequence[int]], num_samples: int,
                     sampling: Any, seed: int, mesh=None, first_prompt_index: int = 0) -> list[list[Sample]]:
    """`num_samples` responses per prompt from the policy, as the `sampling.SamplingConfig` says."""
    from mtjax.sampling import generate

    options = {**dataclasses.asdict(sampling), "num_samples": num_samples}
    out = generate(models.policy, params, [list(p) for p in prompt_ids], eos_token_ids=models.stop_ids,
                   pad_token_id=models.pad_id, seed=seed, mesh=mesh, first_prompt_index=first_prompt_index,
                   **options)
    return [[Sample(tuple(int(t) for t in s.token_ids), s.finish_reason == "stop") for s in per_prompt]
            for per_prompt in out]


def response_text(models: Models, sample: Sample | Sequence[int]) -> str:
    from mtjax.sampling import decode

    return decode(models.tokenizer, list(sample.ids if isinstance(sample, Sample) else sample), models.stop_ids)


# ----------------------------------------------------------------------------- pairs


@dataclasses.dataclass
class PairSet:
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    counts: Counter
    # per-pair numbers the training step reads besides the tokens (SPPO's `train.WIN_PROB_KEYS`)
    values: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.chosen)

    def append(self, prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], **values: float) -> None:
        self.prompts.append(list(prompt))
        self.chosen.append(list(chosen))
        self.rejected.append(list(rejected))
        for name, value in values.items():
            self.values.setdefault(name, []).append(float(value))

    def rows(self, kind: str) -> list[dict]:
        return [{"kind": kind, "prompt_ids": p, "chosen_ids": c, "rejected_ids": r,
                 **{name: values[i] for name, values in self.values.items()}}
                for i, (p, c, r) in enumerate(zip(self.prompts, self.chosen, self.rejected, strict=True))]


def pairable(per_prompt: Sequence[Sample], per_rewards: Sequence[float] | None, drop_truncated: bool,
             counts: Counter) -> list[int]:
    """Indices of a prompt's samples that may enter a pair: the first of each distinct response, stopped ones
    only with `drop_truncated`, scored ones only (a judge may leave a response without a reward); every
    sample left out is counted by reason."""
    keep, dropped = data.drop_duplicate_responses([s.ids for s in per_prompt])
    counts["duplicate_responses"] += dropped
    if drop_truncated:
        counts["truncated_responses"] += sum(not per_prompt[i].stopped for i in keep)
        keep = [i for i in keep if per_prompt[i].stopped]
    if per_rewards is not None:
        counts["unscored_responses"] += sum(not math.isfinite(per_rewards[i]) for i in keep)
        keep = [i for i in keep if math.isfinite(per_rewards[i])]
    return keep


def policy_pairs(prompt_ids: Sequence[Sequence[int]], samples: Sequence[Sequence[Sample]],
                 rewards: Sequence[Sequence[float]], drop_truncated: bool, rule: str = "length_controlled",
                 win_probs: bool = False) -> PairSet:
    """One pair per prompt by `rule` (`settings.POLICY_PAIRS`: `data.select_length_controlled_pair`, or the
    highest- against the lowest-reward response); every skip is counted by reason. `win_probs`: each pair
    carries its responses' estimated win probabilities against the policy (`losses.sppo_win_probabilities`
    over all of the prompt's scored samples, duplicates included, as SPPO estimates them)."""
    from mtjax.losses import sppo_win_probabilities

    pairs = PairSet([], [], [], Counter())
    for prompt, per_prompt, per_rewards in zip(prompt_ids, samples, rewards, strict=True):
        keep = pairable(per_prompt, per_rewards, drop_truncated, pairs.counts)
        kept_rewards = [per_rewards[i] for i in keep]
        if rule == "best_worst":
            choice = data.select_best_worst_pair(kept_rewards)
        else:
            choice = data.select_length_controlled_pair(kept_rewards, [len(per_prompt[i].ids) for i in keep])
        if isinstance(choice, str):
            pairs.counts[f"skipped_{choice}"] += 1
            continue
        chosen, rejected = keep[choice.chosen], keep[choice.rejected]
        values = {}
        if win_probs:
            scored = [i for i, r in enumerate(per_rewards) if math.isfinite(r)]
            p = np.asarray(sppo_win_probabilities(np.asarray([per_rewards[i] for i in scored])))
            values = dict(zip(train_win_prob_keys(), (p[scored.index(chosen)], p[scored.index(rejected)]),
                              strict=True))
        pairs.append(prompt, per_prompt[chosen].ids, per_prompt[rejected].ids, **values)
    pairs.counts["pairs"] = len(pairs)
    return pairs


def length_controlled_pairs(prompt_ids: Sequence[Sequence[int]], samples: Sequence[Sequence[Sample]],
                            rewards: Sequence[Sequence[float]], drop_truncated: bool) -> PairSet:
    """One pair per prompt by `data.select_length_controlled_pair`; every skip is counted by reason."""
    return policy_pairs(prompt_ids, samples, rewards, drop_truncated)


def train_win_prob_keys() -> tuple[str, str]:
    from mtjax.train import WIN_PROB_KEYS

    return WIN_PROB_KEYS


def encode_pairs(pairs: PairSet, max_length: int) -> tuple[list, list, Counter, dict[str, np.ndarray]]:
    """The pairs as `data.Completion`s cut to `max_length`, and their per-pair values; a pair whose prompt
    alone fills `max_length` is dropped (counted)."""
    chosen, rejected, counts, kept = [], [], Counter(), []
    for i, (p, c, r) in enumerate(zip(pairs.prompts, pairs.chosen, pairs.rejected, strict=True)):
        ec, er = data.encode_completion(p, c, max_length), data.encode_completion(p, r, max_length)
        if ec is None or er is None:
            counts["dropped_prompt_too_long"] += 1
            continue
        counts["truncated_to_max_length"] += int(ec.truncated or er.truncated)
        chosen.append(ec)
        rejected.append(er)
        kept.append(i)
    values = {name: np.asarray(v, np.float32)[kept] for name, v in pairs.values.items()}
    return chosen, rejected, counts, values


def _shuffled_batches(num_rows: int, batch_size: int, seed: int):
    """(row indices, weights) of shuffled batches of exactly `batch_size` rows (one compiled shape per length
    bucket); the last is padded with repeats of weight 0, never dropped."""
    order = np.random.default_rng(seed).permutation(num_rows)
    for start in range(0, len(order), batch_size):
        idx = list(order[start:start + batch_size])
        real = len(idx)
        yield idx + [idx[0]] * (batch_size - real), (np.arange(batch_size) < real).astype(np.float32)


def pair_batches(chosen, rejected, pad_id: int, batch_size: int, max_length: int, seed: int,
                 per_pair: Mapping[str, np.ndarray] | None = None):
    """Shuffled pair batches (see `_shuffled_batches`) with `pair_weight`; `per_pair` arrays (e.g. reference
    log-probs) follow the same shuffle."""
    for idx, weights in _shuffled_batches(len(chosen), batch_size, seed):
        batch = data.collate_pairs([chosen[i] for i in idx], [rejected[i] for i in idx], pad_id, max_length)
        batch["pair_weight"] = weights
        for name, values in (per_pair or {}).items():
            batch[name] = np.asarray(values)[idx]
        yield batch


def sequence_batches(completions: Sequence[data.Completion], pad_id: int, batch_size: int, max_length: int,
                     seed: int):
    """Shuffled batches of single sequences (see `_shuffled_batches`) with `sequence_weight`, for SFT."""
    for idx, weights in _shuffled_batches(len(completions), batch_size, seed):
        rows = [completions[i] for i in idx]
        length = data.padded_length([len(c.input_ids) for c in rows], 64, max_length)
        yield {**data.collate(rows, pad_id, length), "sequence_weight": weights}


# ----------------------------------------------------------------------------- training


def _num_steps(num_pairs: int, batch_size: int, epochs: int) -> int:
    return max(1, math.ceil(num_pairs / batch_size)) * epochs


def _run_steps(step_fn: Callable, state: Any, batches_per_epoch: Callable[[int], Any], epochs: int,
               total: int, desc: str, log: Callable[[dict], None], mesh,
               checkpoint: TrainCheckpoint | None = None, section: str = "dpo") -> tuple[Any, list[dict]]:
    """Runs `total` steps over `epochs` passes of `batches_per_epoch(epoch)`. Every step passes the divergence
    guard (`mtjax.divergence`) before it counts. With `checkpoint`, resumes from its last save (skipping the
    batches already trained on), saves as its policies say, and saves on Ctrl-C / SIGTERM / preemption.
    `section` names the config section in out-of-memory messages."""
    from mtjax.sharding import shard_global_batch

    guard = checkpoint.guard if checkpoint is not None and checkpoint.guard is not None else DivergenceGuard(desc)
    history: list[dict] = []
    restored = checkpoint.restore(state) if checkpoint is not None else None
    if restored is not None:
        state, history = restored
        if is_primary():
            print(f"mtjax: {desc} resumes at step {len(history)} of {total} from {checkpoint.folder}", flush=True)
    start = len(history)
    guard.start(state.params)
    pending = None  # metrics of a dispatched step whose row is not logged yet
    interrupted = None
    with tqdm(total=total, initial=start, desc=desc, unit="step", disable=not is_primary()) as bar:
        try:
            seen = 0
            for epoch in range(epochs):
                for batch in batches_per_epoch(epoch):
                    seen += 1
                    if seen <= start:
                        continue
                    working_on(f"{desc} step", batch.get("chosen_input_ids", batch.get("input_ids")).shape,
                               (f"{section}.num_micro_batches", f"{_MODEL_OF[section]}.remat"))
                    state, pending = step_fn(state, shard_global_batch(batch, mesh))
                    row = host_metrics(pending)
                    guard.check(len(history) + 1, total, row, state.params,
                                checkpoint.saved_step if checkpoint is not None else 0)
                    pending = None
                    history.append(row)
                    log({"step": len(history), "epoch": epoch, "train": row})
                    accuracy = row.get("accuracy", row.get("rewards/accuracies"))  # RM, DPO (SFT has none)
                    shown = {"loss": f"{row['loss']:.4f}"} | ({} if accuracy is None else {"acc": f"{accuracy:.2f}"})
                    bar.set_postfix(**shown)
                    bar.update(1)
                    if checkpoint is not None:
                        checkpoint.after_step(state, history, total)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, or a preemption (saved in `after_step` already)
            interrupted = e
    if interrupted is not None:  # the progress bar is closed: the stop message gets a line of its own
        if checkpoint is not None and not (isinstance(interrupted, Interrupted) and interrupted.saved):
            interrupted = checkpoint.save_on_interrupt(
                interrupted, state, history, pending, lambda row: log({"step": len(history), "train": row}), total)
        raise interrupted
    if checkpoint is not None:
        checkpoint.close()
    return state, history


# The model each training section trains.
_MODEL_OF = {"sft": "policy", "dpo": "policy", "rm": "reward_model", "base_rm": "reward_model"}


def _mean_metrics(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    if not history:
        return {}
    keys = history[0].keys()
    return {f"train_{k}": float(np.mean([h[k] for h in history])) for k in keys}


def train_sft(models: Models, params: Any, rows: Sequence[tuple[str, str]], section: ConfigDict, mesh, seed: int,
              log: Callable[[dict], None], checkpoint: TrainCheckpoint | None = None) -> tuple[Any, dict]:
    """Supervised fine-tuning of the policy from `params` on (prompt, response) text rows, rendered in its chat
    template with the response ending in its stop token, as the `sft` section says (`SFTConfig`,
    `OptimizerConfig`, `settings.TrainingRun` fields); returns new params and stats (`checkpoint`: as in
    `train_dpo`)."""
    from mtjax import train

    run = settings.build(settings.TrainingRun, section)
    completions, counts = [], Counter()
    for prompt, response in rows:
        completion = data.encode_completion(data.chat_prompt_ids(models.tokenizer, prompt),
                                            data.response_ids(models.tokenizer, response, models.stop_ids[0]),
                                            run.max_length)
        if completion is None:
            counts["dropped_prompt_too_long"] += 1
            continue
        counts["truncated_to_max_length"] += int(completion.truncated)
        completions.append(completion)
    if not completions:
        raise ValueError(f"sft.max_length={run.max_length}: no demonstration fits (every prompt is as long)")
    total = _num_steps(len(completions), run.batch_size, run.epochs)
    opt_cfg = settings.build(train.OptimizerConfig, section, total_steps=total)
    step = train.make_sft_step(models.policy, settings.build(train.SFTConfig, section), opt_cfg, mesh)
    state = train.init_train_state(params, opt_cfg, mesh)
    batches = lambda epoch: sequence_batches(completions, models.pad_id, run.batch_size, run.max_length,
                                             seed + 7919 * epoch)
    state, history = _run_steps(step, state, batches, run.epochs, total, "SFT", log, mesh, checkpoint, "sft")
    return state.params, {**counts, "trained_sequences": len(completions), "steps": total, **_mean_metrics(history)}


def train_dpo(models: Models, params: Any, pairs: PairSet, section: ConfigDict, mesh, seed: int,
              log: Callable[[dict], None], cache_dir: str | None,
              checkpoint: TrainCheckpoint | None = None, name: str = "dpo") -> tuple[Any, dict]:
    """DPO (or IPO/hinge/SimPO) from `params` with reference = `params`, as the `dpo` section says
    (`DPOConfig`, `OptimizerConfig`, `settings.TrainingRun` fields); returns new params and stats. With
    `checkpoint`, the train state is saved as it goes and a rerun resumes from the last save."""
    from mtjax import train

    run = settings.build(settings.TrainingRun, section)
    chosen, rejected, counts, values = encode_pairs(pairs, run.max_length)
    if not chosen:
        return params, {**counts, "trained_pairs": 0}
    dpo_cfg = settings.build(train.DPOConfig, section)
    missing = [k for k in train.WIN_PROB_KEYS if dpo_cfg.loss_type == "sppo" and k not in values]
    if missing:
        raise ValueError(f"{name}.loss_type='sppo' needs each pair's win probabilities ({', '.join(missing)}); "
                         "these pairs have none")
    total = _num_steps(len(chosen), run.batch_size, run.epochs)
    opt_cfg = settings.build(train.OptimizerConfig, section, total_steps=total)
    per_pair = {k: values[k] for k in train.WIN_PROB_KEYS if dpo_cfg.loss_type == "sppo"}
    if dpo_cfg.reference == "precomputed" and dpo_cfg.uses_reference:
        full = data.collate_pairs(chosen, rejected, models.pad_id, run.max_length)
        cache = train.ReferenceLogprobCache(cache_dir) if cache_dir else None
        working_on("reference log-probs", full["chosen_input_ids"].shape, (f"{name}.num_micro_batches",))
        per_pair |= train.precompute_reference_logprobs(
            models.policy, params, {k: v for k, v in full.items() if k in train.DPO_BATCH_KEYS}, mesh,
            batch_size=max(1, run.batch_size // dpo_cfg.num_micro_batches), average=dpo_cfg.averages_logprobs,
            cache=cache, logits_chunk=dpo_cfg.logits_chunk)
    step = train.make_dpo_step(models.policy, dpo_cfg, opt_cfg, mesh)
    if dpo_cfg.reference == "model" and dpo_cfg.uses_reference:  # the frozen π_{t-1} runs inside each step
        step = functools.partial(_with_reference, step, params)
    state = train.init_train_state(params, opt_cfg, mesh)  # a copy: the step donates it, π_{t-1} lives on
    batches = lambda epoch: pair_batches(chosen, rejected, models.pad_id, run.batch_size, run.max_length,
                                         seed + 7919 * epoch, per_pair)
    state, history = _run_steps(step, state, batches, run.epochs, total, "DPO", log, mesh, checkpoint, name)
    return state.params, {**counts, "trained_pairs": len(chosen), "steps": total, **_mean_metrics(history)}


def _with_reference(step: Callable, reference_params: Any, state: Any, batch: Any):
    return step(state, reference_params, batch)


def train_reward_model(models: Models, init_params: Any, pair_sets: Sequence[PairSet], section: ConfigDict, mesh,
                       seed: int, log: Callable[[dict], None],
                       checkpoint: TrainCheckpoint | None = None, name: str = "rm") -> tuple[Any, dict]:
    """Bradley-Terry training of the RM from `init_params` on the union of `pair_sets`, as the `rm` / `base_rm`
    section says (`RewardConfig`, `OptimizerConfig`, `settings.TrainingRun` fields; `checkpoint`: as in
    `train_dpo`)."""
    from mtjax import train

    run = settings.build(settings.TrainingRun, section)
    chosen, rejected, counts = [], [], Counter()
    for pairs in pair_sets:
        c, r, n, _ = encode_pairs(pairs, run.max_length)
        chosen += c
        rejected += r
        counts.update(n)
    if not chosen:
        return init_params, {**counts, "trained_pairs": 0}
    total = _num_steps(len(chosen), run.batch_size, run.epochs)
    opt_cfg = settings.build(train.OptimizerConfig, section, total_steps=total)
    step = train.make_reward_model_step(models.reward, settings.build(train.RewardConfig, section), opt_cfg, mesh)
    state = train.init_train_state(init_params, opt_cfg, mesh)  # a copy: r0 is reused every iteration
    batches = lambda epoch: pair_batches(chosen, rejected, models.reward_pad_id, run.batch_size, run.max_length,
                                         seed + 7919 * epoch)
    state, history = _run_steps(step, state, batches, run.epochs, total, "RM", log, mesh, checkpoint, name)
    return state.params, {**counts, "trained_pairs": len(chosen), "steps": total, **_mean_metrics(history)}


# ----------------------------------------------------------------------------- the loop


validate_config = settings.validate_config  # the entry point's name for it


class MutualTaught:
    """One run: holds the models, prompts and run directory; `run()` executes the remaining phases.

    Start-up checks everything it can before the run directory is written: every config value (the
    library's dataclasses), the model sources against the settings (context length, stop ids), and the
    prompt set (read, measured in both chat templates, over-long prompts dropped and counted)."""

    def __init__(self, cfg: ConfigDict, workdir: str, allow_config_change: bool = False, read_only: bool = False):
        """`read_only`: open a run directory to read its models (`params_at`), writing nothing into it."""
        from mtjax.sampling import SamplingConfig
        from mtjax.sharding import make_mesh
        from mtjax.tasks import make_task

        settings.validate_config(cfg)
        self.cfg = cfg
        self.sampling = settings.build(SamplingConfig, cfg.sampling)
        self.mt = settings.build(settings.MTConfig, cfg.mt)
        self.eval_cfg = settings.build(_eval_config_class(), cfg.eval)
        self.sft = settings.build(settings.SFTPhase, cfg.sft)
        self.task = make_task(cfg)
        self.specs = describe_models(cfg)
        self._check_contexts(self.specs)
        self._check_reward_model_from_policy(self.specs)
        if read_only:
            self.rd = RunDir.open_read_only(workdir)
        else:
            if is_primary():
                for spec in self.specs.values():
                    print(f"mtjax: {spec.setting} {spec.source.source}: stop ids {spec.stop_origins}", flush=True)
            # a new run's prompts are read and measured before its directory is written
            built = None if RunDir.has_completed(workdir, layout.PROMPTS) else self._build_prompt_splits(self.specs)
            self.rd = RunDir(workdir, cfg.to_dict(), allow_config_change)
            self._reconcile_run_directory()
            self.tracker = tracking.MetricsWriter(self.rd, settings.build(tracking.TrackingConfig, cfg.logging),
                                                  run_config=cfg.to_dict())
        self.mesh = make_mesh(**dataclasses.asdict(settings.build(settings.MeshConfig, cfg.mesh)))
        self.models = load_models(self.specs, cfg.seed, self.mesh)
        self.splits = {} if read_only else self._prompt_splits(built)
        self._prompt_ids: dict[str, list[list[int]]] = {}
        if self.sft.enabled and self.rd.done(layout.SFT):
            self._start_from(self.rd.load_params(layout.SFT_POLICY, like=self.models.policy_params))

    def _reconcile_run_directory(self) -> None:
        """Makes the run directory agree with this run: an unfinished phase drops what it made with settings
        that have changed since, and a phase whose recorded artifact is missing or damaged is redone."""
        say = _say if is_primary() else _quiet
        changes = self.rd.accepted_changes
        if changes:
            say(f"{self.rd.path}: config changes accepted (no finished phase used them): "
                f"{'; '.join(map(str, changes))}")
        for phase in self.rd.in_flight():
            touched = {c.section for c in changes if not c.within(independent_of(phase))}
            if touched - {training_section(phase)}:  # a change of its training settings alone keeps its samples
                say(f"{phase} started with the former {', '.join(sorted(touched))} settings; starting it again")
                self.rd.discard_in_flight(phase)
                self.train_checkpoint(phase).clear()
        gated = self.cfg.mt.gate_win_rate is not None
        for message in self.rd.repair(lambda later, earlier: depends_on(later, earlier, gated)):
            say(message)

    @property
    def scorer(self):
        from mtjax.scoring import RewardScorer

        if not hasattr(self, "_scorer"):
            self._scorer = RewardScorer(self.models, self.sampling, self.mesh)
        return self._scorer

    @property
    def iterations(self) -> range:
        return self.mt.iterations(self.cfg.iterations)

    def policy_split(self, t: int) -> str:
        """The prompt split of iteration t's E-step (see settings.POLICY_PROMPTS and SCHEDULES); derived splits
        are concatenations of recorded ones, built on first use."""
        import datasets

        mt, T = self.mt, self.cfg.iterations
        if mt.schedule == "offline":
            name, parts = "all_training", [self.splits[f"policy_{s}"] for s in range(1, T + 1)]
            parts.append(self.splits["reward_model"])
        elif mt.policy_prompts == "with_rm":
            rm = self.splits["reward_model"]
            lo, hi = (t - 1) * len(rm) // T, t * len(rm) // T
            name, parts = f"policy_{t}_with_rm", [self.splits[f"policy_{t}"], rm.select(range(lo, hi))]
        elif mt.policy_prompts == "all_portions" and t == T + 1:
            return "reward_model"
        else:
            return f"policy_{t}"
        if name not in self.splits:
            self.splits[name] = datasets.concatenate_datasets(parts)
        return name

    # -- inputs ------------------------------------------------------------------------------

    def _check_contexts(self, specs: Mapping[str, Any]) -> None:
        """The prompt cap plus the response budget must fit each model's context (else no prompt could)."""
        from mtjax.prompt_sets import PromptConfig

        prompts = settings.build(PromptConfig, self.cfg.prompts)
        budget = max(self.sampling.max_new_tokens, self.eval_cfg.answer_max_new_tokens or 0)
        need = prompts.max_prompt_tokens + budget
        problems = [f"prompts.max_prompt_tokens={prompts.max_prompt_tokens} + the response budget {budget} "
                    f"(sampling.max_new_tokens, eval.answer_max_new_tokens) = {need} exceeds the {name}'s context "
                    f"({spec.config.max_position_embeddings} tokens, {spec.source.source})"
                    for name, spec in specs.items() if need > spec.config.max_position_embeddings]
        if self.mt.judges:  # the judge reads the rubric around a prompt and a response, then writes its verdict
            from mtjax.judge import judge_prompt

            policy = specs["policy"]
            rubric = len(data.chat_prompt_ids(policy.tokenizer, judge_prompt("", "")))
            judged = rubric + prompts.max_prompt_tokens + self.sampling.max_new_tokens + self.mt.judge_max_new_tokens
            if judged > policy.config.max_position_embeddings:
                problems.append(f"the judge's rubric ({rubric} tokens) + prompts.max_prompt_tokens + "
                                f"sampling.max_new_tokens + mt.judge_max_new_tokens = {judged} exceeds the policy's "
                                f"context ({policy.config.max_position_embeddings} tokens, {policy.source.source})")
        if problems:
            raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))

    def _check_reward_model_from_policy(self, specs: Mapping[str, Any]) -> None:
        """With `sft.reward_model_from_policy` the RM starts from π0's backbone: their shapes must agree."""
        if not (self.sft.enabled and self.sft.reward_model_from_policy and self.cfg.base_rm.enabled):
            return
        shape = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "scan_layers")
        policy, reward = specs["policy"].config, specs["reward_model"].config
        differ = [f"{k} {getattr(policy, k)} vs {getattr(reward, k)}" for k in shape
                  if getattr(policy, k) != getattr(reward, k)]
        if differ:
            raise ValueError(f"invalid config:\n  - sft.reward_model_from_policy needs the reward model's backbone to "
                             f"have the policy's shape (policy vs reward_model: {'; '.join(differ)}); set it False "
                             "or use the same source")

    def _prompt_limits(self, specs: Mapping[str, Any]):
        from mtjax.prompt_sets import PromptConfig, PromptLimits

        prompts = settings.build(PromptConfig, self.cfg.prompts)
        budget = max(self.sampling.max_new_tokens, self.eval_cfg.answer_max_new_tokens or 0)
        return PromptLimits(prompts.max_prompt_tokens, budget,
                            specs["policy"].config.max_position_embeddings,
                            specs["reward_model"].config.max_position_embeddings)

    def _build_prompt_splits(self, specs: Mapping[str, Any]) -> tuple[Any, Any, Counter, dict]:
        """The prompt splits of a new run, in memory (written by the `prompts` phase): the task's, with
        D_1..D_T and D_R from `prompts.source` when it is not the testbed; every prompt measured in the
        policy's and the RM's chat templates, and those that do not fit dropped and counted by reason."""
        import datasets

        from mtjax.iteration_eval import load_benchmarks
        from mtjax.prompt_sets import PromptConfig, external_splits, fitting_prompts, row_prompt
        from mtjax.scoring import same_tokenization
        from mtjax.testbed.prompts import PROMPT_FEATURES

        p = settings.build(PromptConfig, self.cfg.prompts)
        policy_tok, reward_tok = specs["policy"].tokenizer, specs["reward_model"].tokenizer
        same = same_tokenization(policy_tok, reward_tok)

        def measure(prompt) -> tuple[int, int]:
            n = len(data.chat_prompt_ids(policy_tok, prompt))
            return n, n if same else len(data.chat_prompt_ids(reward_tok, prompt))

        limits = self._prompt_limits(specs)
        splits, gen_cfg = self.task.prompt_splits(p)
        counts: Counter = Counter()
        if p.source != "testbed":  # train on the source's prompts; evaluate on the testbed's
            external, counts = external_splits(p, limits, measure)
            splits.update({name: datasets.Dataset.from_list(rows, features=PROMPT_FEATURES)
                           for name, rows in external.items()})
        benchmarks = load_benchmarks(self.eval_cfg)
        splits.update({name: datasets.Dataset.from_list(rows, features=PROMPT_FEATURES)
                       for name, rows in benchmarks.splits.items()})
        counts.update(benchmarks.counts)
        for name in list(splits):
            if p.source != "testbed" and name in p.sizes:
                continue  # already measured
            kept, dropped = fitting_prompts([row_prompt(r) for r in splits[name]], limits, measure)
            if dropped:
                splits[name] = splits[name].select(kept)
                counts.update({f"{name}_{k}": v for k, v in dropped.items()})
        return splits, gen_cfg, counts, benchmarks.records

    def _prompt_splits(self, built):
        from mtjax.testbed.prompts import load_prompt_splits, save_prompt_splits

        if not self.rd.done(layout.PROMPTS):
            splits, gen_cfg, counts, records = built or self._build_prompt_splits(self.specs)  # a redo
            with self.phase(layout.PROMPTS) as summary:
                for name, rows in records.items():  # what the benchmarks judge against (references, pairs)
                    self.rd.write_jsonl(layout.benchmark_records(name), rows)
                if is_primary():  # the others built the same splits; they read process 0's files
                    save_prompt_splits(splits, self.rd.file(layout.PROMPTS_FOLDER), gen_cfg)
                barrier("mtjax-prompts")
                self.rd.record_artifact(layout.PROMPTS_FOLDER)
                summary.update({layout.prompts_count(k): len(v) for k, v in splits.items()})
                summary.update(counts)
        return load_prompt_splits(self.rd.file(layout.PROMPTS_FOLDER))

    def prompt_ids(self, split: str) -> list[list[int]]:
        from mtjax.prompt_sets import row_prompt

        if split not in self._prompt_ids:
            self._prompt_ids[split] = [data.chat_prompt_ids(self.models.tokenizer, row_prompt(row))
                                       for row in self.splits[split]]
        return self._prompt_ids[split]

    def prompts(self, split: str) -> list:
        """The split's prompts (strings, or chat turns), in order."""
        from mtjax.prompt_sets import row_prompt

        return [row_prompt(row) for row in self.splits[split]]

    def _seed(self, name: str) -> int:
        """The seed of the draw named `name` (`layout.seed_name`: a frozen name, not a path), so a resumed run
        samples exactly what an uninterrupted one would."""
        return layout.derive_seed(self.cfg.seed, name)

    def seed(self, phase: str, purpose: str | None = None) -> int:
        """The seed of `phase`'s draw for `purpose` (`layout.seed_name`; none: its training shuffle)."""
        return self._seed(layout.seed_name(phase, purpose))

    @contextlib.contextmanager
    def phase(self, name: str):
        """Yields a summary dict to fill; on success the phase is recorded done with it and its wall time, and
        the artifacts it wrote with their checksums. An exception (or Ctrl-C) leaves the phase unfinished, so
        a rerun redoes only this phase (a training phase from its last train-state save, see
        `mtjax.train_checkpoint`; a sampling pass after its last finished piece)."""
        stop_if_preempted()
        start = time.perf_counter()
        self.rd.start_phase(name, independent_of(name))
        summary: dict[str, Any] = {}
        try:
            yield summary
        except BaseException as e:
            self.rd.abandon_phase()
            if isinstance(e, Exception) and is_out_of_memory(e):  # one message that says what to lower
                raise explain(name, e) from e
            raise
        for message in self.rd.mark_done(name, {**summary, "wall_seconds": time.perf_counter() - start}):
            if is_primary():
                _say(message)
        self.train_checkpoint(name).clear()  # the phase's outputs supersede its mid-phase state

    def train_checkpoint(self, phase: str, ser_round: int | None = None) -> TrainCheckpoint:
        """The phase's (or its SER round's) train-state saves (`layout.train_state_folder`); its divergence
        guard names the learning rate to lower."""
        c, section = self.cfg.checkpoint, training_section(phase)
        settings = self.cfg[section].to_dict() if section else None
        guard = DivergenceGuard(phase, f"{section}.learning_rate", settings["learning_rate"]) if section else None
        return TrainCheckpoint(self.rd, layout.train_state_folder(phase, ser_round), every_steps=c.train_every_steps,
                               every_seconds=c.train_every_seconds, guard=guard, settings=settings)

    def log(self, phase: str) -> Callable[[dict], None]:
        """The logger of `phase`'s rows: metrics.jsonl and the tracking sinks (`mtjax.tracking`)."""
        return lambda row: self.tracker.log(_metrics_row(phase, row))

    # -- stored samples ----------------------------------------------------------------------

    def samples(self, phase: str, sample_pass: layout.SamplePass | str, params: Any, split: str, num_samples: int,
                rm_params: Any = None, sampling: Any = None) -> tuple[list[list[Sample]], list]:
        """Samples (and, with `rm_params`, their RM scores) of `split`, read back if already stored.
        `sample_pass`: a `layout.SamplePass`, or its file name (`layout.sample_pass`).

        The pass runs in pieces of `checkpoint.sample_every_prompts` prompts; the rows of finished pieces
        are kept in its partial file, so an interrupted pass resumes with the next piece. Each prompt
        keeps its index in the split, hence its random draws (seeded by the pass's frozen seed name)."""
        if isinstance(sample_pass, str):
            sample_pass = layout.sample_pass(sample_pass)
        path, partial = layout.samples_file(phase, sample_pass), layout.partial_samples_file(phase, sample_pass)
        name = sample_pass.file
        if self.rd.file(path).exists():  # written by an earlier attempt at this phase
            self.rd.record_artifact(path, keep_recorded=True)
        else:
            prompts, ids, texts = self.prompt_ids(split), self.splits[split]["prompt_id"], self.prompts(split)
            rows = self._whole_prompts(partial, ids, num_samples) if self.rd.file(partial).exists() else []
            piece = self.cfg.checkpoint.sample_every_prompts
            first = len(rows) // num_samples
            if first and is_primary():
                print(f"mtjax: {path}: resuming after {first} of {len(prompts)} prompts", flush=True)
            seconds, num_partial_rows = 0.0, len(rows)
            for lo in range(first, len(prompts), piece):
                stop_if_preempted()
                start = time.perf_counter()
                hi = min(lo + piece, len(prompts))
                samples = sample_responses(self.models, params, prompts[lo:hi], num_samples,
                                           sampling or self.sampling,
                                           self.seed(phase, sample_pass.seed_purpose), self.mesh,
                                           first_prompt_index=lo)
                rewards = [[None] * len(s) for s in samples]
                if rm_params is not None:
                    flat_p = [p for p, s in zip(prompts[lo:hi], samples, strict=True) for _ in s]
                    flat_t = [t for t, s in zip(texts[lo:hi], samples, strict=True) for _ in s]
                    flat_r = [x.ids for s in samples for x in s]
                    scores = self.scorer.score_ids(rm_params, flat_t, flat_p, flat_r)
                    if nonfinite_count(scores):
                        raise DivergenceError(
                            f"{phase}: the reward model gave {nonfinite_count(scores)} of {len(scores)} responses a "
                            "reward that is not finite (its weights are broken); nothing of this piece was saved")
                    it = iter(scores.tolist())
                    rewards = [[next(it) for _ in s] for s in samples]
                rows += [{"prompt_id": pid, "sample": k, "response_ids": list(x.ids), "stopped": x.stopped,
                          "reward": r, "text": response_text(self.models, x)}
                         for pid, s, rs in zip(ids[lo:hi], samples, rewards, strict=True)
                         for k, (x, r) in enumerate(zip(s, rs, strict=True))]
                if hi < len(prompts):
                    self.rd.write_jsonl(partial, rows, artifact=False)
                seconds += time.perf_counter() - start
            self.rd.write_jsonl(path, rows)
            if is_primary():
                self.rd.file(partial).unlink(missing_ok=True)
            self.log(phase)({"sampling": {name: tracking.sampling_metrics(rows, len(rows) - num_partial_rows,
                                                                          seconds, first)}})
        groups = self.sample_rows(path, split)
        samples = [[Sample(tuple(r["response_ids"]), r["stopped"]) for r in group] for group in groups]
        rewards = [[r["reward"] for r in group] for group in groups]
        return samples, rewards

    def _whole_prompts(self, partial: str, prompt_ids: Sequence[str], num_samples: int) -> list[dict]:
        """The rows of a partial samples file that form whole prompts, in the split's order (rows written by an
        interrupted pass; anything after a damaged, missing or foreign row is sampled again)."""
        rows, problem = read_jsonl_prefix(self.rd.file(partial))
        good = 0
        for j, row in enumerate(rows):
            i, k = divmod(j, num_samples)
            if i >= len(prompt_ids) or row.get("prompt_id") != prompt_ids[i] or row.get("sample") != k:
                problem = f"{self.rd.file(partial)}: row {j + 1} is not sample {k} of prompt {i}"
                break
            good = j + 1
        keep = good - good % num_samples
        if problem is None and keep < len(rows):
            problem = f"{self.rd.file(partial)}: its last prompt has {len(rows) - keep} of {num_samples} samples"
        if problem is not None and is_primary():
            print(f"mtjax: {problem}; keeping the first {keep // num_samples} whole prompts", flush=True)
        return rows[:keep]

    def sample_rows(self, path: str, split: str) -> list[list[dict]]:
        """The stored rows of a samples file, grouped per prompt in the split's order."""
        return _group_rows(self.rd.read_jsonl(path), self.splits[split]["prompt_id"])

    def score_groups(self, rm_params: Any, split: str, groups: Sequence[Sequence[dict]]) -> list[list[float]]:
        """RM scores of stored sample rows grouped per prompt of `split` (`sample_rows`), on their token ids."""
        flat = [(text, ids, row["response_ids"]) for text, ids, group in
                zip(self.prompts(split), self.prompt_ids(split), groups, strict=True) for row in group]
        scores = iter(self.scorer.score_ids(rm_params, *zip(*flat, strict=True), progress=False).tolist())
        return [[next(scores) for _ in group] for group in groups]

    def ids_by_text(self, split: str, groups: Sequence[Sequence[dict]]) -> dict[tuple[str, str], tuple[list, list]]:
        """(prompt text, response text) -> (prompt ids, sampled response ids), for the text-based evaluators."""
        return {(text, r["text"]): (p_ids, r["response_ids"])
                for text, p_ids, group in zip(self.splits[split]["prompt"], self.prompt_ids(split), groups,
                                              strict=True)
                for r in group}

    # -- phases ------------------------------------------------------------------------------

    def base_policy(self) -> Any:
        """π0: the policy source's weights, or with `sft.enabled` those trained on the task's demonstrations of
        the `sft` split (the `sft` phase; its seed is `sft.seed`, so every arm and seed of a study shares it).
        The reward model then starts from π0's backbone (`sft.reward_model_from_policy`)."""
        from mtjax.synthetic import DemonstratorConfig

        phase = layout.SFT
        if not self.sft.enabled:
            return self.models.policy_params
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                rows = self.task.demonstrations(self.prompts(phase), self.sft.demonstrations_per_prompt,
                                                self.sft.seed, settings.build(DemonstratorConfig, self.cfg.sft))
                self.rd.write_jsonl(layout.demonstrations_file(), [{"prompt": p, "response": r} for p, r in rows])
                params, stats = train_sft(self.models, self._initial_policy(self.sft.seed), rows, self.cfg.sft,
                                          self.mesh, self.sft.seed, self.log(phase), self.train_checkpoint(phase))
                self.rd.save_params(layout.SFT_POLICY, params)
                summary.update({"demonstrations": len(rows), **stats})
        self._start_from(self.rd.load_params(layout.SFT_POLICY, like=self.models.policy_params))
        return self.models.policy_params

    def _initial_policy(self, seed: int) -> Any:
        """The policy source's weights; those of a random source (`tiny`, `synthetic`) drawn from `seed`."""
        from mtjax.sharding import shard_params
        from mtjax.sources import RANDOM_SOURCES, load

        spec = self.specs["policy"]
        if spec.source.source not in RANDOM_SOURCES:
            return self.models.policy_params
        _, params = load(spec, "causal_lm", seed, self.mesh)
        return params if self.mesh is None else shard_params(params, self.mesh)

    def _start_from(self, policy_params: Any) -> None:
        """Makes `policy_params` π0 and, with `sft.reward_model_from_policy`, the RM's starting point its backbone
        with a fresh score head from `reward_model.head_seed`."""
        import jax.numpy as jnp

        from mtjax.models.hf import init_score_head
        from mtjax.sharding import shard_params
        from mtjax.sources import ModelSource

        reward = self.models.reward_init_params
        if self.sft.reward_model_from_policy:
            head = init_score_head(self.models.reward.cfg, settings.build(ModelSource, self.cfg.reward_model).head_seed)
            reward = {**reward, "model": policy_params["model"], "score": {"kernel": jnp.asarray(head)}}
            reward = reward if self.mesh is None else shard_params(reward, self.mesh)
        self.models = dataclasses.replace(self.models, policy_params=policy_params, reward_init_params=reward)

    def base_reward_model(self) -> Any:
        """r0: the RM trained from its initial weights on gold-labelled pairs of π0's samples: every untied
        pair of a label prompt's samples, or `base_rm.pairs_per_prompt` random ones (the "human" budget)."""
        from mtjax.gold_pairs import pairs_per_prompt, untied_pairs

        phase = layout.BASE_RM
        if not self.cfg.base_rm.enabled:  # the RM source is already a trained reward model
            return self.models.reward_init_params
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                split = "base_rm_labels"
                self.samples(phase, layout.SAMPLES, self.models.policy_params, split, self.sampling.num_samples)
                rows = self.sample_rows(layout.samples_file(phase, layout.SAMPLES), split)
                texts = [[r["text"] for r in group] for group in rows]
                rewards = self.task.gold_rewards(list(self.splits[split]), texts)
                budget = settings.build(settings.BaseRMPhase, self.cfg.base_rm).pairs_per_prompt
                untied, tied = untied_pairs(rewards, texts)
                labelled = pairs_per_prompt(rewards, texts, budget, self.seed(phase, layout.BASE_RM_LABELS_SEED))
                by_text, prompt_texts = self.ids_by_text(split, rows), self.splits[split]["prompt"]
                pairs = PairSet([], [], [], Counter())
                for p, hi, lo in labelled:
                    p_ids, chosen = by_text[(prompt_texts[p], texts[p][hi])]
                    _, rejected = by_text[(prompt_texts[p], texts[p][lo])]
                    pairs.prompts.append(p_ids)
                    pairs.chosen.append(list(chosen))
                    pairs.rejected.append(list(rejected))
                pairs.counts.update({layout.PAIRS_BUILT: len(pairs)}, tied_pairs_skipped=tied,
                                    prompts_without_pair=len(rows) - len({p for p, _, _ in untied}))
                if budget:
                    pairs.counts["untied_pairs_not_labelled"] = len(untied) - len(pairs)
                self.rd.write_jsonl(layout.pairs_file(phase), pairs.rows(layout.GOLD_PAIRS))
                params, stats = train_reward_model(self.models, self.models.reward_init_params, [pairs],
                                                   self.cfg.base_rm, self.mesh, self.seed(phase),
                                                   self.log(phase), self.train_checkpoint(phase), name="base_rm")
                self.rd.save_params(layout.BASE_RM_MODEL, params)
                summary.update({**pairs.counts, **stats})
        return self.rd.load_params(layout.BASE_RM_MODEL, like=self.models.reward_init_params)

    def e_step(self, t: int, policy_params: Any, rm_params: Any) -> Any:
        """π_t: K samples of π_{t-1} on the iteration's prompts scored by r_{t-1} (or judged, `judged_rewards`),
        one pair per prompt by `mt.policy_pairs`, then DPO (or the `dpo` section's objective) from π_{t-1}."""
        phase = layout.e_step(t)
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                split = self.policy_split(t)
                samples, rewards = self.samples(phase, layout.SAMPLES, policy_params, split, self.sampling.num_samples,
                                                rm_params=None if self.mt.judges else rm_params)
                if self.mt.judges:
                    judge = policy_params if self.mt.policy_rewards == "judge_policy" else self.models.policy_params
                    rewards, judged = self.judged_rewards(phase, split, judge)
                    summary.update(judged)
                pairs = policy_pairs(self.prompt_ids(split), samples, rewards, self.mt.drop_truncated,
                                     self.mt.policy_pairs, win_probs=self.cfg.dpo.loss_type == "sppo")
                self.rd.write_jsonl(layout.pairs_file(phase), pairs.rows(layout.POLICY_PAIRS))
                new_params, stats = train_dpo(self.models, policy_params, pairs, self.cfg.dpo, self.mesh,
                                              self.seed(phase), self.log(phase),
                                              str(self.rd.file(layout.REFERENCE_CACHE)), self.train_checkpoint(phase))
                self.rd.save_params(layout.policy_checkpoint(t), new_params)
                summary.update({**pairs.counts, **stats, **_length_summary(pairs)})
        return self.rd.load_params(layout.policy_checkpoint(t), like=self.models.policy_params)

    def judged_rewards(self, phase: str, split: str, judge_params: Any) -> tuple[list[list[float]], dict]:
        """LLM-as-a-judge rewards of the phase's stored samples (`mtjax.judge`): each response judged
        `mt.judge_samples` times by the policy with weights `judge_params`, sampled as the `sampling` section
        says but `mt.judge_max_new_tokens` long; the mean parsed score, NaN when none parsed. The judgments are
        kept in `PHASE/judgments.jsonl` (read back on a rerun). Returns the rewards per prompt and the counts."""
        from mtjax.judge import judge_rewards, parse_score

        path = layout.judgments_file(phase)
        groups = self.sample_rows(layout.samples_file(phase, layout.SAMPLES), split)
        if self.rd.file(path).exists():  # written by an earlier attempt at this phase
            self.rd.record_artifact(path, keep_recorded=True)
            rows = self.rd.read_jsonl(path)
        else:
            n = self.mt.judge_samples
            flat = [(prompt_text(prompt), row) for prompt, group in zip(self.prompts(split), groups, strict=True)
                    for row in group]
            sampling = dataclasses.replace(self.sampling, max_new_tokens=self.mt.judge_max_new_tokens)
            judgments: list[str] = []

            def judge(queries: list[str]) -> list[str]:
                ids = [data.chat_prompt_ids(self.models.tokenizer, q) for q in queries]
                out = sample_responses(self.models, judge_params, ids, 1, sampling,
                                       self.seed(phase, layout.JUDGE_SEED), self.mesh)
                judgments.extend(response_text(self.models, s[0]) for s in out)
                return judgments

            judged = judge_rewards(judge, [p for p, _ in flat], [r["text"] for _, r in flat], n)
            rows = [{"prompt_id": row["prompt_id"], "sample": row["sample"], "reward": reward,
                     "judgments": judgments[i * n:(i + 1) * n]}
                    for i, ((_, row), reward) in enumerate(zip(flat, judged.rewards, strict=True))]
            self.rd.write_jsonl(path, rows)
        rewards = iter(r["reward"] for r in rows)
        per_prompt = [[next(rewards) for _ in group] for group in groups]
        unparsed = sum(parse_score(j) is None for r in rows for j in r["judgments"])
        return per_prompt, {"judgments": sum(len(r["judgments"]) for r in rows), "judgments_unparsed": unparsed,
                            "responses_unjudged": sum(not math.isfinite(r["reward"]) for r in rows)}

    def m_step(self, t: int, old_policy: Any, new_policy: Any, rm_params: Any, base_rm: Any) -> Any:
        phase = layout.m_step(t)
        cfg = self.mt
        if not cfg.trains_rm:
            return rm_params
        if cfg.rm_update == "ser":
            return self.ser_m_step(t, new_policy, rm_params)
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                split = "reward_model"
                new_samples, new_rewards = self.samples(phase, layout.NEW_POLICY_SAMPLES, new_policy, split,
                                                        self.sampling.num_samples, rm_params=rm_params)
                # The contrastive pair uses one response of π_{t-1} per prompt (its reward feeds the filter).
                old_samples, old_rewards = self.samples(phase, layout.OLD_POLICY_SAMPLES, old_policy, split, 1,
                                                        rm_params=rm_params)
                prompts = self.prompt_ids(split)
                pair_sets: dict[str, PairSet] = {}
                if cfg.rm_update != "contrastive_only":
                    pair_sets[layout.SELF_PAIRS] = length_controlled_pairs(prompts, new_samples, new_rewards,
                                                                           cfg.drop_truncated)
                if cfg.rm_update != "self_only":
                    pair_sets[layout.CONTRASTIVE_PAIRS] = contrastive_pairs(
                        prompts, new_samples, new_rewards, old_samples, old_rewards, cfg.contrastive_filter,
                        cfg.drop_truncated)
                if cfg.rm_update == "oracle":  # the positive control: the same pairs, labelled by gold
                    pair_sets = {kind: self.gold_oriented(split, pairs) for kind, pairs in pair_sets.items()}
                elif cfg.rm_update == "random":  # the negative control: the same pairs, labelled by a coin
                    coin = np.random.default_rng(self.seed(phase, layout.RANDOM_LABELS_SEED))
                    pair_sets = {kind: oriented_pairs(pairs, coin.random(len(pairs)) < 0.5, "random")
                                 for kind, pairs in pair_sets.items()}
                for kind, pairs in pair_sets.items():
                    self.rd.write_jsonl(layout.pairs_file(phase, kind), pairs.rows(kind))
                params, stats = train_reward_model(self.models, base_rm, list(pair_sets.values()), self.cfg.rm,
                                                   self.mesh, self.seed(phase), self.log(phase),
                                                   self.train_checkpoint(phase))
                self.rd.save_params(layout.reward_model_checkpoint(t), params)
                counts = {layout.kind_count(kind, k): v for kind, pairs in pair_sets.items()
                          for k, v in pairs.counts.items()}
                summary.update({**counts, **stats})
        return self.rd.load_params(layout.reward_model_checkpoint(t), like=base_rm)

    def ser_m_step(self, t: int, new_policy: Any, rm_params: Any) -> Any:
        """r_t by Self-Evolved Reward learning: every pair of distinct samples of π_t on D_R, labelled by the RM
        itself (`data.self_labelled_pairs`: its Bradley-Terry confidence, kept at ≥ `mt.ser_threshold`), the RM
        trained on the kept ones from the labelling RM, `mt.ser_rounds` times (round 1 labels with r_{t-1}).
        Each round's RM is saved (`PHASE/round_R/reward_model`), so a rerun continues after the last one."""
        phase, cfg, split = layout.m_step(t), self.mt, "reward_model"
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                samples, rewards = self.samples(phase, layout.NEW_POLICY_SAMPLES, new_policy, split,
                                                self.sampling.num_samples, rm_params=rm_params)
                groups = self.sample_rows(layout.samples_file(phase, layout.NEW_POLICY_SAMPLES), split)
                candidates = []  # (prompt index, sample i, sample j)
                counts: Counter = Counter()
                for p, (per_prompt, per_rewards) in enumerate(zip(samples, rewards, strict=True)):
                    keep = pairable(per_prompt, per_rewards, cfg.drop_truncated, counts)
                    candidates += [(p, i, j) for a, i in enumerate(keep) for j in keep[a + 1:]]
                summary.update({**counts, layout.SER_CANDIDATE_PAIRS: len(candidates)})
                params, prompts = rm_params, self.prompt_ids(split)
                for r in range(1, cfg.ser_rounds + 1):
                    saved, kind = layout.ser_round_reward_model(phase, r), layout.ser_round_kind(r)
                    if r > 1:
                        rewards = self.score_groups(params, split, groups)
                    labels = data.self_labelled_pairs([rewards[p][i] for p, i, _ in candidates],
                                                      [rewards[p][j] for p, _, j in candidates], cfg.ser_threshold)
                    pairs = PairSet([], [], [], Counter())
                    for (p, i, j), keep, swap in zip(candidates, labels.keep, labels.swap, strict=True):
                        if keep:
                            first, second = samples[p][i].ids, samples[p][j].ids
                            pairs.append(prompts[p], *((second, first) if swap else (first, second)))
                    self.rd.write_jsonl(layout.ser_round_pairs_file(phase, r), pairs.rows(kind))
                    kept = labels.confidence[labels.keep]
                    summary.update({layout.kind_count(kind, layout.PAIRS_BUILT): len(pairs),
                                    layout.kind_count(kind, "confidence_mean"):
                                        float(kept.mean()) if kept.size else math.nan})
                    if self.rd.file(saved).exists():  # an earlier attempt at this phase finished the round
                        self.rd.record_artifact(saved, keep_recorded=True)
                    else:
                        checkpoint = self.train_checkpoint(phase, ser_round=r)
                        trained, stats = train_reward_model(self.models, params, [pairs], self.cfg.rm, self.mesh,
                                                            self.seed(phase, layout.ser_round_seed(r)),
                                                            self.log(phase), checkpoint)
                        self.rd.save_params(saved, trained)
                        checkpoint.clear()
                        summary.update({layout.kind_count(kind, k): v for k, v in stats.items()})
                    params = self.rd.load_params(saved, like=rm_params)
                self.rd.save_params(layout.reward_model_checkpoint(t), params)
                last = layout.kind_count(layout.ser_round_kind(cfg.ser_rounds), layout.PAIRS_TRAINED)
                summary[layout.PAIRS_TRAINED] = summary.get(last, 0)
        return self.rd.load_params(layout.reward_model_checkpoint(t), like=rm_params)

    def gold_oriented(self, split: str, pairs: PairSet) -> PairSet:
        """`pairs` (of `split`'s prompts) each oriented by the task's gold reward; gold ties dropped, counted."""
        rows = {tuple(ids): row for ids, row in zip(self.prompt_ids(split), self.splits[split], strict=True)}
        texts = [[response_text(self.models, c), response_text(self.models, r)]
                 for c, r in zip(pairs.chosen, pairs.rejected, strict=True)]
        gold = self.task.gold_rewards([rows[tuple(p)] for p in pairs.prompts], texts)
        keep = [None if math.isnan(a) or math.isnan(b) or a == b else a > b for a, b in gold]
        return oriented_pairs(pairs, keep, layout.GOLD_PAIRS)

    def evaluate(self, t: int, policy_params: Any, rm_params: Any) -> dict:
        """π_t and r_t on `eval.benchmarks` (see `mtjax.iteration_eval`): the task's held-out split ('testbed',
        `mtjax.tasks`) and/or the paper's benchmarks.

        Writes `layout.eval_results` (flat) and `layout.eval_metrics` (the report's nested names)."""
        from mtjax.iteration_eval import evaluate_benchmarks

        phase = layout.eval_phase(t)
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                metrics: dict[str, Any] = {}
                result: dict[str, Any] = {"iteration": t}
                if "testbed" in self.eval_cfg.benchmarks:
                    metrics, flat = self.task.evaluate_heldout(self, phase, policy_params, rm_params)
                    result.update(flat)
                benchmarks = evaluate_benchmarks(self, t, phase, policy_params, rm_params, self.judge_params)
                metrics.update(benchmarks)
                result.update({f"{name}_{k}": v for name, values in benchmarks.items() for k, v in values.items()})
                metrics[layout.PAIR_METRICS] = self._pair_counts(t)
                self.rd.write_json(layout.eval_metrics(t), {"iteration": t, "metrics": metrics})
                self.log(phase)(metrics)  # the same names in metrics.jsonl and the tracking sinks
                self.rd.write_json(layout.eval_results(t), result)
                summary.update(result)
        return self.rd.summary(phase)

    @property
    def judge_params(self) -> Any:
        """The fixed judge of the proxy win rates: r0 (the base RM, or the RM source when it is already
        trained), the same for every iteration and arm."""
        if not hasattr(self, "_judge"):
            self._judge = self.params_at(0)[1]
        return self._judge

    def _pair_counts(self, t: int) -> dict[str, int]:
        """How many pairs each training phase of iteration t used (and dropped), from its summary."""
        built, trained, L = layout.PAIRS_BUILT, layout.PAIRS_TRAINED, layout
        counts = {}
        if t == 0 and self.rd.done(L.BASE_RM):
            summary = self.rd.summary(L.BASE_RM)
            counts.update({L.PAIR_BASE_RM_GOLD: summary.get(built, 0), L.PAIR_BASE_RM_TRAINED: summary.get(trained, 0)})
        if t >= 1 and self.rd.done(L.e_step(t)):
            summary = self.rd.summary(L.e_step(t))
            counts.update({L.PAIR_POLICY: summary.get(built, 0), L.PAIR_POLICY_TRAINED: summary.get(trained, 0),
                           L.PAIR_POLICY_SKIPPED: sum(v for k, v in summary.items() if k.startswith(L.SKIPPED_PREFIX))})
        if t >= 1 and self.rd.done(L.m_step(t)):
            summary = self.rd.summary(L.m_step(t))
            counts.update({L.PAIR_RM_CONTRASTIVE: summary.get(L.kind_count(L.CONTRASTIVE_PAIRS, built), 0),
                           L.PAIR_RM_SELF_TRAINING: summary.get(L.kind_count(L.SELF_PAIRS, built), 0),
                           L.PAIR_RM_TRAINED: summary.get(trained, 0)})
            if self.mt.rm_update == "ser":
                last = L.ser_round_kind(self.mt.ser_rounds)
                counts[L.PAIR_RM_SELF_LABELLED] = summary.get(L.kind_count(last, built), 0)
        return counts

    def text_score_fn(self, rm_params: Any, known: Mapping[tuple[str, str], tuple[list[int], list[int]]]
                      ) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
        """A texts-in scorer for the evaluators; (prompt, response) pairs found in `known` are scored on
        their sampled token ids, others are tokenised (see `mtjax.scoring.RewardScorer.score_texts`)."""
        return self.scorer.text_score_fn(rm_params, known)

    # -- driver ------------------------------------------------------------------------------

    def run(self) -> list[dict]:
        start = time.perf_counter()
        self.tracker.open()
        policy = self.base_policy()
        base_rm = self.base_reward_model()
        rm = base_rm
        results = [self.evaluate(0, policy, rm)]
        kept = 0  # the iteration whose policy the loop continues from
        for t in self.iterations:
            new_policy = self.e_step(t, policy, rm)
            rm = self.m_step(t, policy, new_policy, rm, base_rm)
            results.append(self.evaluate(t, new_policy, rm))
            if self.mt.gate_win_rate is None or self.gate(t, kept, rm):
                policy, kept = new_policy, t
        self.rd.write_json(layout.SUMMARY_FILE, {"iterations": results, "wall_seconds": time.perf_counter() - start,
                                            "phase_seconds": self.phase_seconds(), "policy_kept_from": kept})
        self.tracker.close()
        return results

    def gate(self, t: int, kept: int, rm_params: Any) -> bool:
        """The checkpoint gate: keep π_t only if r_t prefers its held-out responses to those of the kept
        policy π_kept (same prompts, sample k against sample k; ties count half) at a rate ≥ τ."""
        phase = layout.gate(t)
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                new = self.sample_rows(layout.samples_file(layout.eval_phase(t), layout.SAMPLES), "heldout_eval")
                old = self.sample_rows(layout.samples_file(layout.eval_phase(kept), layout.SAMPLES), "heldout_eval")
                prompts = list(zip(self.prompts("heldout_eval"), self.prompt_ids("heldout_eval"), strict=True))
                pairs = [(p, a["response_ids"], b["response_ids"])
                         for p, na, ob in zip(prompts, new, old, strict=True) for a, b in zip(na, ob, strict=True)]
                scores = self.scorer.score_ids(rm_params, [p[0] for p, _, _ in pairs] * 2,
                                               [p[1] for p, _, _ in pairs] * 2,
                                               [a for _, a, _ in pairs] + [b for _, _, b in pairs])
                r_new, r_old = scores[:len(pairs)], scores[len(pairs):]
                win_rate = float(np.mean((r_new > r_old) + 0.5 * (r_new == r_old)))
                summary.update(win_rate=win_rate, against_iteration=kept, pairs=len(pairs),
                               accepted=win_rate >= self.mt.gate_win_rate)
        return bool(self.rd.summary(phase)["accepted"])

    def params_at(self, t: int) -> tuple[Any, Any]:
        """(π_t, r_t) from the run directory; r_t is the latest RM at or before t (frozen runs keep r0)."""
        if t < 0 or t > self.iterations[-1]:
            raise ValueError(f"iteration {t} is outside 0..{self.iterations[-1]} of this run")
        finished = ", ".join(self.rd.completed()) or "none"
        if t > 0 and not self.rd.done(layout.e_step(t)):
            raise ValueError(f"iteration {t} has no policy yet in {self.rd.path} (finished phases: {finished})")
        if t == 0 and self.cfg.base_rm.enabled and not self.rd.done(layout.BASE_RM):
            raise ValueError(f"the base reward model r0 is not trained yet in {self.rd.path} (finished phases: "
                             f"{finished})")
        if t > 0 and self.mt.trains_rm and not self.rd.done(layout.m_step(t)):
            raise ValueError(f"iteration {t} has no reward model yet in {self.rd.path} (finished phases: {finished})")
        policy = self.models.policy_params if t == 0 else self.rd.load_params(layout.policy_checkpoint(t),
                                                                               like=self.models.policy_params)
        like = self.models.reward_init_params
        for s in range(t, 0, -1):
            if self.rd.done(layout.m_step(s)):
                return policy, self.rd.load_params(layout.reward_model_checkpoint(s), like=like)
        if self.rd.done(layout.BASE_RM):
            return policy, self.rd.load_params(layout.BASE_RM_MODEL, like=like)
        return policy, like

    def phase_seconds(self) -> dict[str, float]:
        """Wall time of each finished phase (as first run; a resumed phase keeps its original time)."""
        return {phase: self.rd.summary(phase).get("wall_seconds", float("nan")) for phase in self.rd.completed()}


SHARED_PHASES = layout.SHARED_PHASES  # the phases a run can take from another run, with their files


def share_base_phases(source: str, cfg: ConfigDict, workdir: str) -> list[str]:
    """Starts run `workdir` (config `cfg`) from the finished `SHARED_PHASES` of run `source`; returns the
    phases taken. Refuses when the two configs differ in more than what arms differ in (`mtjax.arms`: the
    arm, `mt`, and the E-step's objective and learning rate): then they are not arms of one study."""
    from mtjax.arms import arm_keys
    from mtjax.rundir import ConfigMismatchError, RunDir, config_diff

    arm_settings = arm_keys() | {"arm", "dpo.learning_rate"}
    changes = [c for c in config_diff(RunDir.read_config(source), cfg.to_dict())
               if c.section != "mt" and c.key not in arm_settings]
    if changes:
        raise ConfigMismatchError(f"cannot share phases of {source}: configs differ in more than their arms: "
                                  f"{'; '.join(map(str, changes))}")
    return share_phases(source, cfg, workdir)


def share_phases(source: str, cfg: ConfigDict, workdir: str) -> list[str]:
    """Starts run `workdir` (config `cfg`) from those finished `SHARED_PHASES` of run `source` whose outputs
    do not depend on how the two configs differ (`phases.independent_of`) nor on a phase left unshared: e.g.
    the prompts and π0 (`sft`) of a study's other seeds. Returns the phases taken."""
    from mtjax.rundir import RunDir, config_diff

    src, dst = RunDir.open_read_only(source), RunDir(workdir, cfg.to_dict())
    changes = config_diff(src.config, cfg.to_dict())
    gated = cfg.mt.gate_win_rate is not None
    taken: dict[str, tuple[str, ...]] = {}
    for name, files in SHARED_PHASES.items():
        inputs = [p for p in src.completed() if depends_on(name, p, gated)]
        if (src.done(name) and not dst.done(name) and all(c.within(independent_of(name)) for c in changes)
                and all(p in taken or dst.done(p) for p in inputs)):
            taken[name] = files
    dst.adopt_phases(src, taken)
    return list(taken)


def contrastive_pairs(prompts, new_samples, new_rewards, old_samples, old_rewards, filter_by_std: bool,
                      drop_truncated: bool) -> PairSet:
    """D(PM_new, PM_old): the new policy's first sample chosen over the old policy's first sample.

    With `filter_by_std`, pairs whose Δr = r(y_new) − r(y_old) is below −std(r on old samples) are
    dropped (the paper's later revision): the RM strongly disagrees that the new policy improved."""
    pairs = PairSet([], [], [], Counter())
    old_std = float(np.std([r for rs in old_rewards for r in rs])) if filter_by_std else 0.0
    for p, ns, nr, os_, or_ in zip(prompts, new_samples, new_rewards, old_samples, old_rewards, strict=True):
        new, old = ns[0], os_[0]
        if drop_truncated and not (new.stopped and old.stopped):
            pairs.counts["skipped_truncated"] += 1
            continue
        if new.ids == old.ids:
            pairs.counts["skipped_identical"] += 1
            continue
        if filter_by_std and nr[0] - or_[0] < -old_std:
            pairs.counts["filtered_by_reward_gap"] += 1
            continue
        pairs.prompts.append(list(p))
        pairs.chosen.append(list(new.ids))
        pairs.rejected.append(list(old.ids))
    pairs.counts["pairs"] = len(pairs)
    return pairs


def oriented_pairs(pairs: PairSet, keep: Sequence[bool | None], label: str) -> PairSet:
    """`pairs` with each pair kept as it is (True), swapped (False) or dropped (None: a tie); the swaps and
    drops are counted as `{label}_swapped` and `{label}_ties_dropped`."""
    out = PairSet([], [], [], Counter(pairs.counts))
    out.counts.update({f"{label}_swapped": 0, f"{label}_ties_dropped": 0})
    for prompt, chosen, rejected, k in zip(pairs.prompts, pairs.chosen, pairs.rejected, keep, strict=True):
        if k is None:
            out.counts[f"{label}_ties_dropped"] += 1
            continue
        if not k:
            chosen, rejected = rejected, chosen
            out.counts[f"{label}_swapped"] += 1
        out.prompts.append(prompt)
        out.chosen.append(chosen)
        out.rejected.append(rejected)
    out.counts["pairs"] = len(out)
    return out


def prompt_text(prompt: str | Sequence[Mapping[str, str]]) -> str:
    """A prompt as one string for a judge's rubric: chat turns as "Role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{turn['role'].capitalize()}: {turn['content']}" for turn in prompt)


def _eval_config_class():
    from mtjax.iteration_eval import EvalConfig

    return EvalConfig


def _metrics_row(phase: str, row: Mapping[str, Any]) -> dict:
    """A metrics.jsonl line: the iteration (0 for base_rm and iter_0) and phase come first."""
    return {"iteration": layout.iteration_of(phase), "phase": phase, **row}


def _length_summary(pairs: PairSet) -> dict[str, float]:
    if not len(pairs):
        return {}
    chosen = np.asarray([len(c) for c in pairs.chosen])
    rejected = np.asarray([len(r) for r in pairs.rejected])
    return {"chosen_len_mean": float(chosen.mean()), "chosen_len_p95": float(np.percentile(chosen, 95)),
            "rejected_len_mean": float(rejected.mean()), "rejected_len_p95": float(np.percentile(rejected, 95))}


def _group_rows(rows: Sequence[dict], order: Sequence[str]) -> list[list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["prompt_id"], []).append(row)
    return [grouped[pid] for pid in order]


def _say(message: str) -> None:
    print(f"mtjax: {message}", flush=True)


def _quiet(message: str) -> None:
    del message
