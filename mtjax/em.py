"""The Mutual-Taught loop (Shi et al., 2025): E-step trains the policy on pairs chosen by the reward
model, M-step retrains the reward model (from the base RM r0) on contrastive pairs (new policy vs old)
and on self-labelled pairs of the new policy's samples.

Every phase writes its outputs into the run directory and is then recorded as done, so a rerun
resumes after the last finished phase (see `mtjax.rundir`). Phases, in order:

    prompts                  generated prompt splits (recorded ids)
    base_rm                  r0: the RM trained on the gold-labelled "human" split
    iter_0/eval              base policy and r0 on held-out prompts
    iter_t/e_step            sample K from π_{t-1} on D_t, score with r_{t-1}, length-controlled
                             pairs, DPO from π_{t-1} (reference π_{t-1}) → π_t
    iter_t/m_step            samples of π_t and π_{t-1} on D_R → contrastive + self pairs → r_t
    iter_t/eval              π_t and r_t on held-out prompts
    iter_t/gate              (optional) keep π_t only if r_t prefers it to the kept policy at a rate ≥ τ
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from mtjax import data
from mtjax.distributed import barrier, is_primary
from mtjax.divergence import DivergenceError, DivergenceGuard, nonfinite_count
from mtjax.interrupts import Interrupted, stop_if_preempted
from mtjax.phases import depends_on, independent_of, training_section
from mtjax.rundir import RunDir, read_jsonl_prefix
from mtjax.train_checkpoint import TrainCheckpoint, host_metrics

RM_UPDATES = ("mutual", "frozen", "self_only", "contrastive_only")
# Which prompts the E-step of iteration t uses: D_t ("own"), or D_t plus the t-th of T equal chunks
# of D_R ("with_rm": the paper's baselines get the RM's prompts too, so every arm sees as many).
POLICY_PROMPTS = ("own", "with_rm")
# "iterative": T rounds; "offline": one DPO round from π0 on every training prompt (D_1..D_T and D_R)
# scored by r0, RM untouched: single-round offline DPO, the baseline with no iteration at all.
SCHEDULES = ("iterative", "offline")


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class Models:
    policy: Any  # CausalLM module
    reward: Any  # RewardModel module
    tokenizer: Any
    policy_params: Any  # π0
    reward_init_params: Any  # backbone + seeded score head, before base-RM training

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self.policy.cfg.eos_token_ids) or (self.tokenizer.eos_token_id,)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]


def tiny_model_config(vocab_size: int, **overrides):
    from mtjax.models import ModelConfig

    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True)
    return ModelConfig(**{**base, **overrides})


def load_models(cfg: ConfigDict, mesh=None) -> Models:
    """π0 and the RM's starting point from `cfg.policy.source` / `cfg.reward_model.source`:
    'smollm2' (offline GGUF), 'tiny' (random tiny Llama on SmolLM2's tokenizer) or an HF directory.
    With a `mesh`, params are placed on it by the partition rules; an HF checkpoint is then streamed
    shard by shard (no host or device ever holds a whole model)."""
    from mtjax.models import load_gguf_tokenizer, load_hf, load_smollm2, make_model, smollm2_gguf_path
    from mtjax.sharding import shard_params

    def load(section: ConfigDict, head: str, seed: int):
        # Compute in `dtype`, keep float32 master weights (`param_dtype`), optional remat per block.
        options = dict(dtype=section.dtype, param_dtype=section.param_dtype, remat=section.remat)
        if section.source == "smollm2":
            return load_smollm2(head=head, seed=seed, **options)
        tokenizer = load_gguf_tokenizer(smollm2_gguf_path())
        if section.source == "tiny":
            model_cfg = tiny_model_config(len(tokenizer), eos_token_ids=(tokenizer.eos_token_id,),
                                          pad_token_id=tokenizer.pad_token_id, **options)
            model = make_model(model_cfg, head)
            # The policy and the RM share one random backbone (seeded by cfg.seed), as with SmolLM2.
            params = model.init(jax.random.PRNGKey(cfg.seed), jnp.zeros((1, 1), jnp.int32))["params"]
            if head == "reward":
                backbone = make_model(model_cfg, "causal_lm").init(
                    jax.random.PRNGKey(cfg.seed), jnp.zeros((1, 1), jnp.int32))["params"]["model"]
                params = {**params, "model": backbone}
            return model, params, tokenizer
        from transformers import AutoTokenizer

        model, params = load_hf(section.source, head=head, seed=seed, mesh=mesh, **options)
        return model, params, AutoTokenizer.from_pretrained(section.source)

    policy, policy_params, tokenizer = load(cfg.policy, "causal_lm", cfg.seed)
    reward, reward_params, _ = load(cfg.reward_model, "reward", cfg.reward_model.head_seed)
    if mesh is not None:
        policy_params, reward_params = shard_params(policy_params, mesh), shard_params(reward_params, mesh)
    return Models(policy, reward, tokenizer, policy_params, reward_params)


# ----------------------------------------------------------------------------- sampling and scoring


@dataclasses.dataclass(frozen=True)
class Sample:
    ids: tuple[int, ...]  # response tokens, the stop token included when `stopped`
    stopped: bool


def sample_responses(models: Models, params: Any, prompt_ids: Sequence[Sequence[int]], num_samples: int,
                     cfg: ConfigDict, seed: int, mesh=None, first_prompt_index: int = 0) -> list[list[Sample]]:
    """`num_samples` responses per prompt from the policy (temperature/top-p from `cfg`)."""
    from mtjax.sampling import generate

    out = generate(models.policy, params, [list(p) for p in prompt_ids], max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, top_p=cfg.top_p, num_samples=num_samples,
                   eos_token_ids=models.eos_ids, pad_token_id=models.pad_id, seed=seed,
                   batch_size=cfg.batch_size, mesh=mesh, first_prompt_index=first_prompt_index)
    return [[Sample(tuple(int(t) for t in s.token_ids), s.finish_reason == "stop") for s in per_prompt]
            for per_prompt in out]


def score_responses(models: Models, rm_params: Any, prompt_ids: Sequence[Sequence[int]],
                    responses: Sequence[Sequence[int]], batch_size: int, mesh=None) -> np.ndarray:
    from mtjax.sampling import score

    return np.asarray(score(models.reward, rm_params, [list(p) for p in prompt_ids], [list(r) for r in responses],
                            batch_size=batch_size, pad_token_id=models.pad_id, mesh=mesh), np.float64)


def response_text(tokenizer: Any, sample: Sample | Sequence[int]) -> str:
    ids = sample.ids if isinstance(sample, Sample) else sample
    return tokenizer.decode(list(ids), skip_special_tokens=True)


# ----------------------------------------------------------------------------- pairs


@dataclasses.dataclass
class PairSet:
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    counts: Counter

    def __len__(self) -> int:
        return len(self.chosen)

    def rows(self, kind: str) -> list[dict]:
        return [{"kind": kind, "prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                for p, c, r in zip(self.prompts, self.chosen, self.rejected, strict=True)]


def length_controlled_pairs(prompt_ids: Sequence[Sequence[int]], samples: Sequence[Sequence[Sample]],
                            rewards: Sequence[Sequence[float]], drop_truncated: bool) -> PairSet:
    """One pair per prompt by `data.select_length_controlled_pair`; every skip is counted by reason."""
    pairs = PairSet([], [], [], Counter())
    for prompt, per_prompt, per_rewards in zip(prompt_ids, samples, rewards, strict=True):
        keep, dropped = data.drop_duplicate_responses([s.ids for s in per_prompt])
        pairs.counts["duplicate_responses"] += dropped
        if drop_truncated:
            truncated = [i for i in keep if not per_prompt[i].stopped]
            pairs.counts["truncated_responses"] += len(truncated)
            keep = [i for i in keep if per_prompt[i].stopped]
        choice = data.select_length_controlled_pair([per_rewards[i] for i in keep],
                                                    [len(per_prompt[i].ids) for i in keep])
        if isinstance(choice, str):
            pairs.counts[f"skipped_{choice}"] += 1
            continue
        pairs.prompts.append(list(prompt))
        pairs.chosen.append(list(per_prompt[keep[choice.chosen]].ids))
        pairs.rejected.append(list(per_prompt[keep[choice.rejected]].ids))
    pairs.counts["pairs"] = len(pairs)
    return pairs


def encode_pairs(pairs: PairSet, max_length: int) -> tuple[list, list, Counter]:
    chosen, rejected, counts = [], [], Counter()
    for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected, strict=True):
        ec, er = data.encode_completion(p, c, max_length), data.encode_completion(p, r, max_length)
        if ec is None or er is None:
            counts["dropped_prompt_too_long"] += 1
            continue
        counts["truncated_to_max_length"] += int(ec.truncated or er.truncated)
        chosen.append(ec)
        rejected.append(er)
    return chosen, rejected, counts


def pair_batches(chosen, rejected, pad_id: int, batch_size: int, max_length: int, seed: int,
                 per_pair: Mapping[str, np.ndarray] | None = None):
    """Shuffled batches of exactly `batch_size` rows (one compiled shape per length bucket); the last
    is padded with weight-0 rows, never dropped. `per_pair` arrays (e.g. reference log-probs) follow
    the same shuffle."""
    order = np.random.default_rng(seed).permutation(len(chosen))
    for start in range(0, len(order), batch_size):
        idx = list(order[start:start + batch_size])
        real = len(idx)
        idx += [idx[0]] * (batch_size - real)
        batch = data.collate_pairs([chosen[i] for i in idx], [rejected[i] for i in idx], pad_id, max_length)
        batch["pair_weight"] = (np.arange(batch_size) < real).astype(np.float32)
        for name, values in (per_pair or {}).items():
            batch[name] = np.asarray(values)[idx]
        yield batch


# ----------------------------------------------------------------------------- training


def _num_steps(num_pairs: int, batch_size: int, epochs: int) -> int:
    return max(1, math.ceil(num_pairs / batch_size)) * epochs


def _run_steps(step_fn: Callable, state: Any, batches_per_epoch: Callable[[int], Any], epochs: int,
               total: int, desc: str, log: Callable[[dict], None], mesh,
               checkpoint: TrainCheckpoint | None = None) -> tuple[Any, list[dict]]:
    """Runs `total` steps over `epochs` passes of `batches_per_epoch(epoch)`. Every step passes the divergence
    guard (`mtjax.divergence`) before it counts. With `checkpoint`, resumes from its last save (skipping the
    batches already trained on), saves as its policies say, and saves on Ctrl-C / SIGTERM / preemption."""
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
                    state, pending = step_fn(state, shard_global_batch(batch, mesh))
                    row = host_metrics(pending)
                    guard.check(len(history) + 1, total, row, state.params,
                                checkpoint.saved_step if checkpoint is not None else 0)
                    pending = None
                    history.append(row)
                    log({"step": len(history), "epoch": epoch, "train": row})
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('accuracy', float('nan')):.2f}")
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


def _mean_metrics(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    if not history:
        return {}
    keys = history[0].keys()
    return {f"train_{k}": float(np.mean([h[k] for h in history])) for k in keys}


def train_dpo(models: Models, params: Any, pairs: PairSet, cfg: ConfigDict, mesh, seed: int,
              log: Callable[[dict], None], cache_dir: str | None,
              checkpoint: TrainCheckpoint | None = None) -> tuple[Any, dict]:
    """DPO (or IPO/hinge/SimPO) from `params` with reference = `params`; returns new params and stats.
    With `checkpoint`, the train state is saved as it goes and a rerun resumes from the last save."""
    from mtjax import train

    chosen, rejected, counts = encode_pairs(pairs, cfg.max_length)
    if not chosen:
        return params, {**counts, "trained_pairs": 0}
    dpo_cfg = train.DPOConfig(loss_type=cfg.loss_type, beta=cfg.beta, num_micro_batches=cfg.num_micro_batches,
                              reference="precomputed")
    total = _num_steps(len(chosen), cfg.batch_size, cfg.epochs)
    opt_cfg = train.OptimizerConfig(learning_rate=cfg.learning_rate, total_steps=total,
                                    warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay)
    full = data.collate_pairs(chosen, rejected, models.pad_id, cfg.max_length)
    reference = {}
    if dpo_cfg.uses_reference:
        cache = train.ReferenceLogprobCache(cache_dir) if cache_dir else None
        reference = train.precompute_reference_logprobs(
            models.policy, params, {k: v for k, v in full.items() if k in train.DPO_BATCH_KEYS}, mesh,
            batch_size=max(1, cfg.batch_size // cfg.num_micro_batches), average=dpo_cfg.averages_logprobs,
            cache=cache)
    step = train.make_dpo_step(models.policy, dpo_cfg, opt_cfg, mesh)
    state = train.init_train_state(params, opt_cfg, mesh)  # a copy: the step donates it, π_{t-1} lives on
    batches = lambda epoch: pair_batches(chosen, rejected, models.pad_id, cfg.batch_size, cfg.max_length,
                                         seed + 7919 * epoch, reference)
    state, history = _run_steps(step, state, batches, cfg.epochs, total, "DPO", log, mesh, checkpoint)
    return state.params, {**counts, "trained_pairs": len(chosen), "steps": total, **_mean_metrics(history)}


def train_reward_model(models: Models, init_params: Any, pair_sets: Sequence[PairSet], cfg: ConfigDict, mesh,
                       seed: int, log: Callable[[dict], None],
                       checkpoint: TrainCheckpoint | None = None) -> tuple[Any, dict]:
    """Bradley-Terry training of the RM from `init_params` on the union of `pair_sets` (`checkpoint`: as
    in `train_dpo`)."""
    from mtjax import train

    chosen, rejected, counts = [], [], Counter()
    for pairs in pair_sets:
        c, r, n = encode_pairs(pairs, cfg.max_length)
        chosen += c
        rejected += r
        counts.update(n)
    if not chosen:
        return init_params, {**counts, "trained_pairs": 0}
    total = _num_steps(len(chosen), cfg.batch_size, cfg.epochs)
    opt_cfg = train.OptimizerConfig(learning_rate=cfg.learning_rate, total_steps=total,
                                    warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay)
    step = train.make_reward_model_step(models.reward, train.RewardConfig(num_micro_batches=cfg.num_micro_batches),
                                        opt_cfg, mesh)
    state = train.init_train_state(init_params, opt_cfg, mesh)  # a copy: r0 is reused every iteration
    batches = lambda epoch: pair_batches(chosen, rejected, models.pad_id, cfg.batch_size, cfg.max_length,
                                         seed + 7919 * epoch)
    state, history = _run_steps(step, state, batches, cfg.epochs, total, "RM", log, mesh, checkpoint)
    return state.params, {**counts, "trained_pairs": len(chosen), "steps": total, **_mean_metrics(history)}


# ----------------------------------------------------------------------------- the loop


def validate_config(cfg: ConfigDict) -> None:
    """Every impossible value in one error, before any compute."""
    problems = []
    if cfg.iterations < 1:
        problems.append(f"iterations={cfg.iterations} must be >= 1")
    if cfg.mt.rm_update not in RM_UPDATES:
        problems.append(f"mt.rm_update={cfg.mt.rm_update!r} must be one of {RM_UPDATES}")
    if cfg.mt.policy_prompts not in POLICY_PROMPTS:
        problems.append(f"mt.policy_prompts={cfg.mt.policy_prompts!r} must be one of {POLICY_PROMPTS}")
    if cfg.mt.schedule not in SCHEDULES:
        problems.append(f"mt.schedule={cfg.mt.schedule!r} must be one of {SCHEDULES}")
    if cfg.sampling.num_samples < 2:
        problems.append(f"sampling.num_samples={cfg.sampling.num_samples} must be >= 2 to form pairs")
    if not 0.0 < cfg.sampling.top_p <= 1.0:
        problems.append(f"sampling.top_p={cfg.sampling.top_p} must be in (0, 1]")
    if cfg.sampling.temperature < 0:
        problems.append(f"sampling.temperature={cfg.sampling.temperature} must be >= 0")
    if cfg.eval.num_samples < 2:
        problems.append(f"eval.num_samples={cfg.eval.num_samples} must be >= 2 (RM accuracy needs pairs)")
    for name in ("dpo", "rm", "base_rm"):
        section = cfg[name]
        if section.batch_size < 1 or section.learning_rate <= 0 or section.epochs < 1:
            problems.append(f"{name}: batch_size, learning_rate and epochs must be positive")
        if section.max_length <= cfg.sampling.max_new_tokens:
            problems.append(f"{name}.max_length={section.max_length} must exceed sampling.max_new_tokens="
                            f"{cfg.sampling.max_new_tokens} (prompt + response)")
    sizes = cfg.prompts
    if len(sizes.policy) != cfg.iterations:
        problems.append(f"prompts.policy has {len(sizes.policy)} sizes but iterations={cfg.iterations}")
    if cfg.checkpoint.train_every_steps < 0 or cfg.checkpoint.train_every_seconds < 0:
        problems.append("checkpoint.train_every_steps and .train_every_seconds must be >= 0 (0 turns a trigger off)")
    if cfg.checkpoint.sample_every_prompts < 1:
        problems.append(f"checkpoint.sample_every_prompts={cfg.checkpoint.sample_every_prompts} must be >= 1")
    if cfg.mt.gate_win_rate is not None and not 0.0 <= cfg.mt.gate_win_rate <= 1.0:
        problems.append(f"mt.gate_win_rate={cfg.mt.gate_win_rate} must be in [0, 1] (or unset: no gate)")
    for source in (cfg.policy.source, cfg.reward_model.source):
        if source not in ("smollm2", "tiny"):
            import os

            if not os.path.isdir(source):
                problems.append(f"model source {source!r} is neither 'smollm2', 'tiny' nor a checkpoint directory")
    if problems:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))


class MutualTaught:
    """One run: holds the models, prompts and run directory; `run()` executes the remaining phases."""

    def __init__(self, cfg: ConfigDict, workdir: str, allow_config_change: bool = False, read_only: bool = False):
        """`read_only`: open a run directory to read its models (`params_at`), writing nothing into it."""
        from mtjax.sharding import make_mesh

        validate_config(cfg)
        self.cfg = cfg
        if read_only:
            self.rd = RunDir.open_read_only(workdir)
        else:
            self.rd = RunDir(workdir, cfg.to_dict(), allow_config_change)
            self._reconcile_run_directory()
        self.mesh = make_mesh(**cfg.mesh.to_dict())
        self.models = load_models(cfg, self.mesh)
        self.splits = {} if read_only else self._prompt_splits()
        self._prompt_ids: dict[str, list[list[int]]] = {}

    def _reconcile_run_directory(self) -> None:
        """Makes the run directory agree with this run: an unfinished phase drops what it made with settings
        that have changed since, and a phase whose recorded artifact is missing or damaged is redone."""
        say = _say if is_primary() else _quiet
        changes = self.rd.accepted_changes
        if changes:
            say(f"{self.rd.path}: config changes accepted (no finished phase used them): "
                f"{'; '.join(map(str, changes))}")
        for phase in self.rd.in_flight():
            touched = {c.section for c in changes} - set(independent_of(phase))
            if touched - {training_section(phase)}:  # a change of its training settings alone keeps its samples
                say(f"{phase} started with the former {', '.join(sorted(touched))} settings; starting it again")
                self.rd.discard_in_flight(phase)
                self.train_checkpoint(phase).clear()
        gated = self.cfg.mt.gate_win_rate is not None
        for message in self.rd.repair(lambda later, earlier: depends_on(later, earlier, gated)):
            say(message)

    @property
    def iterations(self) -> range:
        return range(1, 2 if self.cfg.mt.schedule == "offline" else self.cfg.iterations + 1)

    def policy_split(self, t: int) -> str:
        """The prompt split of iteration t's E-step (see POLICY_PROMPTS and SCHEDULES); derived splits
        are concatenations of recorded ones, built on first use."""
        import datasets

        mt, T = self.cfg.mt, self.cfg.iterations
        if mt.schedule == "offline":
            name, parts = "all_training", [self.splits[f"policy_{s}"] for s in range(1, T + 1)]
            parts.append(self.splits["reward_model"])
        elif mt.policy_prompts == "with_rm":
            rm = self.splits["reward_model"]
            lo, hi = (t - 1) * len(rm) // T, t * len(rm) // T
            name, parts = f"policy_{t}_with_rm", [self.splits[f"policy_{t}"], rm.select(range(lo, hi))]
        else:
            return f"policy_{t}"
        if name not in self.splits:
            self.splits[name] = datasets.concatenate_datasets(parts)
        return name

    # -- inputs ------------------------------------------------------------------------------

    def _prompt_splits(self):
        from mtjax.testbed.prompts import (
            PromptGeneratorConfig,
            PromptSplitSizes,
            build_prompt_splits,
            load_prompt_splits,
            save_prompt_splits,
        )

        if not self.rd.done("prompts"):
            p = self.cfg.prompts
            gen_cfg = PromptGeneratorConfig(seed=p.seed, sizes=PromptSplitSizes(
                policy=tuple(p.policy), reward_model=p.reward_model, base_rm_labels=p.base_rm_labels,
                heldout_eval=p.heldout_eval))
            with self.phase("prompts") as summary:
                splits = build_prompt_splits(gen_cfg)
                if p.source != "testbed":  # train on the source's prompts; evaluate on the testbed's
                    splits.update(external_prompt_splits(p, [*splits.keys()]))
                if is_primary():  # the others built the same splits; they read process 0's files
                    save_prompt_splits(splits, self.rd.file("prompts"), gen_cfg)
                barrier("mtjax-prompts")
                self.rd.record_artifact("prompts")
                summary.update({f"prompts_{k}": len(v) for k, v in splits.items()})
        return load_prompt_splits(self.rd.file("prompts"))

    def prompt_ids(self, split: str) -> list[list[int]]:
        if split not in self._prompt_ids:
            self._prompt_ids[split] = [data.chat_prompt_ids(self.models.tokenizer, text)
                                       for text in self.splits[split]["prompt"]]
        return self._prompt_ids[split]

    def instruction_prompts(self, split: str):
        from mtjax.testbed.benchmarks import instruction_prompts_from_rows

        return instruction_prompts_from_rows(list(self.splits[split]), where=f"prompt split {split}")

    def _seed(self, phase: str) -> int:
        """A per-phase seed, so a resumed run samples exactly what an uninterrupted one would."""
        import zlib

        return (self.cfg.seed * 1_000_003 + zlib.crc32(phase.encode())) % (2**31)

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
        except BaseException:
            self.rd.abandon_phase()
            raise
        for message in self.rd.mark_done(name, {**summary, "wall_seconds": time.perf_counter() - start}):
            if is_primary():
                _say(message)
        self.train_checkpoint(name).clear()  # the phase's outputs supersede its mid-phase state

    def train_checkpoint(self, phase: str) -> TrainCheckpoint:
        """The phase's train-state saves; its divergence guard names the learning rate to lower."""
        c, section = self.cfg.checkpoint, training_section(phase)
        settings = self.cfg[section].to_dict() if section else None
        guard = DivergenceGuard(phase, f"{section}.learning_rate", settings["learning_rate"]) if section else None
        return TrainCheckpoint(self.rd, f"{phase}/train_state", every_steps=c.train_every_steps,
                               every_seconds=c.train_every_seconds, guard=guard, settings=settings)

    def log(self, phase: str) -> Callable[[dict], None]:
        return lambda row: self.rd.log_metrics(_metrics_row(phase, row))

    # -- stored samples ----------------------------------------------------------------------

    def samples(self, phase: str, name: str, params: Any, split: str, num_samples: int,
                rm_params: Any = None, sampling: ConfigDict | None = None) -> tuple[list[list[Sample]], list]:
        """Samples (and, with `rm_params`, their RM scores) of `split`, read back if already stored.

        The pass runs in pieces of `checkpoint.sample_every_prompts` prompts; the rows of finished pieces
        are kept in `NAME.partial.jsonl`, so an interrupted pass resumes with the next piece. Each prompt
        keeps its index in the split, hence its random draws."""
        path, partial = f"{phase}/{name}.jsonl", f"{phase}/{name}.partial.jsonl"
        if self.rd.file(path).exists():  # written by an earlier attempt at this phase
            self.rd.record_artifact(path, keep_recorded=True)
        else:
            prompts, ids = self.prompt_ids(split), self.splits[split]["prompt_id"]
            rows = self._whole_prompts(partial, ids, num_samples) if self.rd.file(partial).exists() else []
            piece = self.cfg.checkpoint.sample_every_prompts
            first = len(rows) // num_samples
            if first and is_primary():
                print(f"mtjax: {path}: resuming after {first} of {len(prompts)} prompts", flush=True)
            seconds = tokens = truncated = responses = 0
            for lo in range(first, len(prompts), piece):
                stop_if_preempted()
                start = time.perf_counter()
                hi = min(lo + piece, len(prompts))
                samples = sample_responses(self.models, params, prompts[lo:hi], num_samples,
                                           sampling or self.cfg.sampling, self._seed(path), self.mesh,
                                           first_prompt_index=lo)
                rewards = [[None] * len(s) for s in samples]
                if rm_params is not None:
                    flat_p = [p for p, s in zip(prompts[lo:hi], samples, strict=True) for _ in s]
                    flat_r = [x.ids for s in samples for x in s]
                    scores = score_responses(self.models, rm_params, flat_p, flat_r, self.cfg.sampling.batch_size,
                                             self.mesh)
                    if nonfinite_count(scores):
                        raise DivergenceError(
                            f"{phase}: the reward model gave {nonfinite_count(scores)} of {len(scores)} responses a "
                            "reward that is not finite (its weights are broken); nothing of this piece was saved")
                    it = iter(scores.tolist())
                    rewards = [[next(it) for _ in s] for s in samples]
                rows += [{"prompt_id": pid, "sample": k, "response_ids": list(x.ids), "stopped": x.stopped,
                          "reward": r, "text": response_text(self.models.tokenizer, x)}
                         for pid, s, rs in zip(ids[lo:hi], samples, rewards, strict=True)
                         for k, (x, r) in enumerate(zip(s, rs, strict=True))]
                if hi < len(prompts):
                    self.rd.write_jsonl(partial, rows, artifact=False)
                seconds += time.perf_counter() - start
                tokens += sum(len(x.ids) for s in samples for x in s)
                truncated += sum(not x.stopped for s in samples for x in s)
                responses += sum(map(len, samples))
            self.rd.write_jsonl(path, rows)
            if is_primary():
                self.rd.file(partial).unlink(missing_ok=True)
            self.rd.log_metrics(_metrics_row(phase, {"sampling": {
                name: {"responses": responses, "tokens": tokens, "seconds": seconds,
                       "tokens_per_second": tokens / max(seconds, 1e-9), "truncated": truncated,
                       "resumed_after_prompts": first}}}))
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

    def ids_by_text(self, split: str, groups: Sequence[Sequence[dict]]) -> dict[tuple[str, str], tuple[list, list]]:
        """(prompt text, response text) -> (prompt ids, sampled response ids), for the text-based evaluators."""
        return {(text, r["text"]): (p_ids, r["response_ids"])
                for text, p_ids, group in zip(self.splits[split]["prompt"], self.prompt_ids(split), groups,
                                              strict=True)
                for r in group}

    # -- phases ------------------------------------------------------------------------------

    def base_reward_model(self) -> Any:
        """r0: the RM trained from its initial weights on gold-labelled pairs of π0's samples."""
        from mtjax.evaluate import gold_preference_pairs

        phase = "base_rm"
        if not self.cfg.base_rm.enabled:
            return self.models.reward_init_params
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                split = "base_rm_labels"
                self.samples(phase, "samples", self.models.policy_params, split, self.cfg.sampling.num_samples)
                rows = self.sample_rows(f"{phase}/samples.jsonl", split)
                built = gold_preference_pairs(self.instruction_prompts(split),
                                              [[r["text"] for r in group] for group in rows])
                by_text = self.ids_by_text(split, rows)
                pairs = PairSet([], [], [], Counter())
                for ex in built.pairs:
                    p_ids, chosen = by_text[(ex.prompt, ex.chosen)]
                    _, rejected = by_text[(ex.prompt, ex.rejected)]
                    pairs.prompts.append(p_ids)
                    pairs.chosen.append(list(chosen))
                    pairs.rejected.append(list(rejected))
                pairs.counts.update(pairs=len(pairs), prompts_without_pair=built.num_prompts_without_pair,
                                    tied_pairs_skipped=built.num_tied_pairs_skipped)
                self.rd.write_jsonl(f"{phase}/pairs.jsonl", pairs.rows("gold"))
                params, stats = train_reward_model(self.models, self.models.reward_init_params, [pairs],
                                                   self.cfg.base_rm, self.mesh, self._seed(phase), self.log(phase),
                                                   self.train_checkpoint(phase))
                self.rd.save_params(f"{phase}/reward_model", params)
                summary.update({**pairs.counts, **stats})
        return self.rd.load_params(f"{phase}/reward_model", like=self.models.reward_init_params)

    def e_step(self, t: int, policy_params: Any, rm_params: Any) -> Any:
        phase = f"iter_{t}/e_step"
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                split = self.policy_split(t)
                samples, rewards = self.samples(phase, "samples", policy_params, split, self.cfg.sampling.num_samples,
                                                rm_params=rm_params)
                pairs = length_controlled_pairs(self.prompt_ids(split), samples, rewards, self.cfg.mt.drop_truncated)
                self.rd.write_jsonl(f"{phase}/pairs.jsonl", pairs.rows("policy"))
                new_params, stats = train_dpo(self.models, policy_params, pairs, self.cfg.dpo, self.mesh,
                                              self._seed(phase), self.log(phase), str(self.rd.file("reference_cache")),
                                              self.train_checkpoint(phase))
                self.rd.save_params(f"iter_{t}/policy", new_params)
                summary.update({**pairs.counts, **stats, **_length_summary(pairs)})
        return self.rd.load_params(f"iter_{t}/policy", like=self.models.policy_params)

    def m_step(self, t: int, old_policy: Any, new_policy: Any, rm_params: Any, base_rm: Any) -> Any:
        phase = f"iter_{t}/m_step"
        cfg = self.cfg.mt
        if cfg.rm_update == "frozen" or cfg.schedule == "offline":
            return rm_params
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                split = "reward_model"
                new_samples, new_rewards = self.samples(phase, "new_policy_samples", new_policy, split,
                                                        self.cfg.sampling.num_samples, rm_params=rm_params)
                # The contrastive pair uses one response of π_{t-1} per prompt (its reward feeds the filter).
                old_samples, old_rewards = self.samples(phase, "old_policy_samples", old_policy, split, 1,
                                                        rm_params=rm_params)
                prompts = self.prompt_ids(split)
                pair_sets: dict[str, PairSet] = {}
                if cfg.rm_update in ("mutual", "self_only"):
                    pair_sets["self"] = length_controlled_pairs(prompts, new_samples, new_rewards, cfg.drop_truncated)
                if cfg.rm_update in ("mutual", "contrastive_only"):
                    pair_sets["contrastive"] = contrastive_pairs(prompts, new_samples, new_rewards, old_samples,
                                                                 old_rewards, cfg.contrastive_filter,
                                                                 cfg.drop_truncated)
                for kind, pairs in pair_sets.items():
                    self.rd.write_jsonl(f"{phase}/{kind}_pairs.jsonl", pairs.rows(kind))
                params, stats = train_reward_model(self.models, base_rm, list(pair_sets.values()), self.cfg.rm,
                                                   self.mesh, self._seed(phase), self.log(phase),
                                                   self.train_checkpoint(phase))
                self.rd.save_params(f"iter_{t}/reward_model", params)
                counts = {f"{kind}_{k}": v for kind, pairs in pair_sets.items() for k, v in pairs.counts.items()}
                summary.update({**counts, **stats})
        return self.rd.load_params(f"iter_{t}/reward_model", like=base_rm)

    def evaluate(self, t: int, policy_params: Any, rm_params: Any) -> dict:
        """π_t and r_t on held-out prompts: the policy's gold reward, IFEval-style accuracies and
        lengths; the RM's accuracy against gold labels on pairs of π_t's and of π0's samples.

        Writes `iter_t/eval/results.json` (flat) and `eval/iter_t.json` (the report's nested names)."""
        from mtjax.evaluate import evaluate_instruction_following, gold_pairwise_accuracy

        phase = f"iter_{t}/eval"
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                split = "heldout_eval"
                ev = self.cfg.eval
                sampling = ConfigDict({**self.cfg.sampling.to_dict(), "temperature": ev.temperature})
                samples, _ = self.samples(phase, "samples", policy_params, split, ev.num_samples, sampling=sampling)
                prompts = self.instruction_prompts(split)
                rows = self.sample_rows(f"{phase}/samples.jsonl", split)
                texts = [[r["text"] for r in group] for group in rows]
                flat_prompts = [p for p, s in zip(prompts, texts, strict=True) for _ in s]
                policy = evaluate_instruction_following(flat_prompts, responses=[x for s in texts for x in s],
                                                        progress=False)
                tokens = np.asarray([len(x.ids) for s in samples for x in s], np.float64)
                policy.update(length_mean_tokens=float(tokens.mean()),
                              length_p95_tokens=float(np.percentile(tokens, 95)),
                              truncated_fraction=float(np.mean([not x.stopped for s in samples for x in s])))
                base_rows = self.sample_rows("iter_0/eval/samples.jsonl", split)
                base_texts = [[r["text"] for r in group] for group in base_rows]
                # Score the sampled token ids themselves (a decode/re-encode round trip would, e.g., append
                # an EOS to truncated responses: not what the RM saw in training).
                score_fn = self.text_score_fn(rm_params, {**self.ids_by_text(split, rows),
                                                          **self.ids_by_text(split, base_rows)})
                rm_current = _safe_accuracy(gold_pairwise_accuracy, score_fn, prompts, texts, progress=is_primary())
                rm_base = _safe_accuracy(gold_pairwise_accuracy, score_fn, prompts, base_texts,
                                         progress=is_primary())
                metrics = {
                    "policy": {"gold_reward": policy["gold_reward_strict"],
                               "heldout": {k: policy[k] for k in _HELDOUT_KEYS},
                               **{k: policy[k] for k in _LENGTH_KEYS}},
                    "rm": {"accuracy_current_policy": rm_current.get("accuracy", float("nan")),
                           "accuracy_base_policy": rm_base.get("accuracy", float("nan")),
                           "pairs_current_policy": rm_current.get("num_pairs", 0),
                           "pairs_base_policy": rm_base.get("num_pairs", 0)},
                    "pairs": self._pair_counts(t),
                }
                self.rd.write_json(f"eval/iter_{t}.json", {"iteration": t, "metrics": metrics})
                result = {"iteration": t, **_prefixed("policy", policy),
                          **_prefixed("rm_acc_current_policy", rm_current), **_prefixed("rm_acc_base_policy", rm_base)}
                self.rd.write_json(f"{phase}/results.json", result)
                summary.update(result)
        return self.rd.summary(phase)

    def _pair_counts(self, t: int) -> dict[str, int]:
        """How many pairs each training phase of iteration t used (and dropped), from its summary."""
        counts = {}
        if t == 0 and self.rd.done("base_rm"):
            summary = self.rd.summary("base_rm")
            counts.update(base_rm_gold=summary.get("pairs", 0), base_rm_trained=summary.get("trained_pairs", 0))
        if t >= 1 and self.rd.done(f"iter_{t}/e_step"):
            summary = self.rd.summary(f"iter_{t}/e_step")
            counts.update(policy=summary.get("pairs", 0), policy_trained=summary.get("trained_pairs", 0),
                          policy_skipped=sum(v for k, v in summary.items() if k.startswith("skipped_")))
        if t >= 1 and self.rd.done(f"iter_{t}/m_step"):
            summary = self.rd.summary(f"iter_{t}/m_step")
            counts.update(rm_contrastive=summary.get("contrastive_pairs", 0),
                          rm_self_training=summary.get("self_pairs", 0), rm_trained=summary.get("trained_pairs", 0))
        return counts

    def text_score_fn(self, rm_params: Any, known: Mapping[tuple[str, str], tuple[list[int], list[int]]]
                      ) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
        """A texts-in scorer for the evaluators; (prompt, response) pairs found in `known` are scored on
        their sampled token ids, others are tokenised (chat template, response + EOS)."""
        tok = self.models.tokenizer

        def ids(prompt: str, response: str) -> tuple[list[int], list[int]]:
            if (prompt, response) in known:
                return known[(prompt, response)]
            return data.chat_prompt_ids(tok, prompt), data.response_ids(tok, response, self.models.eos_ids[0])

        def score_fn(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
            p_ids, r_ids = zip(*(ids(p, r) for p, r in zip(prompts, responses, strict=True)), strict=True)
            return score_responses(self.models, rm_params, p_ids, r_ids, self.cfg.sampling.batch_size, self.mesh)

        return score_fn

    # -- driver ------------------------------------------------------------------------------

    def run(self) -> list[dict]:
        start = time.perf_counter()
        base_rm = self.base_reward_model()
        policy, rm = self.models.policy_params, base_rm
        results = [self.evaluate(0, policy, rm)]
        kept = 0  # the iteration whose policy the loop continues from
        for t in self.iterations:
            new_policy = self.e_step(t, policy, rm)
            rm = self.m_step(t, policy, new_policy, rm, base_rm)
            results.append(self.evaluate(t, new_policy, rm))
            if self.cfg.mt.gate_win_rate is None or self.gate(t, kept, rm):
                policy, kept = new_policy, t
        self.rd.write_json("summary.json", {"iterations": results, "wall_seconds": time.perf_counter() - start,
                                            "phase_seconds": self.phase_seconds(), "policy_kept_from": kept})
        return results

    def gate(self, t: int, kept: int, rm_params: Any) -> bool:
        """The checkpoint gate: keep π_t only if r_t prefers its held-out responses to those of the kept
        policy π_kept (same prompts, sample k against sample k; ties count half) at a rate ≥ τ."""
        phase = f"iter_{t}/gate"
        if not self.rd.done(phase):
            with self.phase(phase) as summary:
                new = self.sample_rows(f"iter_{t}/eval/samples.jsonl", "heldout_eval")
                old = self.sample_rows(f"iter_{kept}/eval/samples.jsonl", "heldout_eval")
                prompts = self.prompt_ids("heldout_eval")
                pairs = [(p, a["response_ids"], b["response_ids"])
                         for p, na, ob in zip(prompts, new, old, strict=True) for a, b in zip(na, ob, strict=True)]
                scores = score_responses(self.models, rm_params, [p for p, _, _ in pairs] * 2,
                                         [a for _, a, _ in pairs] + [b for _, _, b in pairs],
                                         self.cfg.sampling.batch_size, self.mesh)
                r_new, r_old = scores[:len(pairs)], scores[len(pairs):]
                win_rate = float(np.mean((r_new > r_old) + 0.5 * (r_new == r_old)))
                summary.update(win_rate=win_rate, against_iteration=kept, pairs=len(pairs),
                               accepted=win_rate >= self.cfg.mt.gate_win_rate)
        return bool(self.rd.summary(phase)["accepted"])

    def params_at(self, t: int) -> tuple[Any, Any]:
        """(π_t, r_t) from the run directory; r_t is the latest RM at or before t (frozen runs keep r0)."""
        if t < 0 or t > self.iterations[-1]:
            raise ValueError(f"iteration {t} is outside 0..{self.iterations[-1]} of this run")
        finished = ", ".join(self.rd.completed()) or "none"
        if t > 0 and not self.rd.done(f"iter_{t}/e_step"):
            raise ValueError(f"iteration {t} has no policy yet in {self.rd.path} (finished phases: {finished})")
        if t == 0 and self.cfg.base_rm.enabled and not self.rd.done("base_rm"):
            raise ValueError(f"the base reward model r0 is not trained yet in {self.rd.path} (finished phases: "
                             f"{finished})")
        trains_rm = self.cfg.mt.rm_update != "frozen" and self.cfg.mt.schedule != "offline"
        if t > 0 and trains_rm and not self.rd.done(f"iter_{t}/m_step"):
            raise ValueError(f"iteration {t} has no reward model yet in {self.rd.path} (finished phases: {finished})")
        policy = self.models.policy_params if t == 0 else self.rd.load_params(f"iter_{t}/policy",
                                                                               like=self.models.policy_params)
        like = self.models.reward_init_params
        for s in range(t, 0, -1):
            if self.rd.done(f"iter_{s}/m_step"):
                return policy, self.rd.load_params(f"iter_{s}/reward_model", like=like)
        if self.rd.done("base_rm"):
            return policy, self.rd.load_params("base_rm/reward_model", like=like)
        return policy, like

    def phase_seconds(self) -> dict[str, float]:
        """Wall time of each finished phase (as first run; a resumed phase keeps its original time)."""
        return {phase: self.rd.summary(phase).get("wall_seconds", float("nan")) for phase in self.rd.completed()}


# Phases whose outputs do not depend on the `mt` section (and their files): arms of an ablation that
# differ only there can share them instead of recomputing r0 and the base policy's evaluation.
SHARED_PHASES = {"prompts": ("prompts",), "base_rm": ("base_rm",), "iter_0/eval": ("iter_0/eval", "eval/iter_0.json")}


def share_base_phases(source: str, cfg: ConfigDict, workdir: str) -> list[str]:
    """Starts run `workdir` (config `cfg`) from the finished `SHARED_PHASES` of run `source`; returns the
    phases taken. Refuses when the two configs differ outside `mt` (then the phases would differ)."""
    from mtjax.rundir import ConfigMismatchError, RunDir, config_changes

    theirs = RunDir.read_config(source)
    changes = [c for c in config_changes(theirs, cfg.to_dict()) if not c.startswith("mt.")]
    if changes:
        raise ConfigMismatchError(f"cannot share phases of {source}: configs differ outside `mt`: {'; '.join(changes)}")
    src, dst = RunDir.open_read_only(source), RunDir(workdir, cfg.to_dict())
    phases = {name: files for name, files in SHARED_PHASES.items() if src.done(name) and not dst.done(name)}
    dst.adopt_phases(src, phases)
    return list(phases)


def load_prompt_texts(source: str, split: str, column: str) -> list[str]:
    """Prompt strings from a local file (.jsonl/.json/.parquet), a `save_to_disk` folder or a hub dataset id.
    Chat-format columns (a list of {role, content}) give their first user message."""
    import os

    import datasets

    if os.path.isfile(source):
        kind = "parquet" if source.endswith(".parquet") else "json"
        table = datasets.load_dataset(kind, data_files=source, split="train")
    elif os.path.isdir(source):
        table = datasets.load_from_disk(source)
        table = table[split] if isinstance(table, datasets.DatasetDict) else table
    else:
        table = datasets.load_dataset(source, split=split)  # needs the hub (or its cache)
    if column not in table.column_names:
        raise ValueError(f"prompts.source={source!r} has no column {column!r} (columns: {table.column_names}); "
                         "set prompts.column")

    def text(value):
        if isinstance(value, list):  # chat messages
            return next((m["content"] for m in value if m.get("role") == "user"), "")
        return value

    return [text(v) for v in table[column]]


def external_prompt_splits(p: ConfigDict, names: Sequence[str]) -> dict[str, Any]:
    """The policy splits D_1..D_T and the RM split D_R drawn (deduplicated, shuffled by `p.seed`) from
    `p.source`; every prompt is recorded with a content-hash id."""
    import hashlib

    import datasets

    from mtjax.testbed.prompts import PROMPT_FEATURES

    texts = list(dict.fromkeys(t.strip() for t in load_prompt_texts(p.source, p.split, p.column) if t and t.strip()))
    np.random.default_rng(p.seed).shuffle(texts)
    sizes = {f"policy_{t}": n for t, n in enumerate(p.policy, start=1)} | {"reward_model": p.reward_model}
    missing = set(sizes) - set(names)
    if missing:
        raise ValueError(f"split names {sorted(missing)} are not among the generated splits {list(names)}")
    if sum(sizes.values()) > len(texts):
        raise ValueError(f"prompts.source={p.source!r} has {len(texts)} distinct prompts; the splits need "
                         f"{sum(sizes.values())} ({sizes})")
    out, start = {}, 0
    for name, n in sizes.items():
        rows = [{"prompt_id": hashlib.sha256(t.encode()).hexdigest()[:16], "prompt": t, "task_id": "external",
                 "task_category": "external", "instruction_id_list": [], "kwargs": []}
                for t in texts[start:start + n]]
        out[name] = datasets.Dataset.from_list(rows, features=PROMPT_FEATURES)
        start += n
    return out


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


def _metrics_row(phase: str, row: Mapping[str, Any]) -> dict:
    """A metrics.jsonl line: the iteration (0 for base_rm and iter_0) and phase come first."""
    iteration = int(phase.split("/")[0].removeprefix("iter_")) if phase.startswith("iter_") else 0
    return {"iteration": iteration, "phase": phase, **row}


def _length_summary(pairs: PairSet) -> dict[str, float]:
    if not len(pairs):
        return {}
    chosen = np.asarray([len(c) for c in pairs.chosen])
    rejected = np.asarray([len(r) for r in pairs.rejected])
    return {"chosen_len_mean": float(chosen.mean()), "chosen_len_p95": float(np.percentile(chosen, 95)),
            "rejected_len_mean": float(rejected.mean()), "rejected_len_p95": float(np.percentile(rejected, 95))}


_HELDOUT_KEYS = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose",
                 "gold_reward_loose")
_LENGTH_KEYS = ("length_mean_tokens", "length_p95_tokens", "length_mean_words", "length_p95_words",
                "truncated_fraction")


def _group_rows(rows: Sequence[dict], order: Sequence[str]) -> list[list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["prompt_id"], []).append(row)
    return [grouped[pid] for pid in order]


def _prefixed(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}_{k}": v for k, v in values.items() if isinstance(v, (int, float))}


def _safe_accuracy(fn, score_fn, prompts, texts, **kwargs: Any) -> dict[str, Any]:
    try:
        return fn(score_fn, prompts, texts, **kwargs)
    except ValueError as e:  # every sample tied under the gold reward: no pair to judge
        return {"unavailable": 1, "reason_all_tied": 1 if "tie" in str(e) else 0}


def _say(message: str) -> None:
    print(f"mtjax: {message}", flush=True)


def _quiet(message: str) -> None:
    del message
