"""Mid-phase train-state checkpoints: a crash or Ctrl-C inside a long DPO or reward-model phase loses
at most the steps since the last save, and the rerun continues exactly where the saved state left off.

The run directory's resume is phase-granular (see `mtjax.rundir`); at the paper's scale one training
phase runs for hours, so the loop in `mtjax.em` also saves its whole `TrainState` (step, params,
optimizer state) every `every_steps` optimizer steps and/or every `every_seconds` seconds (the config's
`checkpoint.train_every_steps` / `checkpoint.train_every_seconds`), and, in a
single-process run, once more on Ctrl-C. The per-step metrics saved beside the state make the
phase's summary of a resumed run equal to an uninterrupted one's. The batch order is a function of
the phase's seed and the epoch, so skipping the first `step` batches replays nothing and misses nothing.

Layout, inside the phase's folder (`PHASE/train_state`): `state/` (Orbax) and `history.json`
(one metrics row per step, written before the state: the rows beyond the state's step are dropped
on restore). The folder is removed once the phase is recorded done (`MutualTaught.phase`).

Rows logged to `metrics.jsonl` after the last save are logged again by the rerun, tagged with the same
step; a reader wanting one row per step keeps the last.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mtjax.distributed import barrier, is_primary
from mtjax.rundir import RunDir


def host_metrics(metrics: Any) -> dict[str, float]:
    """A train step's metrics as one row of Python floats (blocks until the step has run)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _all_agree(flag: bool) -> bool:
    """Process 0's decision, the same on every process (a save is a collective write)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


@dataclasses.dataclass
class TrainCheckpoint:
    """Saves and restores one training phase's state in `run_dir / folder`."""

    run_dir: RunDir
    folder: str  # e.g. "iter_1/e_step/train_state"
    every_steps: int = 0  # 0: no step-count trigger
    every_seconds: float = 600.0  # 0: no time trigger
    _last_save: float = dataclasses.field(default_factory=time.monotonic, init=False)
    _saved_step: int = dataclasses.field(default=-1, init=False)

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.every_seconds < 0:
            raise ValueError(f"every_steps and every_seconds must be >= 0 (0 = off), got "
                             f"{self.every_steps} and {self.every_seconds}")

    @property
    def _state_path(self) -> str:
        return f"{self.folder}/state"

    @property
    def _history_path(self) -> str:
        return f"{self.folder}/history.json"

    def exists(self) -> bool:
        return self.run_dir.file(self._state_path).is_dir() and self.run_dir.file(self._history_path).is_file()

    def restore(self, fresh_state: Any) -> tuple[Any, list[dict]] | None:
        """(state, metrics history) of the last save, placed like `fresh_state`; None if nothing saved."""
        if not self.exists():
            return None
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), fresh_state)
        state = self.run_dir.load_params(self._state_path, like=like)
        step = int(jax.device_get(state.step))
        history = self.run_dir.read_json(self._history_path)
        if len(history) < step:
            raise RuntimeError(f"{self.run_dir.file(self.folder)}: the saved state is at step {step} but only "
                               f"{len(history)} metrics rows were saved; delete the folder to redo the phase")
        self._saved_step, self._last_save = step, time.monotonic()
        return state, history[:step]

    def due(self, step: int) -> bool:
        """Whether to save after optimizer step `step` (the same answer on every process)."""
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        by_time = self.every_seconds > 0 and time.monotonic() - self._last_save >= self.every_seconds
        return _all_agree(by_steps or by_time)

    def save(self, state: Any, history: Sequence[dict]) -> None:
        step = len(history)
        if step in (0, self._saved_step):
            return
        self.run_dir.write_json(self._history_path, list(history))
        self.run_dir.save_params(self._state_path, state)
        self._saved_step, self._last_save = step, time.monotonic()

    def save_on_interrupt(self, state: Any, history: list[dict], pending_metrics: Any,
                          log: Any) -> None:
        """After Ctrl-C: saves the newest consistent (state, history). In a multi-process run only the
        interrupted process is here, so nothing is saved (a collective write would hang); the periodic
        saves stand."""
        if jax.process_count() > 1:
            return
        try:
            step = int(jax.device_get(state.step))
        except RuntimeError:  # the state was donated to a step that never returned: keep the last save
            return
        if step == len(history) + 1 and pending_metrics is not None:  # the step ran; its row wasn't logged
            row = host_metrics(pending_metrics)
            history.append(row)
            log(row)
        if step != len(history):
            return
        print(f"mtjax: interrupted; saving the train state at step {step} to "
              f"{self.run_dir.file(self.folder)} (Ctrl-C again abandons it)", file=sys.stderr)
        self.save(state, history)

    def clear(self) -> None:
        if is_primary():
            shutil.rmtree(self.run_dir.file(self.folder), ignore_errors=True)
        barrier(f"mtjax-clear:{self.folder}")
