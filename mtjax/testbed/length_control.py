"""AlpacaEval's length-controlled win rate (Dubois et al., 2024, "Length-Controlled AlpacaEval").

A judge (here a reward model) that prefers longer answers rewards verbosity; DPO policies grow long.
The length-controlled (LC) win rate fits a logistic GLM of the judge's preference for the model over the
baseline on the standardised length difference (through ``tanh``), a model bias term and, optionally,
each instruction's difficulty, then predicts the preference with the length difference set to zero:

    p(model > baseline | x) = sigmoid(theta + phi * tanh(dlen / std(dlen)) + psi * difficulty_x)
    LC win rate = 100 * mean_x sigmoid(theta + psi * difficulty_x)

This mirrors ``alpaca_eval.metrics.glm_winrate`` (formula ``length_controlled_minimal``, or
``length_controlled_noreg`` when difficulties are given). We do not use that package: it needs
``df_gamed.csv``/``instruction_difficulty.csv`` from the hub and pulls in openai, tiktoken,
scikit-learn and patsy. AlpacaEval picks an L1 strength by 5-fold CV; we fit a weakly L2-regularised
model (sklearn's ``C``; their fallback uses C=100), which agrees with their fit to within a few
hundredths of a point (tests/test_evaluate_length_control.py). Their ``length_controlled_v1``
additionally regularises towards two "gamed" baselines from ``df_gamed.csv``; that needs hub data and
is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def fit_soft_logistic_regression(
    features: np.ndarray,
    targets: np.ndarray,
    c: float = 100.0,
    sample_weight: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> np.ndarray:
    """Newton's method for logistic regression with probabilities as targets and no intercept.

    Minimises ``0.5 * |w|^2 + c * sum_i s_i * CE(targets_i, sigmoid(features_i @ w))`` (sklearn's scaling).
    """
    x = np.asarray(features, dtype=np.float64)
    p = np.asarray(targets, dtype=np.float64)
    if x.ndim != 2 or p.shape != (x.shape[0],):
        raise ValueError(f"features must be [n, d] and targets [n]; got {x.shape} and {p.shape}")
    if np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(p)):
        raise ValueError("targets must be probabilities in [0, 1]")
    s = np.ones_like(p) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(max_iter):
        q = _sigmoid(x @ w)
        gradient = w + c * x.T @ (s * (q - p))
        hessian = np.eye(x.shape[1]) + c * (x.T * (s * q * (1 - q))) @ x
        step = np.linalg.solve(hessian, gradient)
        w = w - step
        if np.max(np.abs(step)) < tol:
            break
    return w


@dataclass(frozen=True)
class LengthControlledWinRate:
    win_rate: float  # 100 * mean preference
    length_controlled_win_rate: float
    length_coefficient: float  # phi: > 0 means the judge prefers the longer answer
    model_bias: float  # theta
    difficulty_coefficient: float | None  # psi, when difficulties were given


def length_controlled_win_rate(
    preferences: Sequence[float] | np.ndarray,
    model_lengths: Sequence[int] | np.ndarray,
    baseline_lengths: Sequence[int] | np.ndarray,
    instruction_difficulty: Sequence[float] | np.ndarray | None = None,
    c: float = 100.0,
) -> LengthControlledWinRate:
    """LC win rate from per-instruction preferences for the model (in [0, 1]; 0.5 = tie).

    Lengths are in characters, as in AlpacaEval. ``instruction_difficulty`` (AlpacaEval's
    ``instruction_difficulty.csv``, aligned with the instructions) is optional.
    """
    p = np.asarray(preferences, dtype=np.float64)
    model_len = np.asarray(model_lengths, dtype=np.float64)
    baseline_len = np.asarray(baseline_lengths, dtype=np.float64)
    if p.ndim != 1 or model_len.shape != p.shape or baseline_len.shape != p.shape:
        raise ValueError(
            f"preferences, model and baseline lengths must be 1-D of one size; got {p.shape}, "
            f"{model_len.shape} and {baseline_len.shape}"
        )
    delta = model_len - baseline_len
    if p.size < 2:
        raise ValueError("need at least two instructions for a length-controlled win rate")
    std = delta.std(ddof=1)
    tanh_delta = np.tanh(delta / std) if std > 0 else np.zeros_like(delta)
    columns = [tanh_delta, np.ones_like(p)]
    if instruction_difficulty is not None:
        difficulty = np.asarray(instruction_difficulty, dtype=np.float64)
        if difficulty.shape != p.shape:
            raise ValueError(f"instruction_difficulty has shape {difficulty.shape}, expected {p.shape}")
        columns.append(difficulty)
    w = fit_soft_logistic_regression(np.stack(columns, axis=1), p, c=c)
    at_equal_length = w[1] + (w[2] * columns[2] if instruction_difficulty is not None else 0.0)
    lc = float(np.mean(_sigmoid(np.broadcast_to(at_equal_length, p.shape))))
    return LengthControlledWinRate(
        win_rate=100.0 * float(p.mean()),
        length_controlled_win_rate=100.0 * lc,
        length_coefficient=float(w[0]),
        model_bias=float(w[1]),
        difficulty_coefficient=float(w[2]) if instruction_difficulty is not None else None,
    )
