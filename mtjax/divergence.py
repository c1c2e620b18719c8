"""The divergence guard of the training loop (`mtjax.training_loops._run_steps`): a step that went wrong stops its phase
with one message before anything from it is saved, so a checkpoint never holds NaN or blown-up weights.

A step went wrong when
  - its loss or gradient norm is not finite, or the weights are not finite afterwards; or
  - it changed the norm of all the weights by more than `ABSURD_NORM_FACTOR` (up or down). Adam moves
    every weight by about the learning rate per step, so a healthy step changes the weights by ~1e-3 of
    their norm; a step that changes the norm itself by half replaced the weights by noise of their own
    size: the learning rate is on the scale of the weights (lr = 1e6 leaves finite weights of ~1e6 whose
    rewards and log-probs are meaningless; that is caught at its first step).

The weights before the step are gone (the step donates the train state), so the phase resumes from its
last saved train state, or from its start when none was saved.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ABSURD_NORM_FACTOR = 1.5


class DivergenceError(RuntimeError):
    pass


@jax.jit
def _global_norm(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def global_norm(tree: Any) -> float:
    """The L2 norm of every floating-point leaf together (inf or nan if any leaf is not finite)."""
    return float(_global_norm(tree))


def all_finite(tree: Any) -> bool:
    return math.isfinite(global_norm(tree))


def nonfinite_count(values: Any) -> int:
    return int(np.size(values) - np.count_nonzero(np.isfinite(np.asarray(values, np.float64))))


@dataclasses.dataclass
class DivergenceGuard:
    """Checks every training step of one phase. `setting` is the config value to change when it trips
    (e.g. "dpo.learning_rate") and `value` its current value."""

    phase: str
    setting: str | None = None
    value: Any = None
    _norm: float = dataclasses.field(default=math.nan, init=False)

    def start(self, params: Any) -> None:
        """The weights training starts (or resumes) from."""
        self._norm = global_norm(params)

    def check(self, step: int, total: int, row: dict[str, float], params: Any, resumes_from: int) -> None:
        """After optimizer step `step` (metrics `row`, new weights `params`); `resumes_from` is the step of the
        last saved train state (0: none)."""
        problem = next((f"the {name.replace('_', ' ')} is {row[name]}" for name in ("loss", "grad_norm")
                        if name in row and not math.isfinite(row[name])), None)
        norm = global_norm(params)
        if problem is None and not math.isfinite(norm):
            problem = "the weights are no longer finite"
        elif problem is None and self._norm > 0:
            factor = norm / self._norm
            if not 1 / ABSURD_NORM_FACTOR <= factor <= ABSURD_NORM_FACTOR:
                problem = (f"one step scaled the norm of the weights by {factor:.3g} (a healthy step changes it "
                           f"by well under {ABSURD_NORM_FACTOR}x)")
        self._norm = norm
        if problem is None:
            return
        change = f"Lower {self.setting} (now {self.value})" if self.setting else "Lower the learning rate"
        start = f"its last good state (step {resumes_from})" if resumes_from else "its start"
        raise DivergenceError(f"{self.phase}: training diverged at step {step} of {total}: {problem}. Nothing from "
                              f"this step was saved. {change} and rerun the same command: the phase "
                              f"resumes from {start}.")
