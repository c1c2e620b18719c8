"""The supervised fine-tuning step: loss and gradients against transformers/PyTorch on a tiny random Llama,
exact accumulation, padding rows, sharding over the 8 simulated CPU devices, and learning."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from tiny_hf import PAD_ID, VOCAB, make_hf_model

from mtjax import sharding, train
from mtjax.models import load_hf
from mtjax.models.hf import params_to_hf_tensors

NUM_ROWS, SEQ_LEN = 8, 12
# A large Adam eps keeps the first update a smooth function of the gradient (see tests/test_train.py).
OPTIMIZER = train.OptimizerConfig(learning_rate=1e-3, total_steps=10, warmup_ratio=0.0, eps=1e-3)


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _sft_batch(seed: int) -> dict[str, np.ndarray]:
    """Right-padded rows of a prompt (2-4 tokens) then a response (1-7 tokens, last one the EOS id 2)."""
    rng = np.random.default_rng(seed)
    ids = np.full((NUM_ROWS, SEQ_LEN), PAD_ID, np.int32)
    attention = np.zeros((NUM_ROWS, SEQ_LEN), np.int32)
    loss = np.zeros((NUM_ROWS, SEQ_LEN), np.int32)
    for row in range(NUM_ROWS):
        prompt = int(rng.integers(2, 5))
        end = int(rng.integers(prompt + 1, SEQ_LEN + 1))
        ids[row, :end] = rng.integers(3, VOCAB, end)
        ids[row, end - 1] = 2
        attention[row, :end] = 1
        loss[row, prompt:end] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, mtjax model, params) of one tiny random Llama (GQA, llama3 RoPE)."""
    hf_model = make_hf_model("llama3_gqa")
    path = tmp_path_factory.mktemp("sft_llama")
    hf_model.save_pretrained(path)
    model, params = load_hf(path)
    return hf_model, model, _host(params)


@pytest.fixture(scope="module")
def batch():
    return _sft_batch(seed=0)


_STEPS: dict = {}  # (config, mesh shape) -> compiled step: tests sharing a configuration compile it once


def _step_once(model, params, batch, config, mesh_shape):
    mesh = sharding.make_mesh(*mesh_shape)
    if (config, mesh_shape) not in _STEPS:
        _STEPS[(config, mesh_shape)] = train.make_sft_step(model, config, OPTIMIZER, mesh)
    state, metrics = _STEPS[(config, mesh_shape)](train.init_train_state(params, OPTIMIZER, mesh), batch)
    return _host(state.params), _host(metrics)


@pytest.fixture(scope="module")
def reference_step(tiny, batch):
    """One token-normalised step on one device: (params, metrics)."""
    _, model, params = tiny
    return _step_once(model, params, batch, train.SFTConfig(), (1, 1, 1))


def _assert_trees_close(actual, expected, atol):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=atol, err_msg=sharding.path_to_str(path))


def _torch_loss(hf_model, batch, normalization: str) -> torch.Tensor:
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.as_tensor(batch["attention_mask"])
    labels = torch.where(torch.as_tensor(batch["loss_mask"]) > 0, ids, torch.full_like(ids, -100))
    if normalization == "token":  # what transformers' Trainer / TRL's SFTTrainer optimise
        return hf_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    logits = hf_model(input_ids=ids, attention_mask=mask).logits
    token_nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    counted = (labels[:, 1:] != -100).float()
    return ((token_nll * counted).sum(-1) / counted.sum(-1)).mean()


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_loss_and_gradients_match_transformers(tiny, batch, normalization):
    hf_model, model, params = tiny
    config = train.SFTConfig(normalization=normalization)
    loss_and_grads = jax.jit(train._sft_loss_and_grads(model, config, sharding.make_mesh(1, 1, 1),
                                                       sharding.LLAMA_PARTITION_RULES))
    grads, metrics = loss_and_grads(params, batch)

    hf_model.zero_grad()
    ref_loss = _torch_loss(hf_model, batch, normalization)
    ref_loss.backward()
    np.testing.assert_allclose(metrics["loss"], ref_loss.item(), rtol=1e-5)
    ref = {n: p.grad.numpy() for n, p in hf_model.named_parameters() if p.grad is not None}
    ours = dict(params_to_hf_tensors(model, _host(grads)))
    assert set(ours) == set(ref)
    for name, g in ref.items():
        scale = max(float(np.abs(g).max()), 1e-4)
        np.testing.assert_allclose(ours[name] / scale, g / scale, atol=2e-4, err_msg=name)

    # Both normalisations are reported whichever is optimised; the EOS (id 2) is among the counted labels.
    assert metrics["num_tokens"] == batch["loss_mask"][:, 1:].sum()
    assert metrics["num_sequences"] == NUM_ROWS
    assert metrics["loss"] == metrics["token_nll" if normalization == "token" else "sequence_nll"]


def test_padding_tokens_do_not_count(tiny, batch, reference_step):
    """Padding is found by the attention mask, not by id: other ids there change nothing."""
    _, model, params = tiny
    changed = {k: v.copy() for k, v in batch.items()}
    padding = changed["attention_mask"] == 0
    changed["input_ids"][padding] = 7
    _, metrics = _step_once(model, params, changed, train.SFTConfig(), (1, 1, 1))
    np.testing.assert_allclose(metrics["loss"], reference_step[1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], reference_step[1]["grad_norm"], rtol=1e-5)


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_micro_batches_give_the_same_step(tiny, batch, normalization):
    """4 micro-batches of 2 rows (each with its own number of response tokens) == one batch of 8."""
    _, model, params = tiny
    whole = _step_once(model, params, batch, train.SFTConfig(normalization=normalization), (1, 1, 1))
    split = _step_once(model, params, batch,
                       train.SFTConfig(normalization=normalization, num_micro_batches=4), (2, 1, 1))
    for name in ("loss", "token_nll", "sequence_nll", "grad_norm", "num_tokens", "completion_tokens"):
        np.testing.assert_allclose(split[1][name], whole[1][name], rtol=2e-6, err_msg=name)
    _assert_trees_close(split[0], whole[0], atol=2e-7)


def test_padding_rows_with_weight_zero_do_not_count(tiny, batch, reference_step):
    _, model, params = tiny
    padded = {name: np.concatenate([value, value[::-1]]) for name, value in batch.items()}
    padded["sequence_weight"] = np.concatenate([np.ones(NUM_ROWS), np.zeros(NUM_ROWS)]).astype(np.float32)
    new_params, metrics = _step_once(model, params, padded, train.SFTConfig(num_micro_batches=2), (2, 1, 1))
    for name in ("loss", "grad_norm", "num_tokens", "num_sequences"):
        np.testing.assert_allclose(metrics[name], reference_step[1][name], rtol=2e-6, err_msg=name)
    _assert_trees_close(new_params, reference_step[0], atol=2e-7)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_step_equals_one_device(tiny, batch, reference_step, shape):
    _, model, params = tiny
    new_params, metrics = _step_once(model, params, batch, train.SFTConfig(), shape)
    for name in ("loss", "grad_norm", "num_tokens"):
        np.testing.assert_allclose(metrics[name], reference_step[1][name], rtol=2e-6, err_msg=name)
    _assert_trees_close(new_params, reference_step[0], atol=2e-7)


def test_steps_lower_the_loss_on_a_fixed_batch(tiny, batch):
    _, model, params = tiny
    config = train.OptimizerConfig(learning_rate=1e-2, total_steps=15, warmup_ratio=0.0)
    mesh = sharding.make_mesh(2, 1, 1)
    step = train.make_sft_step(model, train.SFTConfig(), config, mesh)
    state = train.init_train_state(params, config, mesh)
    losses = []
    for _ in range(config.total_steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(np.log(VOCAB), rel=0.3)  # a random model: near uniform
    assert losses[-1] < 0.3 * losses[0]
    assert all(b < a for a, b in zip(losses[:5], losses[1:6], strict=True))


def test_bad_input_is_named(tiny, batch):
    _, model, params = tiny
    with pytest.raises(ValueError, match="normalization"):
        train.SFTConfig(normalization="mean")
    with pytest.raises(ValueError, match="num_micro_batches"):
        train.SFTConfig(num_micro_batches=0)
    mesh = sharding.make_mesh(1, 1, 1)
    step = train.make_sft_step(model, train.SFTConfig(num_micro_batches=3), OPTIMIZER, mesh)
    with pytest.raises(KeyError, match="loss_mask"):
        step(train.init_train_state(params, OPTIMIZER, mesh), {k: v for k, v in batch.items() if k != "loss_mask"})
    with pytest.raises(ValueError, match="8 sequences in 3 micro-batches"):
        step(train.init_train_state(params, OPTIMIZER, mesh), batch)
