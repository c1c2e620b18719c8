"""The jitted KV-cached sampler and batched reward scoring (mtjax.sampling) against numpy and transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_hf import PAD_ID, VOCAB, make_hf_model

from mtjax import sampling
from mtjax.models import config_to_hf, load_hf
from mtjax.models.hf import params_to_hf_tensors
from mtjax.sampling import Generation, count_truncated, filter_logits, generate, score, strip_stop

RNG = np.random.default_rng(1234)
PROMPTS = [RNG.integers(3, VOCAB, size=n).tolist() for n in (5, 17, 3, 11, 30)]  # spans buckets 16 and 32
SHORT = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]  # all in bucket 16
# One sampling mode shared by several tests, so they reuse compiled programs (temperature, top_p, seed,
# stop ids and pad id are traced; max_new_tokens, top_k, greedy-ness and shapes are compiled in).
SAMPLE_KW = dict(max_new_tokens=8, top_p=0.9, top_k=0, eos_token_ids=[2, 3])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, mtjax model, params) of a tiny random Llama-3-style causal LM."""
    hf = make_hf_model("llama3_gqa", "causal_lm", seed=0)
    path = tmp_path_factory.mktemp("tiny_causal")
    hf.save_pretrained(path)
    model, params = load_hf(path)
    return hf, model, params


def _last_logits(model, params, prompt) -> np.ndarray:
    """Next-token logits `[V]` after `prompt` (jitted: eager Flax is slow on a busy CPU)."""
    fn = jax.jit(lambda p, ids: model.apply({"params": p}, ids)[:, -1])
    return np.asarray(fn(params, jnp.asarray([prompt])))[0]


def _gen(model, params, prompts=PROMPTS, **kw):
    kw = {"eos_token_ids": [], "pad_token_id": PAD_ID, "progress": False, "max_new_tokens": 8, **kw}
    return generate(model, params, prompts, **kw)


# ----------------------------------------------------------------------------- numpy references


def ref_filter(logits, temperature, top_k, top_p):
    """numpy filter_logits: temperature, top-k (ties kept), top-p smallest nucleus (ties kept)."""
    x = logits.astype(np.float64) / temperature
    out = x.copy()
    for row in out:
        if 0 < top_k < row.size:
            row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
        if top_p < 1:
            desc = np.sort(row)[::-1]
            p = np.exp(desc - desc.max())
            p /= p.sum()
            before = np.cumsum(p) - p
            n_kept = max(1, int(np.sum(before < top_p)))
            row[row < desc[n_kept - 1]] = -np.inf
    return out


def ref_probs(logits, temperature, top_k, top_p):
    f = ref_filter(logits, temperature, top_k, top_p)
    p = np.exp(f - f.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- filters


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 12, 0.6),
                                                     (2.0, 40, 0.95), (1.0, 1, 0.3), (1.0, 0, 1e-6)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(6, 40)).astype(np.float32) * 2
    ours = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
    ref = ref_filter(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)
    assert np.all(np.isfinite(ours.max(-1)))  # the top token always survives
    if top_k:
        assert np.all(np.isfinite(ours).sum(-1) <= top_k)


_sample_jit = jax.jit(sampling.sample_logits, static_argnums=(3, 5))


@pytest.mark.parametrize("peaked", [True, False], ids=["candidates", "whole_vocab"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.8, 0, 0.5), (1.0, 6, 0.7), (1.2, 6, 1.0)])
def test_sample_logits_is_inverse_cdf_of_filtered_distribution(peaked, temperature, top_k, top_p):
    """Exact draws: token = inverse CDF (token-id order) of the filtered distribution at u, on both the
    top-`candidates` path (peaked logits) and the whole-vocabulary threshold search (flat logits)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(64, 100)).astype(np.float32) * (8.0 if peaked else 0.3)
    u = rng.uniform(size=64).astype(np.float32)
    ours = np.asarray(_sample_jit(jnp.asarray(logits), jnp.asarray(u), temperature, top_k, top_p, 16))
    probs = ref_probs(logits, temperature, top_k, top_p)
    if top_k == 0 and top_p < 1:  # the path under test: every row's nucleus within the 16 candidates, or not
        assert np.all((probs > 0).sum(-1) <= 16) == peaked
    cum = np.cumsum(probs, -1)
    expected = np.array([np.searchsorted(c, ui * c[-1], side="right") for c, ui in zip(cum, u, strict=True)])
    near_edge = np.min(np.abs(cum - (u * cum[:, -1])[:, None]), -1) < 1e-5
    assert near_edge.sum() <= 2
    np.testing.assert_array_equal(ours[~near_edge], expected[~near_edge])
    assert np.all(probs[np.arange(64), ours] > 0)


# ----------------------------------------------------------------------------- parity with transformers


def _hf_greedy(hf, prompt, n, eos=None):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=PAD_ID)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_tiny(tiny):
    hf, model, params = tiny
    n = 40
    ours = _gen(model, params, max_new_tokens=n, temperature=0.0, batch_size=8)  # one batch, left padded
    for prompt, (gen,) in zip(PROMPTS, ours, strict=True):
        assert gen.finish_reason == "length" and gen.length == n
        assert list(gen.token_ids) == _hf_greedy(hf, prompt, n)


def test_greedy_matches_transformers_smollm2(smollm2):
    import transformers

    model, params, tokenizer = smollm2
    questions = ["What is the capital of France?", "Write a haiku about autumn leaves."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                             add_generation_prompt=True) for q in questions]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    eos = [tokenizer.eos_token_id]
    ours = generate(model, params, prompts, max_new_tokens=32, temperature=0.0, eos_token_ids=eos,
                    pad_token_id=tokenizer.pad_token_id or 0, progress=False)
    # the same weights in transformers, built in memory (what save_hf would write, without 0.5 GB of disk I/O)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(model.cfg, "LlamaForCausalLM")))
    state = {name: torch.from_numpy(np.array(v)) for name, v in params_to_hf_tensors(model, params)}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    hf = hf.float().eval()
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster than all cores on a busy machine (spinning OpenMP threads)
    try:
        refs = [_hf_greedy(hf, prompt, 32, eos=eos) for prompt in prompts]
    finally:
        torch.set_num_threads(threads)
    for (gen,), ref in zip(ours, refs, strict=True):
        assert list(gen.token_ids) == ref, (tokenizer.decode(gen.token_ids), tokenizer.decode(ref))
        assert gen.finish_reason == ("stop" if ref[-1] in eos else "length")
    assert any(len(tokenizer.decode(g.token_ids).split()) > 3 for (g,) in ours)


# ----------------------------------------------------------------------------- sampling distribution


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 1.0), (2.0, 0, 0.9), (1.5, 0, 0.4)])
def test_first_token_distribution_chi_square(tiny, temperature, top_k, top_p):
    """Many first-token draws for one prompt follow the filtered softmax (Pearson chi-square)."""
    from scipy import stats

    _, model, params = tiny
    n = 4096
    prompt = PROMPTS[1]
    gens = _gen(model, params, [prompt], max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                num_samples=n, batch_size=1024, seed=7)[0]
    counts = np.bincount([g.token_ids[0] for g in gens], minlength=VOCAB)
    logits = _last_logits(model, params, prompt)
    expected = ref_probs(logits[None], temperature, top_k, top_p)[0] * n
    assert counts[expected == 0].sum() == 0, "drew a token outside the filtered set"
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = float(((obs - exp) ** 2 / exp).sum())
    p_value = stats.chi2.sf(stat, len(obs) - 1)
    assert p_value > 1e-3, (stat, len(obs) - 1, p_value)


# ----------------------------------------------------------------------------- stopping, determinism, shapes


def test_two_stop_ids(tiny):
    hf, model, params = tiny
    logits = _last_logits(model, params, PROMPTS[0])
    stops = [int(t) for t in np.argsort(logits)[::-1][:2]]  # the two likeliest first tokens
    gens = _gen(model, params, [PROMPTS[0]], **dict(SAMPLE_KW, eos_token_ids=stops), temperature=1.5,
                num_samples=48, batch_size=8)[0]
    enders = set()
    for g in gens:
        assert not set(g.token_ids[:-1]) & set(stops)  # nothing generated after a stop
        if g.finish_reason == "stop":
            assert g.token_ids[-1] in stops
            enders.add(g.token_ids[-1])
        else:
            assert g.finish_reason == "length" and g.length == 8 and g.token_ids[-1] not in stops
    assert enders == set(stops)
    assert count_truncated(gens) == sum(g.finish_reason == "length" for g in gens)


def test_seed_and_batch_composition(tiny):
    _, model, params = tiny
    kw = dict(SAMPLE_KW, temperature=1.0, num_samples=2)
    a = _gen(model, params, SHORT, seed=5, batch_size=8, **kw)
    assert a == _gen(model, params, SHORT, seed=5, batch_size=8, **kw)
    assert a == _gen(model, params, SHORT, seed=5, batch_size=2, **kw)  # other batches, same draws
    # A list sampled piece by piece (a resumable pass) draws what the whole list does.
    assert a == (_gen(model, params, SHORT[:1], seed=5, batch_size=8, **kw)
                 + _gen(model, params, SHORT[1:], seed=5, batch_size=8, first_prompt_index=1, **kw))
    b = _gen(model, params, SHORT, seed=6, batch_size=8, **kw)
    assert a != b
    assert len({g.token_ids for per in a for g in per}) == 6  # samples differ across prompts and samples


def test_no_recompile_within_a_bucket(tiny):
    _, model, params = tiny
    kw = dict(SAMPLE_KW, temperature=0.9, batch_size=8, seed=1)
    _gen(model, params, [PROMPTS[0], PROMPTS[2]], **kw)  # lengths 5, 3: bucket 16, 2 rows
    before = sampling.TRACE_COUNTS["generate"]
    _gen(model, params, [PROMPTS[3], [4] * 14], **{**kw, "temperature": 0.5, "top_p": 0.7, "seed": 2,
                                                    "eos_token_ids": [9, 10]})  # same bucket, same rows
    assert sampling.TRACE_COUNTS["generate"] == before
    _gen(model, params, [PROMPTS[1], PROMPTS[0]], **kw)  # length 17: next bucket
    assert sampling.TRACE_COUNTS["generate"] == before + 1


@pytest.mark.parametrize("num_samples,batch_size,shapes", [
    (4, 8, {(2, 16, 8), (1, 16, 4)}),  # 2 prompts x 4 samples per batch, then the last prompt
    (3, 8, {(2, 16, 6), (1, 16, 3)}),  # batch_size rounded down to a multiple of K: 6 rows
    (6, 4, {(1, 16, 3)}),  # K > batch_size: each prompt's samples in two groups of 3, one prompt per batch
], ids=["K4_b8", "K3_b8_rounded", "K6_b4_split"])
def test_shared_prefill_matches_per_sample_prefill(tiny, monkeypatch, num_samples, batch_size, shapes):
    """Each prompt is prefilled once on the de-duplicated [prompts, L] batch and its cache repeated for its
    samples; the draws equal those of one prefill per sample row (the earlier path, SHARE_PREFILL=False)."""
    _, model, params = tiny
    kw = dict(SAMPLE_KW, temperature=1.0, num_samples=num_samples, seed=11, batch_size=batch_size)
    sampling._generate_program.cache_clear()  # fresh programs: every shape used is traced (and recorded)
    sampling.TRACE_SHAPES.clear()
    shared = _gen(model, params, SHORT, **kw)
    assert set(sampling.TRACE_SHAPES) == shapes  # (prefill rows, prompt bucket, decode rows)
    monkeypatch.setattr(sampling, "SHARE_PREFILL", False)
    sampling._generate_program.cache_clear()
    sampling.TRACE_SHAPES.clear()
    assert _gen(model, params, SHORT, **kw) == shared
    assert all(p == rows for p, _, rows in sampling.TRACE_SHAPES)  # one prefill row per sample row
    assert [len(per) for per in shared] == [num_samples] * len(SHORT)
    assert len({g.token_ids for per in shared for g in per}) == num_samples * len(SHORT)


def test_scanned_layers_sample_the_same_tokens(tiny, tmp_path):
    """`scan_layers`: the stacked KV cache (written one slot at a time, its rows repeated for a prompt's samples)
    draws the tokens the per-layer cache draws."""
    hf, model, params = tiny
    hf.save_pretrained(tmp_path)
    scanned, scanned_params = load_hf(tmp_path, scan_layers=True)
    kw = dict(SAMPLE_KW, temperature=1.0, num_samples=4, seed=5, batch_size=8)
    assert _gen(scanned, scanned_params, SHORT, **kw) == _gen(model, params, SHORT, **kw)


def test_prefill_traced_on_distinct_prompts(tiny):
    _, model, params = tiny
    sampling._generate_program.cache_clear()
    sampling.TRACE_SHAPES.clear()
    _gen(model, params, SHORT, **dict(SAMPLE_KW, temperature=0.9, num_samples=4, batch_size=32, seed=4))
    assert set(sampling.TRACE_SHAPES) == {(4, 16, 16)}  # 3 prompts (padded to 4) x 4 samples, one prefill each


def test_mesh_matches_single_device(tiny):
    from jax.sharding import Mesh

    _, model, params = tiny
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2, 1), ("data", "fsdp", "tensor"))
    kw = dict(SAMPLE_KW, temperature=1.0, num_samples=2, seed=3, batch_size=8)
    assert _gen(model, params, SHORT, mesh=mesh, **kw) == _gen(model, params, SHORT, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        _gen(model, params, SHORT, mesh=mesh, **{**kw, "batch_size": 6})


# ----------------------------------------------------------------------------- score


def test_score_matches_transformers_and_reward_model(tmp_path):
    hf = make_hf_model("llama3_gqa", "reward", seed=2)
    hf.save_pretrained(tmp_path)
    model, params = load_hf(tmp_path)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in (4, 9, 2, 20, 6)]
    responses = [rng.integers(3, VOCAB, size=n).tolist() for n in (7, 0, 12, 3, 30)]
    ours = score(model, params, prompts, responses, batch_size=8, pad_token_id=PAD_ID, progress=False)
    assert ours.dtype == np.float32 and ours.shape == (5,)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        with torch.no_grad():
            ref = hf(torch.tensor([p + r])).logits[0, 0].item()  # unpadded
        assert abs(ours[i] - ref) < 1e-4, (i, ours[i], ref)
    # the RewardModel applied directly, on a right-padded batch (score() pads on the left)
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    ids = np.full((5, 40), PAD_ID, np.int32)
    mask = np.zeros((5, 40), np.int32)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
    direct = jax.jit(lambda p, x, m: model.apply({"params": p}, x, attention_mask=m))(params, ids, mask)
    np.testing.assert_allclose(ours, np.asarray(direct), atol=1e-5)


# ----------------------------------------------------------------------------- inputs and hygiene


@pytest.mark.parametrize("change,match", [
    (dict(prompts=[[5, 6], []]), r"prompts\[1\]"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[5] * 125]), r"prompts\[0\].*max_position_embeddings"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(prompts=[[5, VOCAB]]), r"prompts\[0\]"),
    (dict(eos_token_ids=2), "eos_token_ids"),
])
def test_bad_inputs(tiny, change, match):
    _, model, params = tiny
    kw = dict(prompts=[[5, 6]], max_new_tokens=4, eos_token_ids=[2], pad_token_id=PAD_ID, progress=False)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        generate(model, params, **kw)


def test_score_bad_inputs(tiny):
    _, model, params = tiny
    with pytest.raises(ValueError, match="pair up"):
        score(model, params, [[3, 4]], [[5], [6]], pad_token_id=0, progress=False)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        score(model, params, [[]], [[5]], pad_token_id=0, progress=False)


def test_hygiene_helpers():
    g = [[Generation((5, 6, 2), "stop"), Generation((5, 6, 2), "stop"), Generation((7,) * 4, "length")],
         [Generation((9, 2), "stop"), Generation((9,), "length")]]
    assert count_truncated(g) == 2
    assert strip_stop(g[0][0], [2, 3]) == (5, 6) and strip_stop([4, 3, 2], [2, 3]) == (4,)
    assert strip_stop((4, 5), [2]) == (4, 5) and g[0][2].length == 4

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return ",".join(map(str, ids))

    assert sampling.decode(Tok(), g[0][0], stop_ids=[2]) == "5,6"
    assert sampling.bucket_length(1) == 16 and sampling.bucket_length(17) == 32 and sampling.bucket_length(300) == 320
