"""Preference losses on arrays: the DPO family (DPO, IPO, hinge, SimPO) and Bradley-Terry.

Sits between the model forward pass and the optimizer: `train.py` turns logits into per-sequence
log-probabilities with `sequence_logprobs` and feeds them to one of the losses here. Every function is
pure, works on plain arrays, returns per-example values of shape `[batch]` (the caller reduces), and
computes in float32. This module imports only jax and numpy, so `from mtjax import losses` is cheap.

Token alignment convention (one rule, used everywhere): `logits[:, t]` scores `labels[:, t]`. Build
aligned labels from a token sequence with `shift_for_next_token`, which moves the targets and the
completion mask one position left, so the logits array is never sliced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "shift_for_next_token",
    "sequence_logprobs",
    "dpo_loss",
    "ipo_loss",
    "hinge_loss",
    "simpo_loss",
    "bradley_terry_loss",
    "preference_metrics",
    "sampled_kl",
    "completion_token_stats",
    "reward_model_metrics",
]

Array = jax.Array


def shift_for_next_token(input_ids: Array, loss_mask: Array) -> tuple[Array, Array]:
    """Aligns next-token targets with the logits of a causal LM.

    The logit at position t predicts token t + 1, so the target for position t is `input_ids[:, t+1]`
    and it counts iff `loss_mask[:, t+1]` is set (a completion token, EOS included). The last position
    has no target: label 0, mask 0. Shapes stay `[B, T]`, so `logits` need no slicing.

    Args:
      input_ids: `[B, T]` integer token ids.
      loss_mask: `[B, T]`, 1 on the completion tokens (EOS included), 0 on prompt and padding.

    Returns:
      `(labels, label_mask)`, both `[B, T]`; `label_mask` is float32.
    """
    if input_ids.shape != loss_mask.shape or input_ids.ndim != 2:
        raise ValueError(
            f"input_ids and loss_mask must both be [batch, time]; got {input_ids.shape} and {loss_mask.shape}"
        )
    labels = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    label_mask = jnp.pad(loss_mask[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    return labels, label_mask


def sequence_logprobs(logits: Array, labels: Array, loss_mask: Array, average: bool = False) -> Array:
    """Log-probability of each sequence's completion tokens.

        logp(y|x) = sum_t m_t * log softmax(logits_t)[labels_t]          (average=False, DPO)
        logp(y|x) = sum_t m_t * log softmax(...)[labels_t] / sum_t m_t   (average=True, SimPO)

    Computed as `logits[label] - logsumexp(logits)` in float32, which is log-softmax followed by a
    gather without materialising a second `[B, T, V]` array or any one-hot. Labels under a zero mask may
    hold anything (pad ids, -100): they are replaced by 0 before the gather and their terms are zeroed
    with `where`, so they can never inject NaN.

    Edge case: a row with an all-zero mask gives 0.0 for both the sum and the average (the average
    divides by max(count, 1)); it contributes no gradient.

    Args:
      logits: `[B, T, V]`, any float dtype (upcast to float32).
      labels: `[B, T]` integer targets aligned with `logits` (see `shift_for_next_token`).
      loss_mask: `[B, T]`, 1 where the target counts.
      average: divide by the number of counted tokens (length normalisation).

    Returns:
      `[B]` float32.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(
            "expected logits [B, T, V] with labels and loss_mask [B, T]; got "
            f"logits {logits.shape}, labels {labels.shape}, loss_mask {loss_mask.shape}"
        )
    logits = logits.astype(jnp.float32)
    counted = loss_mask > 0
    safe_labels = jnp.where(counted, labels, 0).astype(jnp.int32)
    label_logits = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    token_logps = label_logits - jax.nn.logsumexp(logits, axis=-1)
    weights = loss_mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(counted, token_logps * weights, 0.0), axis=-1)
    if average:
        total = total / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)
    return total


def _check_beta(beta: float) -> None:
    """β must be positive (IPO divides by it); traced values are left unchecked."""
    if isinstance(beta, (int, float)) and beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _log_ratio_margin(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    reference_chosen_logps: Array,
    reference_rejected_logps: Array,
) -> Array:
    """Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), float32 `[B]`."""
    chosen = jnp.asarray(policy_chosen_logps, jnp.float32) - jnp.asarray(reference_chosen_logps, jnp.float32)
    rejected = jnp.asarray(policy_rejected_logps, jnp.float32) - jnp.asarray(
        reference_rejected_logps, jnp.float32
    )
    return chosen - rejected


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    reference_chosen_logps: Array,
    reference_rejected_logps: Array,
    beta: float,
    label_smoothing: float = 0.0,
) -> Array:
    """Sigmoid DPO loss; with `label_smoothing = ε > 0`, conservative DPO.

        L = −(1 − ε) log σ(β Δ) − ε log σ(−β Δ),
        Δ = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)].

    Rafailov et al. 2023, "Direct Preference Optimization", eq. 7; Mitchell 2023, "A note on DPO with
    noisy preferences" (cDPO), eq. 3. Same as TRL's `loss_type="sigmoid"`. Inputs are summed
    completion log-probs (`sequence_logprobs(..., average=False)`).

    Args:
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
        `[B]` sequence log-probabilities.
      beta: inverse temperature of the implicit reward, β > 0.
      label_smoothing: probability ε in [0, 0.5) that a preference label is flipped.

    Returns:
      `[B]` float32 losses; equals log 2 where the policy equals the reference.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logits = beta * _log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(
        -logits
    )


def ipo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    reference_chosen_logps: Array,
    reference_rejected_logps: Array,
    beta: float,
) -> Array:
    """Identity preference optimisation loss.

        L = (Δ − 1 / (2β))²,   Δ as in `dpo_loss`; β is the paper's regulariser τ.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    eq. 17. TRL's `loss_type="ipo"` uses the same formula but feeds it length-averaged log-probs; the
    train step exposes that choice as `DPOConfig.average_logprobs`.

    Returns:
      `[B]` float32 losses.
    """
    _check_beta(beta)
    delta = _log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return jnp.square(delta - 1.0 / (2.0 * beta))


def hinge_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    reference_chosen_logps: Array,
    reference_rejected_logps: Array,
    beta: float,
) -> Array:
    """Hinge (SLiC-style) preference loss on the DPO log-ratio margin.

        L = max(0, 1 − β Δ),   Δ as in `dpo_loss`.

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (with the
    reference-normalised margin of Liu et al. 2023, RSO). Same as TRL's `loss_type="hinge"`.

    Returns:
      `[B]` float32 losses.
    """
    _check_beta(beta)
    delta = _log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return jax.nn.relu(1.0 - beta * delta)


def simpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> Array:
    """SimPO: reference-free, length-normalised preference loss with a target margin.

        L = −(1 − ε) log σ(β ℓ_w − β ℓ_l − γ) − ε log σ(−(β ℓ_w − β ℓ_l − γ)),
        ℓ = log π(y|x) / |y|   (length-averaged, `sequence_logprobs(..., average=True)`).

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6.
    `gamma` is the absolute reward margin γ; TRL's CPOTrainer (`loss_type="simpo"`) takes
    `simpo_gamma` = γ in the same sense (it divides by β and multiplies back).

    Returns:
      `[B]` float32 losses.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = jnp.asarray(policy_chosen_logps, jnp.float32)
    rejected = jnp.asarray(policy_rejected_logps, jnp.float32)
    logits = beta * (chosen - rejected) - gamma
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(
        -logits
    )


def sppo_win_probabilities(scores: Array) -> Array:
    """Each sample's estimated probability of beating the policy, from reward scores `[..., K]` of K samples
    of one prompt:

        P̂(y_i ≻ π | x) = (1/K) Σ_j σ(s_i − s_j)    (j over all K samples, i itself included: σ(0) = ½).

    The Bradley-Terry preference of the scores, averaged over the policy's own samples, as the SPPO authors
    estimate it from PairRM scores (Wu et al. 2024, §4; `compute_prob.py` of their code).

    Returns:
      float32 `[..., K]` in (0, 1).
    """
    s = jnp.asarray(scores, jnp.float32)
    return jnp.mean(jax.nn.sigmoid(s[..., :, None] - s[..., None, :]), axis=-1)


def sppo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    reference_chosen_logps: Array,
    reference_rejected_logps: Array,
    chosen_win_prob: Array,
    rejected_win_prob: Array,
    beta: float,
) -> Array:
    """Self-Play Preference Optimisation: each response's log-ratio regressed onto its scaled advantage.

        L = ½ [(ρ_w − (P̂_w − ½)/β)² + (ρ_l − (P̂_l − ½)/β)²],   ρ = log π(y|x) − log π_ref(y|x),

    where P̂ = P̂(y ≻ π_ref | x) is the estimated win probability of the response against the reference
    policy (`sppo_win_probabilities`); 1/β is the paper's step size η. Wu et al. 2024, "Self-Play Preference
    Optimization for Language Model Alignment", eq. 4.6 with a pair (the winner and the loser of the K
    samples) per prompt, as in the authors' trainer (`loss_type="sppo"`). Unlike DPO the two responses are
    not compared with each other: each is pushed up or down by its own advantage.

    Returns:
      `[B]` float32 losses.
    """
    _check_beta(beta)
    chosen = jnp.asarray(policy_chosen_logps, jnp.float32) - jnp.asarray(reference_chosen_logps, jnp.float32)
    rejected = jnp.asarray(policy_rejected_logps, jnp.float32) - jnp.asarray(reference_rejected_logps, jnp.float32)
    target_chosen = (jnp.asarray(chosen_win_prob, jnp.float32) - 0.5) / beta
    target_rejected = (jnp.asarray(rejected_win_prob, jnp.float32) - 0.5) / beta
    return 0.5 * (jnp.square(chosen - target_chosen) + jnp.square(rejected - target_rejected))


def bradley_terry_loss(chosen_rewards: Array, rejected_rewards: Array, margin: Array | None = None) -> Array:
    """Bradley-Terry pairwise reward-model loss.

        L = −log σ(r(x, y_w) − r(x, y_l) − m),   m = 0 unless a per-pair margin is given.

    Bradley & Terry 1952; Ouyang et al. 2022 (InstructGPT) eq. 1; the margin as in Touvron et al. 2023
    (Llama 2) eq. 2. Same as TRL's RewardTrainer.

    Args:
      chosen_rewards, rejected_rewards: `[B]` scalar rewards.
      margin: optional `[B]` (or scalar) margin the chosen reward should exceed the rejected one by.

    Returns:
      `[B]` float32 losses.
    """
    diff = jnp.asarray(chosen_rewards, jnp.float32) - jnp.asarray(rejected_rewards, jnp.float32)
    if margin is not None:
        diff = diff - jnp.asarray(margin, jnp.float32)
    return -jax.nn.log_sigmoid(diff)


def preference_metrics(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    reference_chosen_logps: Array | None,
    reference_rejected_logps: Array | None,
    beta: float,
) -> dict[str, Array]:
    """Per-example diagnostics of a DPO-family step under TRL's names (the caller averages them).

    Implicit rewards r = β (log π − log π_ref) (Rafailov et al. 2023, eq. 5); without a reference
    (SimPO) r = β log π on whatever log-probs are passed. Accuracy is 1 where the chosen reward is
    strictly higher, as in TRL's `rewards/accuracies`.

    Returns:
      dict of `[B]` float32 arrays: `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
      `rewards/accuracies`, `logps/chosen`, `logps/rejected` (the policy's log-probs as passed).
    """
    chosen = jnp.asarray(policy_chosen_logps, jnp.float32)
    rejected = jnp.asarray(policy_rejected_logps, jnp.float32)
    if (reference_chosen_logps is None) != (reference_rejected_logps is None):
        raise ValueError("pass both reference_chosen_logps and reference_rejected_logps, or neither")
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    if reference_chosen_logps is not None:
        chosen_rewards = beta * (chosen - jnp.asarray(reference_chosen_logps, jnp.float32))
        rejected_rewards = beta * (rejected - jnp.asarray(reference_rejected_logps, jnp.float32))
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "logps/chosen": chosen,
        "logps/rejected": rejected,
    }


def sampled_kl(policy_logps: Array, reference_logps: Array) -> Array:
    """Per-sequence estimate of KL(π_ref ‖ π) from responses y that π_ref sampled.

        k1(y) = log π_ref(y|x) − log π(y|x),   E_{y ~ π_ref}[k1] = KL(π_ref ‖ π)

    ("k1" in Schulman 2020, "Approximating KL divergence"). It needs nothing beyond the summed
    sequence log-probs a DPO step already has, stays finite for any log-ratio, and adds up over tokens.
    The alternative k3 = r − 1 − log r (r = π/π_ref) is never negative but exponentiates a whole
    sequence's log-ratio, which reaches tens of nats and overflows float32 past 88. k1 is unbiased only
    for fresh samples of π_ref: on the very responses DPO trains on it can go negative (DPO raises
    log π on chosen responses), so read it as a trend.

    Args:
      policy_logps, reference_logps: `[B]` summed completion log-probs of the same responses.

    Returns:
      `[B]` float32.
    """
    return jnp.asarray(reference_logps, jnp.float32) - jnp.asarray(policy_logps, jnp.float32)


def completion_token_stats(logits: Array, labels: Array, loss_mask: Array) -> dict[str, Array]:
    """Per-sequence sums over the counted tokens of the next-token distribution's entropy and of
    correct greedy predictions (TRL's `entropy` and `mean_token_accuracy` before averaging).

        entropy = sum_t m_t H(softmax(logits_t)),   H(p) = logsumexp(z) − sum_v p_v z_v
        correct = sum_t m_t [argmax_v logits_t = labels_t]

    Sums, not means, so a caller can divide by the token count of a whole (accumulated) batch and get
    exact per-token means. Aligned like `sequence_logprobs` (`logits[:, t]` scores `labels[:, t]`).

    Returns:
      `{"entropy": [B], "correct": [B]}` float32.
    """
    logits = logits.astype(jnp.float32)
    weights = loss_mask.astype(jnp.float32)
    counted = loss_mask > 0
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - log_normaliser[..., None])
    entropy = log_normaliser - jnp.sum(jnp.where(probs > 0, probs * logits, 0.0), axis=-1)  # 0·(−inf) = 0
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {
        "entropy": jnp.sum(jnp.where(counted, entropy * weights, 0.0), axis=-1),
        "correct": jnp.sum(jnp.where(counted, correct * weights, 0.0), axis=-1),
    }


def reward_model_metrics(chosen_rewards: Array, rejected_rewards: Array) -> dict[str, Array]:
    """Per-example diagnostics of a reward-model step under TRL's RewardTrainer names, split by side
    (the caller averages them; min/max over a batch are the caller's too): `mean_reward/chosen`,
    `mean_reward/rejected` (the rewards), `margin`, `accuracy` (`[B]` each)."""
    chosen = jnp.asarray(chosen_rewards, jnp.float32)
    rejected = jnp.asarray(rejected_rewards, jnp.float32)
    return {
        "mean_reward/chosen": chosen,
        "mean_reward/rejected": rejected,
        "margin": chosen - rejected,
        "accuracy": (chosen > rejected).astype(jnp.float32),
    }
