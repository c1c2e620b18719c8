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

The loop lives here (`MutualTaught`: start-up, the run directory, `phase()`, `run()`); its parts are modules of
their own: the inputs (`mtjax.run_inputs`), the stored samples (`mtjax.stored_samples`), the phase bodies
(`mtjax.em_phases`), evaluation and parameter access (`mtjax.run_evaluation`), the pairs (`mtjax.pairs`), the
training loops (`mtjax.training_loops`), the models (`mtjax.run_models`); paths, phase names and seed names come
from `mtjax.layout`. The names other code uses are importable from here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

from ml_collections import ConfigDict

from mtjax import layout, settings, tracking
from mtjax.device_memory import explain, is_out_of_memory
from mtjax.distributed import is_primary, primary_print
from mtjax.divergence import DivergenceGuard
from mtjax.em_phases import PhaseBodies
from mtjax.interrupts import stop_if_preempted
from mtjax.pairs import PairSet, contrastive_pairs, length_controlled_pairs, oriented_pairs, pairable, policy_pairs
from mtjax.phases import depends_on, independent_of, training_section
from mtjax.run_evaluation import Evaluation
from mtjax.run_inputs import RunInputs
from mtjax.run_models import Models, describe_models, load_models
from mtjax.rundir import RunDir
from mtjax.stored_samples import Sample, StoredSamples, response_text, sample_responses
from mtjax.train_checkpoint import TrainCheckpoint
from mtjax.training_loops import train_dpo, train_reward_model, train_sft

# The names other code and the tests import from here (they live in the modules above).
__all__ = ["SHARED_PHASES", "Models", "MutualTaught", "PairSet", "Sample", "contrastive_pairs", "describe_models",
           "length_controlled_pairs", "load_models", "oriented_pairs", "pairable", "policy_pairs",
           "response_text", "sample_responses", "share_base_phases", "share_phases", "train_dpo",
           "train_reward_model", "train_sft", "validate_config"]

validate_config = settings.validate_config  # the entry point's name for it


def check_batches_fit_mesh(cfg: ConfigDict, mesh) -> None:
    """Raises ValueError naming every training section the run uses whose batch does not split into its
    micro-batches over `mesh` (`sharding.micro_batch_problems`)."""
    from mtjax.sharding import micro_batch_problems

    trained = [name for name in settings.used_sections(cfg) if name in settings.TRAINING_SECTIONS]
    misfits = micro_batch_problems({n: (cfg[n].batch_size, cfg[n].num_micro_batches) for n in trained}, mesh)
    if misfits:
        raise ValueError("; ".join(misfits))


class MutualTaught(RunInputs, StoredSamples, PhaseBodies, Evaluation):
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
        self.mesh = make_mesh(**dataclasses.asdict(settings.build(settings.MeshConfig, cfg.mesh)))
        if read_only:  # a finished run is read on any number of devices: no batch check
            self.rd = RunDir.open_read_only(workdir)
        else:
            check_batches_fit_mesh(cfg, self.mesh)
            if is_primary():
                for spec in self.specs.values():
                    print(f"mtjax: {spec.setting} {spec.source.source}: stop ids {spec.stop_origins}", flush=True)
            # a new run's prompts are read and measured before its directory is written
            built = None if RunDir.has_completed(workdir, layout.PROMPTS) else self._build_prompt_splits(self.specs)
            self.rd = RunDir(workdir, cfg.to_dict(), allow_config_change)
            self._reconcile_run_directory()
            self.tracker = tracking.MetricsWriter(self.rd, settings.build(tracking.TrackingConfig, cfg.logging),
                                                  run_config=cfg.to_dict())
        self.models = load_models(self.specs, cfg.seed, self.mesh)
        self.splits = {} if read_only else self._prompt_splits(built)
        self._prompt_ids: dict[str, list[list[int]]] = {}
        if self.sft.enabled and self.rd.done(layout.SFT):
            self._start_from(self.rd.load_params(layout.SFT_POLICY, like=self.models.policy_params))

    def _reconcile_run_directory(self) -> None:
        """Makes the run directory agree with this run: an unfinished phase drops what it made with settings
        that have changed since, and a phase whose recorded artifact is missing or damaged is redone."""
        changes = self.rd.accepted_changes
        if changes:
            _say(f"{self.rd.path}: config changes accepted (no finished phase used them): "
                 f"{'; '.join(map(str, changes))}")
        for phase in self.rd.in_flight():
            touched = {c.section for c in changes if not c.within(independent_of(phase))}
            if touched - {training_section(phase)}:  # a change of its training settings alone keeps its samples
                _say(f"{phase} started with the former {', '.join(sorted(touched))} settings; starting it again")
                self.rd.discard_in_flight(phase)
                self.train_checkpoint(phase).clear()
        gated = self.cfg.mt.gate_win_rate is not None
        for message in self.rd.repair(lambda later, earlier: depends_on(later, earlier, gated)):
            _say(message)

    @property
    def iterations(self) -> range:
        return self.mt.iterations(self.cfg.iterations)

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


def _metrics_row(phase: str, row: Mapping[str, Any]) -> dict:
    """A metrics.jsonl line: the iteration (0 for base_rm and iter_0) and phase come first."""
    return {"iteration": layout.iteration_of(phase), "phase": phase, **row}


def _eval_config_class():
    from mtjax.iteration_eval import EvalConfig

    return EvalConfig


def _say(message: str) -> None:
    """One line of the run's own (not a progress bar's), on process 0 only."""
    primary_print(f"mtjax: {message}")
