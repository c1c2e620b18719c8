"""AlpacaEval's length-controlled win rate against golden numbers from AlpacaEval's own code.

The golden values come from ``alpaca_eval`` 0.6.6 (``metrics/glm_winrate.py``: ``make_dmatrix_for_model``
and ``fit_LogisticRegressionCV`` with ``is_ytrue_proba=True, n_splits=5``, i.e. L1 logistic regression
with 5-fold CV over C, scikit-learn 1.9.1, patsy 1.0.3) on the synthetic data below, with the formulas
``length_controlled_minimal`` and ``length_controlled_noreg``. AlpacaEval's delta is baseline minus model
length, so its length coefficient has the opposite sign of ours.
"""

from __future__ import annotations

import numpy as np
import pytest

from mtjax.testbed.length_control import fit_soft_logistic_regression, length_controlled_win_rate

GOLDEN = {  # name: (seed, with_difficulty, AlpacaEval LC win rate, raw win rate, AlpacaEval tanh coefficient)
    "minimal_seed0": (0, False, 58.422350837405205, 52.57165919221845, -1.329099171389782),
    "minimal_seed1": (1, False, 59.65782651391807, 54.62908920929349, -1.3902077691432948),
    "noreg_seed2": (2, True, 58.76202840396949, 52.97664830180781, -1.3375222621380525),
}


def synthetic_judgements(seed: int, with_difficulty: bool, n: int = 805):
    rng = np.random.default_rng(seed)
    len_base = rng.lognormal(7.3, 0.5, n).round()
    len_model = rng.lognormal(7.0, 0.7, n).round()
    difficulty = rng.normal(0, 1, n)
    delta = len_model - len_base
    logit = 0.4 + 1.5 * np.tanh(delta / delta.std(ddof=1)) + rng.normal(0, 0.8, n)
    if with_difficulty:
        logit = logit - 0.7 * difficulty
    return len_base, len_model, difficulty, 1 / (1 + np.exp(-logit))


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_matches_alpaca_eval_reference_fit(name: str) -> None:
    seed, with_difficulty, golden_lc, golden_raw, golden_phi = GOLDEN[name]
    len_base, len_model, difficulty, preference = synthetic_judgements(seed, with_difficulty)
    result = length_controlled_win_rate(
        preference, len_model, len_base, difficulty if with_difficulty else None
    )
    assert result.win_rate == pytest.approx(golden_raw, abs=1e-9)
    assert result.length_controlled_win_rate == pytest.approx(golden_lc, abs=0.05)
    assert result.length_coefficient == pytest.approx(-golden_phi, abs=0.01)


def test_pure_length_judge_is_neutralised() -> None:
    rng = np.random.default_rng(0)
    len_base = rng.integers(200, 2000, 805)
    len_model = len_base + rng.integers(-300, 900, 805)  # the model is usually longer
    preference = (len_model > len_base).astype(float)  # a judge that only likes length
    result = length_controlled_win_rate(preference, len_model, len_base)
    assert result.win_rate > 75
    assert abs(result.length_controlled_win_rate - 50) < abs(result.win_rate - 50) / 2
    assert result.length_coefficient > 0


def test_logistic_fit_recovers_known_weights() -> None:
    rng = np.random.default_rng(1)
    x = np.stack([rng.normal(size=20000), np.ones(20000)], axis=1)
    p = 1 / (1 + np.exp(-(x @ np.array([1.5, -0.5]))))
    w = fit_soft_logistic_regression(x, p, c=1e6)
    np.testing.assert_allclose(w, [1.5, -0.5], atol=1e-3)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same size|one size"):
        length_controlled_win_rate([0.5, 0.5], [1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="probabilities"):
        fit_soft_logistic_regression(np.ones((2, 1)), np.array([0.5, 1.5]))
