"""Checks mtjax.losses against the paper formulas and against TRL's definitions written in PyTorch.

The PyTorch versions below transcribe TRL (DPOTrainer.dpo_loss, CPOTrainer simpo, RewardTrainer) so the
values and gradients are compared against an independent implementation, not against ourselves.
"""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import losses

torch = pytest.importorskip("torch")
F = torch.nn.functional

BATCH = 16


def _random_logps(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(-40.0, 6.0, size=BATCH).astype(np.float32) for _ in range(4)]


# --- TRL definitions (PyTorch) -------------------------------------------------------------------


def trl_dpo_family(pc, pr, rc, rr, beta, loss_type, label_smoothing=0.0):
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * (
            label_smoothing
        )
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    raise ValueError(loss_type)


def trl_simpo(pc, pr, beta, gamma, label_smoothing=0.0):
    logits = (pc - pr) - gamma / beta
    smoothed = F.logsigmoid(-beta * logits) * label_smoothing
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - smoothed


def trl_bradley_terry(rc, rr, margin=None):
    return -F.logsigmoid(rc - rr - (0 if margin is None else margin))


def sppo_authors(pc, pr, rc, rr, win_prob_chosen, win_prob_rejected, beta):
    """The SPPO authors' trainer (uclaml/SPPO, `dpo_loss`, `loss_type == "sppo"`), transcribed."""
    logits_w, logits_l = pc - rc, pr - rr
    loss_w = (logits_w - (1 / beta) * (win_prob_chosen - 0.5)) ** 2
    loss_l = (logits_l - (1 / beta) * (win_prob_rejected - 0.5)) ** 2
    return (loss_w + loss_l) / 2


def _torch_value_and_grads(fn, arrays):
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    out.sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


def _jax_value_and_grads(fn, arrays):
    value = fn(*arrays)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(arrays))))(*arrays)
    return np.asarray(value), [np.asarray(g) for g in grads]


def _assert_matches_trl(jax_fn, torch_fn, arrays):
    value, grads = _jax_value_and_grads(jax_fn, [jnp.asarray(a) for a in arrays])
    ref_value, ref_grads = _torch_value_and_grads(torch_fn, arrays)
    assert value.shape == (BATCH,) and value.dtype == np.float32
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


# --- DPO family ----------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_loss_matches_trl_and_paper(beta, label_smoothing):
    arrays = _random_logps(0)
    _assert_matches_trl(
        lambda *a: losses.dpo_loss(*a, beta=beta, label_smoothing=label_smoothing),
        lambda *a: trl_dpo_family(*a, beta=beta, loss_type="sigmoid", label_smoothing=label_smoothing),
        arrays,
    )
    pc, pr, rc, rr = (a.astype(np.float64) for a in arrays)
    z = beta * ((pc - rc) - (pr - rr))
    log_sigmoid = lambda v: -np.logaddexp(0.0, -v)
    paper = -(1 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z)
    np.testing.assert_allclose(losses.dpo_loss(*arrays, beta, label_smoothing), paper, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_ipo_loss_matches_trl_and_paper(beta):
    arrays = _random_logps(1)
    _assert_matches_trl(
        lambda *a: losses.ipo_loss(*a, beta=beta), lambda *a: trl_dpo_family(*a, beta, "ipo"), arrays
    )
    pc, pr, rc, rr = (a.astype(np.float64) for a in arrays)
    paper = ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2
    np.testing.assert_allclose(losses.ipo_loss(*arrays, beta), paper, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_hinge_loss_matches_trl_and_paper(beta):
    arrays = _random_logps(2)
    _assert_matches_trl(
        lambda *a: losses.hinge_loss(*a, beta=beta), lambda *a: trl_dpo_family(*a, beta, "hinge"), arrays
    )
    pc, pr, rc, rr = (a.astype(np.float64) for a in arrays)
    paper = np.maximum(0.0, 1 - beta * ((pc - rc) - (pr - rr)))
    np.testing.assert_allclose(losses.hinge_loss(*arrays, beta), paper, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("beta", "gamma", "label_smoothing"), [(2.0, 0.5, 0.0), (2.5, 1.4, 0.1)])
def test_simpo_loss_matches_trl_and_paper(beta, gamma, label_smoothing):
    rng = np.random.default_rng(3)
    arrays = [rng.normal(-1.5, 0.5, size=BATCH).astype(np.float32) for _ in range(2)]
    _assert_matches_trl(
        lambda *a: losses.simpo_loss(*a, beta=beta, gamma=gamma, label_smoothing=label_smoothing),
        lambda *a: trl_simpo(*a, beta=beta, gamma=gamma, label_smoothing=label_smoothing),
        arrays,
    )
    if label_smoothing == 0.0:
        chosen, rejected = (a.astype(np.float64) for a in arrays)
        paper = np.logaddexp(0.0, -(beta * chosen - beta * rejected - gamma))
        np.testing.assert_allclose(losses.simpo_loss(*arrays, beta, gamma), paper, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.001, 0.1])
def test_sppo_loss_matches_the_authors_code_and_paper(beta):
    rng = np.random.default_rng(5)
    probs = [rng.uniform(0.05, 0.95, BATCH).astype(np.float32) for _ in range(2)]
    arrays = _random_logps(5)
    arrays = [arrays[0], arrays[1], arrays[0] + rng.normal(0, 2, BATCH).astype(np.float32),
              arrays[1] + rng.normal(0, 2, BATCH).astype(np.float32)]  # log-ratios of a few nats, as in training
    _assert_matches_trl(lambda *a: losses.sppo_loss(*a, *[jnp.asarray(p) for p in probs], beta=beta),
                        lambda *a: sppo_authors(*a, *[torch.tensor(p, dtype=torch.float64) for p in probs], beta),
                        arrays)
    # Its minimum: each log-ratio equals its own scaled advantage (P - 1/2)/β, whatever the other response does.
    pc, pr = (np.float32(-30.0),) * 2
    optimum = losses.sppo_loss(pc + (0.8 - 0.5) / beta, pr + (0.3 - 0.5) / beta, pc, pr, 0.8, 0.3, beta)
    assert float(optimum) == pytest.approx(0.0, abs=1e-3)


def test_sppo_win_probabilities_match_the_authors_estimate():
    """`compute_prob.py` of the SPPO code: prb[i][j] = 1 / (1 + exp(s_j - s_i)), then each row summed over all
    K samples (itself included) and divided by K."""
    scores = np.random.default_rng(6).normal(0, 2, size=(3, 5))
    expected = np.zeros_like(scores)
    for n, score in enumerate(scores):
        prb = np.array([[1 / (1 + np.exp(score[j] - score[i])) for j in range(5)] for i in range(5)])
        expected[n] = prb.sum(axis=1) / 5
    got = np.asarray(losses.sppo_win_probabilities(jnp.asarray(scores, jnp.float32)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.allclose(got.mean(axis=-1), 0.5)  # the policy against itself: even on average


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl_and_paper(with_margin):
    rng = np.random.default_rng(4)
    arrays = [rng.normal(0.0, 3.0, size=BATCH).astype(np.float32) for _ in range(3 if with_margin else 2)]
    _assert_matches_trl(losses.bradley_terry_loss, trl_bradley_terry, arrays)
    diff = arrays[0].astype(np.float64) - arrays[1] - (arrays[2] if with_margin else 0.0)
    np.testing.assert_allclose(losses.bradley_terry_loss(*arrays), np.logaddexp(0.0, -diff), rtol=1e-5)


def test_policy_equal_to_reference_gives_log_two():
    pc, pr, _, _ = _random_logps(5)
    np.testing.assert_allclose(losses.dpo_loss(pc, pr, pc, pr, beta=0.1), np.full(BATCH, math.log(2.0)))
    np.testing.assert_allclose(losses.hinge_loss(pc, pr, pc, pr, beta=0.1), np.ones(BATCH))
    np.testing.assert_allclose(losses.ipo_loss(pc, pr, pc, pr, beta=0.1), np.full(BATCH, 25.0))


def test_extreme_margins_stay_finite():
    big = jnp.array([1e4, -1e4], jnp.float32)
    zero = jnp.zeros(2, jnp.float32)
    for value in (losses.dpo_loss(big, zero, zero, zero, 1.0), losses.bradley_terry_loss(big, zero)):
        assert np.all(np.isfinite(value))
    grads = jax.grad(lambda c: losses.dpo_loss(c, zero, zero, zero, 1.0).sum())(big)
    assert np.all(np.isfinite(grads))


def test_bad_hyperparameters_raise():
    pc, pr, rc, rr = _random_logps(6)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        losses.ipo_loss(pc, pr, rc, rr, beta=0.0)


# --- metrics -------------------------------------------------------------------------------------


def test_preference_metrics_match_trl():
    pc, pr, rc, rr = _random_logps(7)
    beta = 0.1
    metrics = losses.preference_metrics(pc, pr, rc, rr, beta)
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    np.testing.assert_allclose(metrics["rewards/chosen"], chosen_rewards, rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/rejected"], rejected_rewards, rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"], chosen_rewards - rejected_rewards, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(metrics["rewards/accuracies"],
                                  (chosen_rewards > rejected_rewards).astype(np.float32))
    np.testing.assert_array_equal(metrics["logps/chosen"], pc)
    np.testing.assert_array_equal(metrics["logps/rejected"], pr)
    reference_free = losses.preference_metrics(pc, pr, None, None, beta)
    np.testing.assert_allclose(reference_free["rewards/chosen"], beta * pc, rtol=1e-6)
    with pytest.raises(ValueError, match="both"):
        losses.preference_metrics(pc, pr, rc, None, beta)


def test_sampled_kl_is_the_k1_estimator_and_converges_to_the_true_kl():
    """k1 = log π_ref(y) − log π(y) over samples of π_ref averages to KL(π_ref‖π) (two categoricals)."""
    rng = np.random.default_rng(0)
    p_ref = rng.dirichlet(np.ones(6))
    p = rng.dirichlet(np.ones(6))
    draws = rng.choice(6, size=200_000, p=p_ref)
    estimate = np.asarray(losses.sampled_kl(np.log(p)[draws], np.log(p_ref)[draws]), np.float64).mean()
    exact = float(np.sum(p_ref * np.log(p_ref / p)))
    assert estimate == pytest.approx(exact, rel=0.02)
    np.testing.assert_array_equal(losses.sampled_kl(jnp.array([-3.0, -1.0]), jnp.array([-2.0, -2.0])), [1.0, -1.0])


def test_completion_token_stats_match_torch():
    """Entropy and greedy accuracy summed over counted tokens, against torch.distributions on the same logits."""
    logits, input_ids, loss_mask = _random_sequences(seed=5)
    logits[0, 2, 4] = -np.inf  # a banned token: 0 · log 0 must count as 0, not NaN
    labels, label_mask = losses.shift_for_next_token(jnp.asarray(input_ids), jnp.asarray(loss_mask))
    labels = np.asarray(labels).copy()
    labels[0, 1] = np.argmax(logits[0, 1])  # at least one correct greedy prediction, counted or not
    stats = losses.completion_token_stats(jnp.asarray(logits), jnp.asarray(labels), label_mask)
    mask = torch.tensor(np.asarray(label_mask))
    entropy = torch.distributions.Categorical(logits=torch.tensor(logits, dtype=torch.float64)).entropy()
    correct = (torch.tensor(logits).argmax(-1) == torch.tensor(labels)).double()
    np.testing.assert_allclose(stats["entropy"], (entropy * mask).sum(-1).numpy(), rtol=1e-5)
    np.testing.assert_array_equal(stats["correct"], (correct * mask).sum(-1).numpy())


def test_reward_model_metrics():
    metrics = losses.reward_model_metrics(jnp.array([1.0, 0.0, 2.0]), jnp.array([0.0, 0.0, 3.0]))
    np.testing.assert_array_equal(metrics["accuracy"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(metrics["margin"], [1.0, 0.0, -1.0])
    np.testing.assert_array_equal(metrics["mean_reward/chosen"], [1.0, 0.0, 2.0])


# --- sequence log-probs ----------------------------------------------------------------------------


def _random_sequences(seed: int, batch: int = 3, time: int = 7, vocab: int = 11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(batch, time, vocab)).astype(np.float32)
    input_ids = rng.integers(0, vocab, size=(batch, time)).astype(np.int32)
    prompt_lengths = [2, 3, 1]
    completion_ends = [7, 5, 6]
    loss_mask = np.zeros((batch, time), np.int32)
    for row, (start, end) in enumerate(zip(prompt_lengths, completion_ends, strict=True)):
        loss_mask[row, start:end] = 1
    return logits, input_ids, loss_mask


def _reference_logprobs(logits, input_ids, loss_mask, average):
    """Loop-by-loop TRL convention: logits[:, :-1] score input_ids[:, 1:], masked by loss_mask[:, 1:]."""
    logits = torch.tensor(logits, dtype=torch.float64)
    labels = torch.tensor(input_ids[:, 1:], dtype=torch.long)
    mask = torch.tensor(loss_mask[:, 1:], dtype=torch.float64)
    token_logps = torch.gather(logits[:, :-1].log_softmax(-1), 2, labels[..., None])[..., 0]
    total = (token_logps * mask).sum(-1)
    if average:
        total = total / mask.sum(-1)
    return total.numpy()


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_matches_shifted_reference(average):
    logits, input_ids, loss_mask = _random_sequences(8)
    labels, label_mask = losses.shift_for_next_token(jnp.asarray(input_ids), jnp.asarray(loss_mask))
    ours = losses.sequence_logprobs(jnp.asarray(logits), labels, label_mask, average=average)
    assert ours.shape == (3,) and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, _reference_logprobs(logits, input_ids, loss_mask, average), rtol=1e-5)


def test_sequence_logprobs_gradient_matches_torch():
    logits, input_ids, loss_mask = _random_sequences(9)
    labels, label_mask = losses.shift_for_next_token(jnp.asarray(input_ids), jnp.asarray(loss_mask))
    grad = jax.grad(lambda lg: losses.sequence_logprobs(lg, labels, label_mask).sum())(jnp.asarray(logits))
    torch_logits = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(loss_mask[:, 1:], dtype=torch.float64)
    token_logps = torch.gather(
        torch_logits[:, :-1].log_softmax(-1), 2, torch.tensor(input_ids[:, 1:], dtype=torch.long)[..., None]
    )[..., 0]
    (token_logps * mask).sum().backward()
    np.testing.assert_allclose(grad, torch_logits.grad.numpy(), rtol=1e-5, atol=1e-6)
    # The last position has no target and prompt positions are masked: no gradient flows there.
    assert np.all(np.asarray(grad)[:, -1] == 0.0)


def test_sequence_logprobs_upcasts_low_precision_logits():
    logits, input_ids, loss_mask = _random_sequences(10)
    labels, label_mask = losses.shift_for_next_token(jnp.asarray(input_ids), jnp.asarray(loss_mask))
    low = losses.sequence_logprobs(jnp.asarray(logits, jnp.bfloat16), labels, label_mask)
    assert low.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(low, _reference_logprobs(rounded, input_ids, loss_mask, False), rtol=1e-5)


def test_masked_labels_may_be_out_of_range():
    logits, input_ids, loss_mask = _random_sequences(11)
    labels, label_mask = losses.shift_for_next_token(jnp.asarray(input_ids), jnp.asarray(loss_mask))
    poisoned = jnp.where(label_mask > 0, labels, -100)
    np.testing.assert_array_equal(
        losses.sequence_logprobs(jnp.asarray(logits), poisoned, label_mask),
        losses.sequence_logprobs(jnp.asarray(logits), labels, label_mask),
    )


def test_all_zero_mask_is_zero_for_sum_and_average():
    logits, input_ids, _ = _random_sequences(12)
    labels, zeros = jnp.asarray(input_ids), jnp.zeros(input_ids.shape, jnp.float32)
    for average in (False, True):
        value, grad = jax.value_and_grad(
            lambda lg, average=average: losses.sequence_logprobs(lg, labels, zeros, average).sum()
        )(jnp.asarray(logits))
        assert float(value) == 0.0
        assert np.all(np.asarray(grad) == 0.0)


def test_shapes_are_validated():
    with pytest.raises(ValueError, match="logits"):
        losses.sequence_logprobs(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="input_ids"):
        losses.shift_for_next_token(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4)))


def test_import_is_light():
    """`import mtjax.losses` must not pull in torch, transformers, flax or the model code."""
    code = (
        "import sys, mtjax.losses;"
        "heavy = [m for m in ('torch', 'transformers', 'flax', 'mtjax.models') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
