"""Mid-phase train-state checkpoints: a crash, Ctrl-C, SIGTERM or preemption inside a long DPO or
reward-model phase loses at most the steps since the last save, and the rerun continues exactly where
the saved state left off.

The run directory's resume is phase-granular (see `mtjax.rundir`); at the paper's scale one training
phase runs for hours, so the loop in `mtjax.em` also saves its whole `TrainState` (step, params,
optimizer state) through Orbax's `CheckpointManager`, whose save-decision policies decide when: every
`checkpoint.train_every_steps` steps (`FixedIntervalPolicy`), at most every
`checkpoint.train_every_seconds` seconds (`ContinuousCheckpointingPolicy`: its first save comes at the
first step, its decision is process 0's in a multi-process run) and at a preemption sync point
(`PreemptionCheckpointingPolicy`: after SIGTERM on any host, every process saves at the same step, see
`mtjax.interrupts`). A single-process run also saves once more on Ctrl-C or SIGTERM. The per-step metrics
saved beside the state make the phase's summary of a resumed run equal to an uninterrupted one's. The
batch order is a function of the phase's seed and the epoch, so skipping the first `step` batches
replays nothing and misses nothing.

The saved state also records the training settings it was trained with (the config section): a rerun
with other settings starts the phase's training afresh, except after a change of the learning rate (the
way out of a divergence, `mtjax.divergence`) or of how steps are executed (`RESUMABLE_CHANGES`), which
resumes from the last good state. A damaged
saved state is reported and the training starts afresh.

Layout, inside the phase's folder (`PHASE/train_state`): Orbax step folders `STEP/state` and
`STEP/meta` (history and settings), the latest kept. The folder is removed once the phase is recorded
done (`MutualTaught.phase`).

Rows logged to `metrics.jsonl` after the last save are logged again by the rerun, tagged with the same
step; a reader wanting one row per step keeps the last.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from mtjax.distributed import barrier, is_primary
from mtjax.divergence import DivergenceError, DivergenceGuard
from mtjax.interrupts import Interrupted, announce_save, preemption_reached, signal_name
from mtjax.rundir import RunDir, RunDirError, first_line

# Settings whose change still resumes a saved train state: the learning rate (lowered after a divergence) and
# how a step is executed rather than what it computes (micro-batches accumulate exactly; logits chunking).
RESUMABLE_CHANGES = ("learning_rate", "num_micro_batches", "logits_chunk")


def host_metrics(metrics: Any) -> dict[str, float]:
    """A train step's metrics as one row of Python floats (blocks until the step has run)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


class _PhaseCheckpointManager(ocp.CheckpointManager):
    """Orbax's manager, told of preemption by the run's own sync point (`mtjax.interrupts`): the run calls
    it at sampling pieces and phase starts too, with one counter that every process advances alike."""

    preempted = False

    def reached_preemption(self, step: int) -> bool:
        del step
        return self.preempted


@dataclasses.dataclass
class TrainCheckpoint:
    """Saves and restores one training phase's state in `run_dir / folder`."""

    run_dir: RunDir
    folder: str  # e.g. "iter_1/e_step/train_state"
    every_steps: int = 0  # 0: no step-count trigger
    every_seconds: float = 600.0  # 0: no time trigger
    guard: DivergenceGuard | None = None  # names the phase and the setting to change when training diverges
    settings: Mapping[str, Any] | None = None  # the training settings (config section) the state is trained with
    _manager: _PhaseCheckpointManager | None = dataclasses.field(default=None, init=False, repr=False)
    saved_step: int = dataclasses.field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.every_seconds < 0:
            raise ValueError(f"every_steps and every_seconds must be >= 0 (0 = off), got "
                             f"{self.every_steps} and {self.every_seconds}")

    @property
    def directory(self):
        return self.run_dir.file(self.folder).absolute()

    def _open(self) -> _PhaseCheckpointManager:
        if self._manager is None:
            policies = [checkpoint_managers.PreemptionCheckpointingPolicy()]
            if self.every_steps:
                policies.append(checkpoint_managers.FixedIntervalPolicy(self.every_steps))
            if self.every_seconds:
                policies.append(checkpoint_managers.ContinuousCheckpointingPolicy(
                    minimum_interval_secs=self.every_seconds))
            options = ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, enable_async_checkpointing=False,
                save_decision_policy=checkpoint_managers.AnySavePolicy(policies))
            self._manager = _PhaseCheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        return self._manager

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def latest_step(self) -> int | None:
        """The step of the saved state, None if there is none."""
        return self._open().latest_step() if self.directory.is_dir() else None

    def restore(self, fresh_state: Any) -> tuple[Any, list[dict]] | None:
        """(state, metrics history) of the last save, placed like `fresh_state`; None if nothing usable was
        saved (nothing, a damaged save, or a save trained with other settings: then it is removed)."""
        step = self.latest_step()
        if step is None:
            return None
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), fresh_state)
        try:
            saved = self._open().restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like),
                                                                       meta=ocp.args.JsonRestore()))
            state, meta = saved["state"], dict(saved["meta"])
            history = list(meta["history"])
            if int(jax.device_get(state.step)) != step or len(history) < step:
                raise ValueError(f"state at step {int(jax.device_get(state.step))}, {len(history)} metrics rows")
        except Exception as e:  # a damaged or foreign save: redo the training rather than fail forever
            return self._discard(f"is damaged ({first_line(e)})")
        changed = {k for k in set(meta.get("settings", {})) | set(self.settings or {})
                   if meta.get("settings", {}).get(k) != (self.settings or {}).get(k)}
        if self.settings is not None and changed - set(RESUMABLE_CHANGES):
            return self._discard(f"was trained with other settings ({', '.join(sorted(changed))} changed)")
        if changed and is_primary():
            print(f"mtjax: {self.folder}: resuming with "
                  + ", ".join(f"{k} {meta['settings'].get(k)} -> {self.settings.get(k)}" for k in sorted(changed)),
                  flush=True)
        self.saved_step = step
        return state, history[:step]

    def _discard(self, why: str) -> None:
        if is_primary():
            print(f"mtjax: the saved train state in {self.directory} {why}; training this phase from its start",
                  file=sys.stderr, flush=True)
        self.clear()
        return None

    def after_step(self, state: Any, history: Sequence[dict], total: int) -> None:
        """After optimizer step `len(history)`: saves when a policy says so (not after the last step: the phase
        saves its result next), and at a preemption sync point saves and raises `Interrupted`."""
        manager, step = self._open(), len(history)
        manager.preempted = preemption_reached()
        if (step < total or manager.preempted) and manager.should_save(step):
            self.save(state, history)
        if manager.preempted:
            raise Interrupted("preemption", saved=self.describe(step))

    def save(self, state: Any, history: Sequence[dict]) -> None:
        step = len(history)
        if step in (0, self.saved_step):
            return
        meta = {"history": list(history), "settings": dict(self.settings or {})}
        try:
            self._open().save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave(meta)), force=True)
            self._manager.wait_until_finished()
        except Exception as e:
            raise RunDirError(f"cannot write the train state to {self.directory}: {first_line(e)}") from None
        self.saved_step = step

    def describe(self, step: int) -> str:
        return f"the train state at step {step} in {self.directory}"

    def save_on_interrupt(self, error: KeyboardInterrupt, state: Any, history: list[dict], pending_metrics: Any,
                          log: Callable[[dict], None], total: int) -> Interrupted:
        """After Ctrl-C or SIGTERM: saves the newest consistent (state, history) that passes the divergence
        guard; returns the `Interrupted` to raise, saying what is saved. In a multi-process run nothing is saved
        here (a collective write would hang: only this process was interrupted; preemption saves go through
        `after_step`)."""
        name = signal_name(error)
        earlier = Interrupted(name, saved=self.describe(self.saved_step) if self.saved_step else None)
        if jax.process_count() > 1:
            return earlier
        try:
            step = int(jax.device_get(state.step))
        except RuntimeError:  # the state was donated to a step that never returned: keep the last save
            return earlier
        if step == len(history) + 1 and pending_metrics is not None:  # the step ran; its row wasn't logged
            row = host_metrics(pending_metrics)
            try:
                if self.guard is not None:
                    self.guard.check(step, total, row, state.params, self.saved_step)
            except DivergenceError:
                return earlier
            history.append(row)
            log(row)
        if step != len(history) or step in (0, self.saved_step):
            return earlier
        announce_save(error, self.describe(step))
        try:
            self.save(state, history)
        except BaseException:
            print(file=sys.stderr)  # end the announced line: the error gets its own
            raise
        return Interrupted(name, saved=self.describe(step), announced=True)

    def clear(self) -> None:
        self.close()
        if is_primary():
            shutil.rmtree(self.directory, ignore_errors=True)
        barrier(f"mtjax-clear:{self.folder}")
        self.saved_step = 0
