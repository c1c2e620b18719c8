"""Parity of mtjax's Flax Llama/Mistral with transformers (PyTorch) on tiny random checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tiny_hf import TINY_CASES, hf_forward, make_hf_model, padded_batch

from mtjax.models import init_cache, load_hf, save_hf
from mtjax.models.hf import params_to_hf_tensors

TOL = 1e-4
LENGTHS, TOTAL = [12, 7, 3], 12  # a full row, a mid row and a short row


def _valid_max_diff(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(ours - ref)[mask.astype(bool)].max())


@pytest.fixture(scope="module", params=sorted(TINY_CASES))
def causal_case(request, tmp_path_factory):
    hf_model = make_hf_model(request.param, "causal_lm")
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    model, params = load_hf(path)
    return request.param, hf_model, model, params


@pytest.mark.parametrize("side", ["right", "left", "both"])
def test_causal_lm_logits_match_transformers(causal_case, side, record_property):
    name, hf_model, model, params = causal_case
    ids, mask = padded_batch(LENGTHS, TOTAL, side)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = hf_forward(hf_model, ids, mask)
    diff = _valid_max_diff(ours, ref, mask)
    record_property("max_abs_logit_diff", diff)
    print(f"{name}/{side}: max |Δlogit| = {diff:.2e}")
    assert ours.shape == ref.shape
    assert diff <= TOL


def test_left_padding_equals_unpadded(causal_case):
    """Positions come from the mask, so a left-padded row gives the same logits as the bare row."""
    _, _, model, params = causal_case
    ids, mask = padded_batch([5], 9, "left")
    padded = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    bare = model.apply({"params": params}, jnp.asarray(ids[:, 4:]))
    np.testing.assert_allclose(np.asarray(padded)[:, 4:], np.asarray(bare), atol=1e-5)


@pytest.mark.parametrize("case", ["llama3_gqa", "mistral_window", "llama_tied"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_reward_model_matches_sequence_classifier(case, side, tmp_path, record_property):
    hf_model = make_hf_model(case, "reward")
    hf_model.save_pretrained(tmp_path)
    model, params = load_hf(tmp_path)
    ids, mask = padded_batch(LENGTHS, TOTAL, side, seed=1)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = hf_forward(hf_model, ids, mask)[:, 0]
    diff = float(np.abs(ours - ref).max())
    record_property("max_abs_reward_diff", diff)
    print(f"{case}/{side} reward: max |Δ| = {diff:.2e}")
    assert ours.shape == (len(LENGTHS),)
    assert diff <= TOL


@pytest.mark.parametrize("head", ["causal_lm", "reward"])
def test_export_round_trip(causal_case, head, tmp_path):
    """mtjax → save_hf → transformers.from_pretrained gives the same outputs as mtjax."""
    name, _, model, params = causal_case
    if head == "reward":
        from mtjax.models import make_model
        from mtjax.models.hf import init_score_head

        model = make_model(model.cfg, "reward")
        params = {"model": params["model"], "score": {"kernel": jnp.asarray(init_score_head(model.cfg, 3))}}
    out = save_hf(model, params, tmp_path / "export", max_shard_bytes=40_000)  # force a sharded index
    assert (out / "model.safetensors.index.json").exists()
    auto = transformers.AutoModelForCausalLM if head == "causal_lm" else \
        transformers.AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = padded_batch(LENGTHS, TOTAL, "right", seed=2)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = hf_forward(reloaded, ids, mask)
    if head == "reward":
        ref = ref[:, 0]
        np.testing.assert_allclose(ours, ref, atol=TOL)
    else:
        assert _valid_max_diff(ours, ref, mask) <= TOL
    # and mtjax reads its own export back bit-for-bit
    model2, params2 = load_hf(out)
    assert model2.cfg == model.cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_kv_cache_decode_equals_full_forward(causal_case):
    """Prefill a left-padded batch, then feed one token at a time: logits equal the full pass."""
    name, _, model, params = causal_case
    prompt_len, steps = 6, 6
    prompt_ids, prompt_mask = padded_batch([6, 4, 2], prompt_len, "left", seed=3)
    rng = np.random.default_rng(4)
    ids = np.concatenate([prompt_ids, rng.integers(3, 96, size=(3, steps))], axis=1)
    mask = np.concatenate([prompt_mask, np.ones((3, steps), np.int64)], axis=1)
    full = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

    total = prompt_len + steps + 2  # cache longer than needed: unused slots must be ignored
    cache = init_cache(model.cfg, batch_size=3, max_length=total)
    kv_mask = np.zeros((3, total), np.int32)
    kv_mask[:, :prompt_len] = mask[:, :prompt_len]
    apply = jax.jit(model.apply)
    logits, cache = apply({"params": params}, jnp.asarray(ids[:, :prompt_len]), attention_mask=jnp.asarray(kv_mask),
                          cache=cache)
    got = [np.asarray(logits)]
    for t in range(prompt_len, prompt_len + steps):
        kv_mask[:, t] = 1
        logits, cache = apply({"params": params}, jnp.asarray(ids[:, t:t + 1]), attention_mask=jnp.asarray(kv_mask),
                              cache=cache)
        got.append(np.asarray(logits))
    decoded = np.concatenate(got, axis=1)
    assert int(cache.index) == prompt_len + steps
    valid = mask.astype(bool)
    np.testing.assert_allclose(decoded[valid], full[valid], atol=1e-5)


def test_gradients_match_torch_autograd(causal_case):
    """The custom backward passes (projection kernels' `x^T @ dy`, grouped attention) give PyTorch's gradients:
    d(sum of masked next-token log-probs) / d(every weight), compared tensor by tensor in HF layout."""
    name, hf_model, model, params = causal_case
    ids, mask = padded_batch(LENGTHS, TOTAL, "left")
    labels, label_mask = ids[:, 1:], mask[:, 1:] * mask[:, :-1]

    def loss(p):
        logp = jax.nn.log_softmax(model.apply({"params": p}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        picked = jnp.take_along_axis(logp[:, :-1], jnp.asarray(labels)[..., None], axis=-1)[..., 0]
        return jnp.sum(picked * label_mask)

    ours = dict(params_to_hf_tensors(model, jax.grad(loss)(params)))
    hf_model.zero_grad()
    positions = torch.as_tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0))
    logits = hf_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                      position_ids=positions).logits
    picked = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.as_tensor(labels)[..., None])[..., 0]
    (picked * torch.as_tensor(label_mask)).sum().backward()
    ref = {n: p.grad.numpy() for n, p in hf_model.named_parameters() if p.grad is not None}
    assert set(ours) == set(ref), f"{name}: gradient names differ: {set(ours) ^ set(ref)}"
    for n, g in ref.items():
        scale = max(float(np.abs(g).max()), 1e-3)
        np.testing.assert_allclose(ours[n], g, atol=2e-5 * scale, rtol=0, err_msg=f"{name}: d/d{n}")


# ----------------------------------------------------------------------------- execution variants
# Every variant must give transformers' outputs on every padded layout the code receives: right (training
# pairs), left (reward scoring, sampler prompts) and both sides. "xla" is `jax.nn.dot_product_attention`
# with the arguments the cuDNN kernel gets on a GPU (is_causal, sequence lengths, local_window_size).

VARIANTS = {  # the default (einsum on CPU, unrolled) is the one the tests above load
    "xla": dict(attention_impl="xla"),
    "scan": dict(scan_layers=True),
    "scan_xla_remat": dict(scan_layers=True, attention_impl="xla", remat=True),
}


@pytest.fixture(scope="module")
def variant_models(causal_case, tmp_path_factory):
    """{variant: (model, params)} of the case's checkpoint loaded with each variant's config."""
    name = causal_case[0]
    path = tmp_path_factory.mktemp(f"{name}_variants")
    causal_case[1].save_pretrained(path)
    return {v: load_hf(path, **options) for v, options in VARIANTS.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("side", ["right", "left", "both"])
def test_variants_match_transformers(causal_case, variant_models, variant, side, record_property):
    name, hf_model, base, base_params = causal_case
    model, params = variant_models[variant]
    ids, mask = padded_batch(LENGTHS, TOTAL + 3, side, seed=5)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    diff = _valid_max_diff(ours, hf_forward(hf_model, ids, mask), mask)
    record_property("max_abs_logit_diff", diff)
    assert diff <= TOL, f"{name}/{variant}/{side}: {diff:.2e}"
    # and against the default (einsum, unrolled) path of mtjax itself
    plain = np.asarray(base.apply({"params": base_params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert _valid_max_diff(ours, plain, mask) <= 1e-5


@pytest.mark.parametrize("variant", ["xla", "scan_xla_remat"])
def test_variant_gradients_equal_einsum(causal_case, variant_models, variant):
    """Fused attention and scanned (rematerialised) layers give the einsum path's gradients, on a batch mixing
    left- and right-padded rows."""
    _, _, base, base_params = causal_case
    model, params = variant_models[variant]
    ids = np.concatenate([padded_batch(LENGTHS, TOTAL, "left")[0], padded_batch(LENGTHS, TOTAL, "right", 1)[0]])
    mask = np.concatenate([padded_batch(LENGTHS, TOTAL, "left")[1], padded_batch(LENGTHS, TOTAL, "right", 1)[1]])

    def loss(model, p):
        logp = jax.nn.log_softmax(model.apply({"params": p}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        return jnp.sum(logp[..., 5] * mask)

    ref = dict(params_to_hf_tensors(base, jax.grad(lambda p: loss(base, p))(base_params)))
    ours = dict(params_to_hf_tensors(model, jax.jit(jax.grad(lambda p: loss(model, p)))(params)))
    assert ours.keys() == ref.keys()
    for n, g in ref.items():
        np.testing.assert_allclose(ours[n], g, atol=2e-5 * max(float(np.abs(g).max()), 1e-3), err_msg=n)


@pytest.mark.parametrize("variant", ["xla", "scan"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_variant_reward_models_match_sequence_classifier(variant, side, tmp_path):
    hf_model = make_hf_model("mistral_window", "reward")
    hf_model.save_pretrained(tmp_path)
    model, params = load_hf(tmp_path, **VARIANTS[variant])
    ids, mask = padded_batch(LENGTHS, TOTAL, side, seed=1)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(ours, hf_forward(hf_model, ids, mask)[:, 0], atol=TOL)


def test_scanned_kv_cache_decode_equals_full_forward(causal_case, variant_models):
    """The stacked cache of `scan_layers` decodes exactly like the full (fused-attention) forward pass."""
    model, params = variant_models["scan"]
    prompt_ids, prompt_mask = padded_batch([6, 4, 2], 6, "left", seed=3)
    ids = np.concatenate([prompt_ids, np.random.default_rng(4).integers(3, 96, size=(3, 4))], axis=1)
    mask = np.concatenate([prompt_mask, np.ones((3, 4), np.int64)], axis=1)
    full_model, full_params = variant_models["scan_xla_remat"]
    full = np.asarray(full_model.apply({"params": full_params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    cache = init_cache(model.cfg, batch_size=3, max_length=12)
    assert cache.stacked and cache.keys.shape == (model.cfg.num_layers, 3, model.cfg.num_kv_heads,
                                                  model.cfg.head_dim, 12)
    kv_mask = np.zeros((3, 12), np.int32)
    kv_mask[:, :6] = prompt_mask
    apply = jax.jit(model.apply)
    logits, cache = apply({"params": params}, jnp.asarray(ids[:, :6]), attention_mask=jnp.asarray(kv_mask),
                          cache=cache)
    got = [np.asarray(logits)]
    for t in range(6, 10):
        kv_mask[:, t] = 1
        logits, cache = apply({"params": params}, jnp.asarray(ids[:, t:t + 1]), attention_mask=jnp.asarray(kv_mask),
                              cache=cache)
        got.append(np.asarray(logits))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(got, axis=1)[valid], full[valid], atol=1e-5)


def test_scanned_params_export_and_reload(causal_case, variant_models, tmp_path):
    """Stacked params export to the same HF tensors as the unrolled ones and read back bit-for-bit."""
    _, _, base, base_params = causal_case
    model, params = variant_models["scan"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    assert all("layers_" not in jax.tree_util.keystr(p) for p, _ in flat)
    assert params["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == model.cfg.num_layers
    ours, ref = dict(params_to_hf_tensors(model, params)), dict(params_to_hf_tensors(base, base_params))
    assert ours.keys() == ref.keys()
    for n in ref:
        np.testing.assert_array_equal(ours[n], ref[n], err_msg=n)
    save_hf(model, params, tmp_path / "scan")
    model2, params2 = load_hf(tmp_path / "scan", scan_layers=True)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
