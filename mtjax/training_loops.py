"""The training loops of a run's phases: SFT of π0, DPO (and its variants) of the E-step, Bradley-Terry of the
reward model; each from a phase's config section, over shuffled batches (`mtjax.pairs`), through the step loop
`_run_steps` (divergence guard, mid-phase train-state saves, progress bar)."""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from mtjax import data, settings
from mtjax.device_memory import working_on
from mtjax.distributed import is_primary
from mtjax.divergence import DivergenceGuard
from mtjax.interrupts import Interrupted
from mtjax.pairs import PairSet, encode_pairs, pair_batches, sequence_batches
from mtjax.run_models import Models
from mtjax.train_checkpoint import TrainCheckpoint, host_metrics


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
