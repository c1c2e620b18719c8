"""Sharded DPO / reward-model train steps on 8 simulated CPU devices.

Every step function is compiled once per configuration (module-scoped fixtures), so the file stays fast.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mtjax import sharding, train
from mtjax.models import CausalLM, ModelConfig, RewardModel

NUM_PAIRS = 8
SEQ_LEN = 16
PROMPT_LEN = 4
TINY = ModelConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16
)
# A large Adam eps keeps the first update a smooth function of the gradient, so mesh-dependent float
# rounding in near-zero gradient entries cannot flip a whole lr-sized step.
OPTIMIZER = train.OptimizerConfig(learning_rate=1e-3, total_steps=10, warmup_ratio=0.0, eps=1e-3)
MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _side(rng: np.random.Generator, length: int) -> dict[str, np.ndarray]:
    """Right-padded rows: prompt of PROMPT_LEN tokens, then a completion, then padding."""
    ids = rng.integers(1, TINY.vocab_size, (NUM_PAIRS, length)).astype(np.int32)
    attention = np.zeros((NUM_PAIRS, length), np.int32)
    loss = np.zeros((NUM_PAIRS, length), np.int32)
    for row in range(NUM_PAIRS):
        end = int(rng.integers(PROMPT_LEN + 2, length + 1))
        attention[row, :end] = 1
        loss[row, PROMPT_LEN:end] = 1
        ids[row, end:] = 0
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def _dpo_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    chosen, rejected = _side(rng, SEQ_LEN), _side(rng, SEQ_LEN - 3)  # different lengths on purpose
    rejected["input_ids"][:, :PROMPT_LEN] = chosen["input_ids"][:, :PROMPT_LEN]
    return {**{f"chosen_{k}": v for k, v in chosen.items()}, **{f"rejected_{k}": v for k, v in rejected.items()}}


@pytest.fixture(scope="module")
def policy():
    model = CausalLM(TINY)
    return model, _init_params(model, seed=0)


@pytest.fixture(scope="module")
def dpo_batch():
    return _dpo_batch(seed=1)


@pytest.fixture(scope="module")
def dpo_results(policy, dpo_batch):
    """One DPO step (policy == reference) on each mesh: `{mesh_shape: (params, metrics)}`."""
    model, params = policy
    results = {}
    for shape in MESHES:
        mesh = sharding.make_mesh(*shape)
        step = train.make_dpo_step(model, train.DPOConfig(beta=0.1), OPTIMIZER, mesh)
        state = train.init_train_state(params, OPTIMIZER, mesh)
        state, metrics = step(state, sharding.shard_params(params, mesh), dpo_batch)
        results[shape] = (_host(state.params), _host(metrics), state)
    return results


def _init_params(model, seed: int):
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, SEQ_LEN), jnp.int32))["params"])
    return _host(init(jax.random.PRNGKey(seed)))


def _assert_trees_close(actual, expected, atol, rtol=0.0):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=rtol, err_msg=sharding.path_to_str(path))


# --- sharding ------------------------------------------------------------------------------------


def test_partition_rules_cover_the_param_tree(policy):
    _, params = policy
    mesh = sharding.make_mesh(1, 4, 2)
    specs = {sharding.path_to_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        sharding.tree_specs(params, mesh), is_leaf=lambda x: isinstance(x, P))}
    assert specs["model/embed_tokens/embedding"] == P("tensor", "fsdp")
    assert specs["lm_head/kernel"] == P("fsdp", "tensor")
    assert specs["model/layers_0/self_attn/q_proj/kernel"] == P("fsdp", "tensor", None)
    assert specs["model/layers_0/self_attn/k_proj/kernel"] == P("fsdp", "tensor", None)
    assert specs["model/layers_1/self_attn/o_proj/kernel"] == P("tensor", None, "fsdp")
    assert specs["model/layers_1/mlp/gate_proj/kernel"] == P("fsdp", "tensor")
    assert specs["model/layers_1/mlp/down_proj/kernel"] == P("tensor", "fsdp")
    assert specs["model/norm/scale"] == P()


def test_non_dividing_dims_fall_back_to_replication():
    mesh = sharding.make_mesh(1, 2, 4)
    # 2 kv heads do not split 4 ways; 64 hidden does split 2 ways.
    assert sharding.spec_for("self_attn/k_proj/kernel", (64, 2, 16), mesh) == P("fsdp", None, None)
    assert sharding.spec_for("mlp/down_proj/kernel", (100, 63), mesh) == P("tensor", None)
    assert sharding.spec_for("opt_state/0/count", (), mesh) == P()
    with pytest.raises(ValueError, match="q_proj"):
        sharding.spec_for("self_attn/q_proj/kernel", (64,), mesh)


def test_make_mesh_validates_sizes():
    assert dict(sharding.make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(4, 4, 1)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh(-1, -1, 1)


def test_shard_batch_rejects_rows_not_dividing_the_mesh(dpo_batch):
    mesh = sharding.make_mesh(8, 1, 1)
    with pytest.raises(ValueError, match="chosen_input_ids"):
        sharding.shard_batch({"chosen_input_ids": dpo_batch["chosen_input_ids"][:6]}, mesh)


# --- optimizer -----------------------------------------------------------------------------------


def test_schedule_is_linear_warmup_then_cosine_to_zero():
    config = train.OptimizerConfig(learning_rate=1.0, total_steps=100, warmup_ratio=0.1)
    schedule = train.learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(55)) == pytest.approx(0.5, abs=1e-6)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


def test_weight_decay_skips_norms():
    config = train.OptimizerConfig(learning_rate=1.0, total_steps=1, warmup_ratio=0.0, weight_decay=0.5,
                                   max_grad_norm=None)
    params = {"dense": {"kernel": jnp.ones((2, 2))}, "norm": {"scale": jnp.ones((2,))}}
    optimizer = train.make_optimizer(config)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.5)
    np.testing.assert_allclose(updates["norm"]["scale"], 0.0)


# --- DPO step ------------------------------------------------------------------------------------


def test_policy_equal_to_reference_gives_zero_log_ratios_and_log_two(dpo_results):
    _, metrics, _ = dpo_results[(1, 1, 1)]
    # Same code path and dtype for policy and reference; XLA fuses the forward inside the gradient
    # differently from the plain reference forward, so equality is to float32 rounding, not bitwise.
    assert abs(metrics["rewards/chosen"]) < 1e-6 and abs(metrics["rewards/rejected"]) < 1e-6  # β · log-ratio
    assert abs(metrics["kl"]) < 1e-5
    assert metrics["max_abs_logratio_margin"] < 1e-5
    assert metrics["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert metrics["num_pairs"] == NUM_PAIRS
    assert metrics["learning_rate"] == pytest.approx(OPTIMIZER.learning_rate)


@pytest.mark.parametrize("shape", MESHES[1:])
def test_dpo_step_is_independent_of_the_mesh(dpo_results, shape):
    base_params, base_metrics, _ = dpo_results[(1, 1, 1)]
    params, metrics, state = dpo_results[shape]
    for name in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "num_completion_tokens"):
        np.testing.assert_allclose(metrics[name], base_metrics[name], rtol=2e-6, err_msg=name)
    _assert_trees_close(params, base_params, atol=2e-7)
    # Params and Adam moments really are laid out by the rules (not silently replicated).
    q_sharding = state.params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding
    assert q_sharding.spec == sharding.spec_for("self_attn/q_proj/kernel", (64, 4, 16), q_sharding.mesh)


def test_gradient_accumulation_is_exact(policy, dpo_batch, dpo_results):
    """4 micro-batches of 2 pairs == 1 batch of 8 pairs (same update, same metrics)."""
    model, params = policy
    base_params, base_metrics, _ = dpo_results[(1, 1, 1)]
    mesh = sharding.make_mesh(2, 1, 1)
    step = train.make_dpo_step(model, train.DPOConfig(beta=0.1, num_micro_batches=4), OPTIMIZER, mesh)
    state, metrics = step(train.init_train_state(params, OPTIMIZER, mesh), params, dpo_batch)
    # (accuracy and rewards are pure rounding noise here: policy == reference.)
    for name in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "num_pairs"):
        np.testing.assert_allclose(metrics[name], base_metrics[name], rtol=2e-6, atol=1e-9, err_msg=name)
    _assert_trees_close(_host(state.params), base_params, atol=2e-7)


def test_remat_gives_the_same_step(policy, dpo_batch, dpo_results):
    """Rematerialising each block changes memory, not maths: same update as without remat."""
    _, params = policy
    base_params, base_metrics, _ = dpo_results[(1, 1, 1)]
    model = CausalLM(TINY.replace(remat=True))
    mesh = sharding.make_mesh(1, 1, 1)
    step = train.make_dpo_step(model, train.DPOConfig(beta=0.1), OPTIMIZER, mesh)
    state, metrics = step(train.init_train_state(params, OPTIMIZER, mesh), params, dpo_batch)
    for name in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(metrics[name], base_metrics[name], rtol=2e-6, err_msg=name)
    _assert_trees_close(_host(state.params), base_params, atol=2e-7)


def test_chunked_logits_give_the_same_step(policy, dpo_batch, dpo_results):
    """`logits_chunk` (vocab projection 5 positions at a time, T=16 padded to 20) == full logits."""
    model, params = policy
    base_params, base_metrics, _ = dpo_results[(1, 1, 1)]
    mesh = sharding.make_mesh(2, 1, 2)
    step = train.make_dpo_step(model, train.DPOConfig(beta=0.1, logits_chunk=5), OPTIMIZER, mesh)
    state, metrics = step(train.init_train_state(params, OPTIMIZER, mesh), params, dpo_batch)
    for name in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(metrics[name], base_metrics[name], rtol=2e-6, err_msg=name)
    _assert_trees_close(_host(state.params), base_params, atol=2e-7)
    averaged = jax.jit(lambda p, b: train.pair_logprobs(model, p, b, average=True, logits_chunk=5))(params, dpo_batch)
    full = jax.jit(lambda p, b: train.pair_logprobs(model, p, b, average=True))(params, dpo_batch)
    np.testing.assert_allclose(np.asarray(averaged), np.asarray(full), rtol=1e-6)


def test_bf16_compute_keeps_float32_master_weights(policy, dpo_batch, dpo_results):
    """bf16 activations over float32 params: params, grads and Adam moments stay float32, the update is
    close to the float32 one."""
    _, params = policy
    base_params, base_metrics, _ = dpo_results[(1, 1, 1)]
    model = CausalLM(TINY.replace(dtype="bfloat16"))
    mesh = sharding.make_mesh(2, 2, 2)
    step = train.make_dpo_step(model, train.DPOConfig(beta=0.1), OPTIMIZER, mesh)
    state, metrics = step(train.init_train_state(params, OPTIMIZER, mesh), params, dpo_batch)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if np.ndim(leaf) > 0]
    assert moments and {leaf.dtype for leaf in moments} == {np.dtype(np.float32)}
    assert metrics["loss"] == pytest.approx(math.log(2.0), abs=1e-2)  # policy == reference, bf16 noise
    np.testing.assert_allclose(metrics["logps/chosen"], base_metrics["logps/chosen"], rtol=2e-2)
    np.testing.assert_allclose(metrics["grad_norm"], base_metrics["grad_norm"], rtol=0.1)
    delta = jax.tree.map(lambda new, old: np.asarray(new) - old, _host(state.params), params)
    base_delta = jax.tree.map(lambda new, old: new - old, base_params, params)
    cosine = sum(float(np.vdot(a, b)) for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(base_delta), strict=True))
    cosine /= math.sqrt(sum(float(np.vdot(a, a)) for a in jax.tree.leaves(delta)))
    cosine /= math.sqrt(sum(float(np.vdot(b, b)) for b in jax.tree.leaves(base_delta)))
    assert cosine > 0.9


def test_padding_pairs_do_not_count(policy, dpo_batch, dpo_results):
    """Doubling the batch with zero-weight rows leaves the update unchanged (exact denominators)."""
    model, params = policy
    _, base_metrics, _ = dpo_results[(1, 1, 1)]
    padded = {name: np.concatenate([value, value[::-1]]) for name, value in dpo_batch.items()}
    padded["pair_weight"] = np.concatenate([np.ones(NUM_PAIRS), np.zeros(NUM_PAIRS)]).astype(np.float32)
    mesh = sharding.make_mesh(1, 1, 1)
    device_params = sharding.shard_params(params, mesh)
    reference = train.make_reference_logprobs_fn(model, mesh)(device_params, padded)
    padded["reference_chosen_logps"], padded["reference_rejected_logps"] = map(np.asarray, reference)
    step = train.make_dpo_step(model, train.DPOConfig(beta=0.1, reference="precomputed"), OPTIMIZER, mesh)
    _, metrics = step(train.init_train_state(device_params, OPTIMIZER, mesh), padded)
    for name in ("loss", "grad_norm", "logps/chosen", "num_pairs"):
        np.testing.assert_allclose(metrics[name], base_metrics[name], rtol=2e-6, err_msg=name)
    # init_train_state copies: the step donated its state, yet the params it started from (still needed
    # as the reference / the next iteration's start) are alive and unchanged.
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(device_params))
    _assert_trees_close(_host(device_params), params, atol=0.0)


def test_simpo_step_is_reference_free_on_length_averaged_logprobs(policy, dpo_batch):
    model, params = policy
    mesh = sharding.make_mesh(1, 1, 1)
    config = train.DPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    step = train.make_dpo_step(model, config, OPTIMIZER, mesh)
    incomplete = {k: v for k, v in dpo_batch.items() if k != "rejected_loss_mask"}
    with pytest.raises(KeyError, match="rejected_loss_mask"):
        step(train.init_train_state(params, OPTIMIZER, mesh), incomplete)
    _, metrics = step(train.init_train_state(params, OPTIMIZER, mesh), dpo_batch)
    chosen, rejected, _ = jax.jit(lambda p, b: train.pair_logprobs(model, p, b, average=True))(params, dpo_batch)
    expected = np.mean(np.logaddexp(0.0, -(2.0 * (np.asarray(chosen) - np.asarray(rejected)) - 0.5)))
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/chosen"], 2.0 * np.mean(chosen), rtol=1e-5)


# Weight-0 padding rows spread over the batch; with 4 micro-batches (rows m, m+4, ...) the last micro-batch
# (rows 3, 7, 11, 15) holds padding only.
PADDED_WEIGHTS = np.array([1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0], np.float32)


def test_sppo_step_moves_each_response_towards_its_own_advantage(policy, dpo_batch):
    """SPPO (policy == reference at the start): a response whose win probability is above ½ gains log-prob,
    one below ½ loses it, each by its own target, and accumulation over micro-batches is exact."""
    model, params = policy
    rng = np.random.default_rng(3)
    n = len(dpo_batch["chosen_input_ids"])
    batch = {**dpo_batch, "chosen_win_prob": rng.uniform(0.6, 0.9, n).astype(np.float32),
             "rejected_win_prob": rng.uniform(0.1, 0.4, n).astype(np.float32)}
    mesh = sharding.make_mesh(2, 1, 1)
    config = train.DPOConfig(loss_type="sppo", beta=1.0)
    step = train.make_dpo_step(model, config, OPTIMIZER, mesh)
    state, metrics = step(train.init_train_state(params, OPTIMIZER, mesh), params, batch)
    targets = [(batch[f"{side}_win_prob"] - 0.5) / config.beta for side in ("chosen", "rejected")]
    assert float(metrics["loss"]) == pytest.approx(float(np.mean(0.5 * (targets[0] ** 2 + targets[1] ** 2))),
                                                   rel=1e-5)
    chosen, rejected, _ = train.pair_logprobs(model, state.params, batch)
    before_chosen, before_rejected, _ = train.pair_logprobs(model, params, batch)
    assert float(np.mean(chosen - before_chosen)) > 0 > float(np.mean(rejected - before_rejected))
    accumulated = train.make_dpo_step(model, train.DPOConfig(loss_type="sppo", beta=1.0, num_micro_batches=4),
                                      OPTIMIZER, mesh)
    state4, metrics4 = accumulated(train.init_train_state(params, OPTIMIZER, mesh), params, batch)
    np.testing.assert_allclose(metrics4["loss"], metrics["loss"], rtol=2e-6)
    _assert_trees_close(_host(state4.params), _host(state.params), atol=2e-7)
    with pytest.raises(KeyError, match="chosen_win_prob"):
        step(train.init_train_state(params, OPTIMIZER, mesh), params, dpo_batch)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _side_statistics(model, params, batch, side: str) -> dict[str, np.ndarray]:
    """Per-row completion log-probs, entropy / greedy-correct sums and token counts in float64 numpy, from
    one plain forward pass per side (no interleaving, no chunking, no accumulation)."""
    ids, attention, loss = (np.asarray(batch[f"{side}_{k}"]) for k in ("input_ids", "attention_mask", "loss_mask"))
    logits = np.asarray(model.apply({"params": params}, ids, attention_mask=attention), np.float64)[:, :-1]
    targets, counted = ids[:, 1:], loss[:, 1:].astype(bool)
    log_probs = _log_softmax(logits)
    token_logps = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    entropy = -(np.exp(log_probs) * log_probs).sum(-1)
    return {"logps": (token_logps * counted).sum(-1), "entropy": (entropy * counted).sum(-1),
            "correct": ((logits.argmax(-1) == targets) * counted).sum(-1), "tokens": counted.sum(-1),
            "input_tokens": attention.sum(-1)}


def _greedy_in_even_rows(model, params, batch) -> np.ndarray:
    """Chosen ids whose completions in even rows are the model's greedy continuation (so about half the
    counted predictions are correct and token accuracy has something to measure)."""
    ids, attention = batch["chosen_input_ids"].copy(), batch["chosen_attention_mask"]
    forward = jax.jit(lambda ids: model.apply({"params": params}, ids, attention_mask=attention))
    for t in range(PROMPT_LEN, SEQ_LEN):
        greedy = np.asarray(forward(ids)).argmax(-1)[:, t - 1]
        ids[0::2, t] = np.where(attention[0::2, t] > 0, greedy[0::2], ids[0::2, t])
    return ids


@pytest.mark.parametrize("num_micro_batches, logits_chunk, stats_chunk", [(1, None, 5), (4, 5, 128)])
def test_dpo_metrics_match_an_independent_computation(policy, num_micro_batches, logits_chunk, stats_chunk,
                                                      monkeypatch):
    """TRL's DPO metrics, KL, entropy, token accuracy and token counts against numpy on the same batch:
    exact under 4 micro-batches (one of them all padding), chunked logits, weight-0 rows, and token
    statistics taken in pieces of 5 positions (16 = 5 + 5 + 5 + an overlapping last piece)."""
    monkeypatch.setattr(train, "TOKEN_STATS_CHUNK", stats_chunk)
    model, params = policy
    reference_params = _init_params(model, seed=3)  # another model: nonzero log-ratios and rewards
    batch = {k: np.concatenate([a, b]) for (k, a), b in zip(_dpo_batch(1).items(), _dpo_batch(7).values(),
                                                            strict=True)}
    batch["chosen_input_ids"] = _greedy_in_even_rows(model, params, batch)
    batch["pair_weight"] = PADDED_WEIGHTS
    mesh = sharding.make_mesh(2, 1, 1)
    beta = 0.1
    config = train.DPOConfig(beta=beta, num_micro_batches=num_micro_batches, logits_chunk=logits_chunk)
    step = train.make_dpo_step(model, config, OPTIMIZER, mesh)
    _, metrics = step(train.init_train_state(params, OPTIMIZER, mesh), sharding.shard_params(reference_params, mesh),
                      batch)
    metrics = _host(metrics)

    real = PADDED_WEIGHTS > 0
    pol = {side: _side_statistics(model, params, batch, side) for side in ("chosen", "rejected")}
    ref = {side: _side_statistics(model, reference_params, batch, side) for side in ("chosen", "rejected")}
    chosen_rewards = beta * (pol["chosen"]["logps"] - ref["chosen"]["logps"])[real]
    rejected_rewards = beta * (pol["rejected"]["logps"] - ref["rejected"]["logps"])[real]
    assert 0 < np.mean(chosen_rewards > rejected_rewards) < 1  # a test with some signal in it
    kl = 0.5 * sum(ref[side]["logps"] - pol[side]["logps"] for side in ("chosen", "rejected"))  # k1, per response
    chosen_tokens = pol["chosen"]["tokens"][real].sum()
    expected = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": np.mean(chosen_rewards > rejected_rewards),
        "logps/chosen": pol["chosen"]["logps"][real].mean(),
        "logps/rejected": pol["rejected"]["logps"][real].mean(),
        "kl": kl[real].mean(),
        "entropy": pol["chosen"]["entropy"][real].sum() / chosen_tokens,
        "mean_token_accuracy": pol["chosen"]["correct"][real].sum() / chosen_tokens,
        "max_abs_logratio_margin": np.max(np.abs(chosen_rewards - rejected_rewards)) / beta,
        "num_pairs": real.sum(),
        "num_chosen_completion_tokens": chosen_tokens,
        "num_completion_tokens": chosen_tokens + pol["rejected"]["tokens"][real].sum(),
        "num_input_tokens": (pol["chosen"]["input_tokens"] + pol["rejected"]["input_tokens"])[real].sum(),
    }
    assert 0.2 < expected["mean_token_accuracy"] < 0.8
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=2e-5, atol=2e-5, err_msg=name)


def test_reward_model_metrics_match_an_independent_computation():
    """Means over real pairs and min/max that never see a padding row, under 4 micro-batches (one all
    padding) against numpy on the model's rewards."""
    model = RewardModel(TINY)
    params = _init_params(model, seed=1)
    batch = {k: np.concatenate([a, b]) for (k, a), b in zip(_separable_preferences(0, 8).items(),
                                                            _separable_preferences(1, 8).values(), strict=True)}
    batch["pair_weight"] = PADDED_WEIGHTS
    mesh = sharding.make_mesh(2, 1, 1)
    step = train.make_reward_model_step(model, train.RewardConfig(num_micro_batches=4), OPTIMIZER, mesh)
    _, metrics = step(train.init_train_state(params, OPTIMIZER, mesh), batch)
    chosen, rejected = (np.asarray(model.apply({"params": params}, batch[f"{side}_input_ids"],
                                               attention_mask=batch[f"{side}_attention_mask"]), np.float64)
                        for side in ("chosen", "rejected"))
    real = PADDED_WEIGHTS > 0
    sides = {"chosen": chosen, "rejected": rejected}
    extremes = {f"{kind}_reward/{side}": fn(values[real]) for side, values in sides.items()
                for kind, fn in (("min", np.min), ("max", np.max))}
    everything = {f"{kind}_reward/{side}": fn(values) for side, values in sides.items()
                  for kind, fn in (("min", np.min), ("max", np.max))}
    assert extremes != everything  # a padding row holds an extreme: counting it would show
    diff = chosen[real] - rejected[real] - batch["margin"][real]
    expected = {
        **extremes,
        "mean_reward/chosen": chosen[real].mean(),
        "mean_reward/rejected": rejected[real].mean(),
        "margin": (chosen - rejected)[real].mean(),
        "accuracy": np.mean(chosen[real] > rejected[real]),
        "loss": np.mean(np.logaddexp(0.0, -diff)),
        "num_pairs": real.sum(),
        "num_input_tokens": (batch["chosen_attention_mask"] + batch["rejected_attention_mask"]).sum(-1)[real].sum(),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=2e-5, atol=1e-6, err_msg=name)


def test_bad_dpo_config_is_rejected():
    with pytest.raises(ValueError, match="loss_type"):
        train.DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="reference"):
        train.DPOConfig(reference="none")


# --- reference log-prob precomputation ---------------------------------------------------------------


def test_precomputed_reference_logprobs_are_cached_by_data_and_params(policy, tmp_path):
    model, params = policy
    mesh = sharding.make_mesh(2, 1, 1)
    data = {name: np.concatenate([v, v[:3]]) for name, v in _dpo_batch(seed=2).items()}  # 11 rows
    cache = train.ReferenceLogprobCache(tmp_path)
    first = train.precompute_reference_logprobs(model, params, data, mesh, batch_size=4, cache=cache)
    assert first["reference_chosen_logps"].shape == (NUM_PAIRS + 3,)  # the remainder is not dropped
    np.testing.assert_array_equal(first["reference_chosen_logps"][-3:], first["reference_chosen_logps"][:3])
    assert len(list(tmp_path.glob("*.npz"))) == 1

    # A fresh cache object finds the file: no recomputation, identical values.
    again = train.precompute_reference_logprobs(
        model, params, data, mesh, batch_size=4, cache=train.ReferenceLogprobCache(tmp_path)
    )
    np.testing.assert_array_equal(again["reference_rejected_logps"], first["reference_rejected_logps"])

    # Other params or other data give other keys.
    shifted = jax.tree.map(lambda x: x * 1.01, params)
    train.precompute_reference_logprobs(model, shifted, data, mesh, batch_size=4, cache=cache)
    other_data = {**data, "chosen_input_ids": (data["chosen_input_ids"] + 1) % TINY.vocab_size}
    train.precompute_reference_logprobs(model, params, other_data, mesh, batch_size=4, cache=cache)
    assert len(list(tmp_path.glob("*.npz"))) == 3
    assert train.fingerprint_params(params) != train.fingerprint_params(shifted)


# --- reward model --------------------------------------------------------------------------------


def _separable_preferences(seed: int, num_pairs: int) -> dict[str, np.ndarray]:
    """Chosen responses use tokens from the upper half of the vocab, rejected ones from the lower half."""
    rng = np.random.default_rng(seed)
    half = TINY.vocab_size // 2
    prompts = rng.integers(1, TINY.vocab_size, (num_pairs, PROMPT_LEN))
    chosen = np.concatenate([prompts, rng.integers(half, TINY.vocab_size, (num_pairs, 8))], axis=1)
    rejected = np.concatenate([prompts, rng.integers(1, half, (num_pairs, 8))], axis=1)
    mask = np.ones(chosen.shape, np.int32)
    return {
        "chosen_input_ids": chosen.astype(np.int32),
        "chosen_attention_mask": mask,
        "rejected_input_ids": rejected.astype(np.int32),
        "rejected_attention_mask": mask,
        "margin": np.linspace(-0.5, 0.5, num_pairs).astype(np.float32),
    }


def test_reward_model_step_learns_a_separable_preference():
    model = RewardModel(TINY)
    params = _init_params(model, seed=1)
    optimizer_config = train.OptimizerConfig(learning_rate=1e-2, total_steps=8, warmup_ratio=0.1)
    mesh = sharding.make_mesh(2, 2, 2)
    step = train.make_reward_model_step(model, train.RewardConfig(num_micro_batches=2), optimizer_config, mesh)
    state = train.init_train_state(params, optimizer_config, mesh)
    history = []
    for index in range(optimizer_config.total_steps):
        state, metrics = step(state, _separable_preferences(seed=index, num_pairs=16))
        history.append(_host(metrics))
        if index == 0:
            first_params = _host(state.params)
    first, last = history[0], history[-1]
    assert first["accuracy"] < 0.8
    assert last["accuracy"] == 1.0
    assert last["loss"] < 0.5 * first["loss"]
    assert last["margin"] > first["margin"]
    assert int(state.step) == optimizer_config.total_steps

    # The first step (2 micro-batches of 8 pairs on a 2x2x2 mesh) equals one batch of 16 on one device,
    # and its loss is the Bradley-Terry formula with the margin subtracted.
    single = sharding.make_mesh(1, 1, 1)
    single_step = train.make_reward_model_step(model, train.RewardConfig(), optimizer_config, single)
    batch = _separable_preferences(seed=0, num_pairs=16)
    state_one, metrics_one = single_step(train.init_train_state(params, optimizer_config, single), batch)
    for name in ("loss", "grad_norm", "accuracy", "margin"):
        np.testing.assert_allclose(first[name], metrics_one[name], rtol=2e-6, atol=1e-7, err_msg=name)
    _assert_trees_close(first_params, _host(state_one.params), atol=2e-7)
    chosen, rejected = train.pair_rewards(model, params, batch)
    expected = optax.losses.sigmoid_binary_cross_entropy(chosen - rejected - batch["margin"], 1.0).mean()
    np.testing.assert_allclose(metrics_one["loss"], expected, rtol=1e-5)

