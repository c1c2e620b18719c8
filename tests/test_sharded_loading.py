"""`load_hf(..., mesh=...)`: params streamed from safetensors slices straight into their shards.

Checkpoints are tiny random transformers models with the head layout of an 8B Llama at reduced width
(32 query heads, 8 kv heads, head_dim 16), loaded on a (data=1, fsdp=4, tensor=2) mesh of the 8
simulated CPU devices.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_hf import hf_forward, padded_batch

from mtjax import sampling, sharding, train
from mtjax.models import hf, load_hf

TOL = 1e-4  # as tests/test_models_parity.py
LAYOUT_8B = dict(num_attention_heads=32, num_key_value_heads=8, head_dim=16, hidden_size=512,
                 intermediate_size=1024, vocab_size=512, num_hidden_layers=2, max_position_embeddings=128,
                 rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.05)
CASES = {  # name: (model_type, config extras, save_pretrained extras)
    "llama_untied": ("llama", dict(tie_word_embeddings=False), {}),
    "llama_tied": ("llama", dict(tie_word_embeddings=True), {}),
    "llama_index": ("llama", dict(tie_word_embeddings=False), dict(max_shard_size="4MB")),
    "mistral": ("mistral", dict(tie_word_embeddings=False, sliding_window=5), {}),
}
MESH_SHAPE = (1, 4, 2)  # data, fsdp, tensor


def _hf_model(model_type: str, seed: int = 0, **extra):
    config_cls = transformers.LlamaConfig if model_type == "llama" else transformers.MistralConfig
    config = config_cls(**LAYOUT_8B, **extra)
    cls = transformers.LlamaForCausalLM if model_type == "llama" else transformers.MistralForCausalLM
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms start at 1; perturb them so their mapping is tested
                p.add_(0.2 * torch.randn_like(p))
    return model.eval().float()


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(*MESH_SHAPE)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{case: (directory, transformers model)}."""
    out = {}
    for i, (name, (model_type, extra, save)) in enumerate(CASES.items()):
        model = _hf_model(model_type, seed=i, **extra)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, **save)
        out[name] = path, model
    assert (out["llama_index"][0] / "model.safetensors.index.json").exists()
    return out


@pytest.fixture(scope="module")
def loaded(checkpoints, mesh):
    """{case: (model, eager params, sharded params)}."""
    out = {}
    for name, (path, _) in checkpoints.items():
        model, eager = load_hf(path)
        model_s, streamed = load_hf(path, mesh=mesh)
        assert model_s.cfg == model.cfg
        out[name] = model, eager, streamed
    return out


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def _assert_same_params(streamed, eager, mesh) -> None:
    flat_s, flat_e = _flat(streamed), _flat(eager)
    assert flat_s.keys() == flat_e.keys()
    for path, arr in flat_s.items():
        assert arr.dtype == flat_e[path].dtype, path
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(flat_e[path]), err_msg=path)
        expected = NamedSharding(mesh, sharding.spec_for(path, arr.shape, mesh))
        assert arr.sharding == expected, (path, arr.sharding, expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_params_equal_eager_and_follow_the_rules(loaded, mesh, case):
    model, eager, streamed = loaded[case]
    _assert_same_params(streamed, eager, mesh)
    flat = _flat(streamed)
    assert ("lm_head/kernel" in flat) == (not model.cfg.tie_word_embeddings)
    q = flat["model/layers_0/self_attn/q_proj/kernel"]  # [512, 32, 16] over fsdp=4 x tensor=2
    assert q.addressable_shards[0].data.shape == (128, 16, 16)
    k = flat["model/layers_1/self_attn/k_proj/kernel"]  # [512, 8, 16]
    assert k.addressable_shards[0].data.shape == (128, 4, 16)
    split = [p for p, a in flat.items() if a.addressable_shards[0].data.shape != a.shape]
    assert len(split) >= 7 * model.cfg.num_layers + 1  # every kernel and the embedding


def _record_reads(monkeypatch) -> list[tuple[str, int]]:
    """Makes the streaming loader's only read (`hf._read_slice`) record `(tensor name, elements read)`."""
    reads: list[tuple[str, int]] = []
    real = hf._read_slice

    def recording(handle, name, index):
        block = real(handle, name, index)
        reads.append((name, block.size))
        return block

    monkeypatch.setattr(hf, "_read_slice", recording)
    return reads


def test_scanned_layers_stream_stacked_shards(checkpoints, loaded, mesh, monkeypatch):
    """`scan_layers`: each stacked param is built from the same slice of every layer's tensor; values equal
    the eager per-layer load, the layer axis is never sharded, and the forward pass matches transformers."""
    path, hf_model = checkpoints["mistral"]
    base, eager, _ = loaded["mistral"]
    reads = _record_reads(monkeypatch)
    model, streamed = load_hf(path, mesh=mesh, scan_layers=True)
    layers = model.cfg.num_layers
    _assert_same_params(streamed, traverse_util.unflatten_dict(hf.stack_layers(_flat(eager), layers), sep="/"), mesh)
    q = _flat(streamed)["model/layers/self_attn/q_proj/kernel"]  # [2, 512, 32, 16]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (layers, 128, 16, 16)
    per_layer = _flat(eager)["model/layers_0/self_attn/q_proj/kernel"].size
    assert max(size for name, size in reads if name.endswith("q_proj.weight")) == per_layer // 8
    ids, mask = padded_batch([12, 7, 3], 12, "left")
    ours = np.asarray(jax.jit(model.apply)({"params": streamed}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert float(np.abs(ours - hf_forward(hf_model, ids, mask))[mask.astype(bool)].max()) <= TOL


def test_reward_head_from_causal_checkpoint_is_seeded_and_sharded(checkpoints, mesh):
    path, _ = checkpoints["llama_tied"]
    _, eager = load_hf(path, head="reward", seed=3)
    _, streamed = load_hf(path, head="reward", seed=3, mesh=mesh)
    assert "score" in streamed and "lm_head" not in streamed
    _assert_same_params(streamed, eager, mesh)


@pytest.mark.parametrize("case", ["llama_untied", "llama_tied", "mistral"])
def test_sharded_forward_matches_transformers(checkpoints, loaded, case):
    _, hf_model = checkpoints[case]
    model, _, streamed = loaded[case]
    ids, mask = padded_batch([12, 7, 3], 12, "right")
    ours = np.asarray(jax.jit(model.apply)({"params": streamed}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = hf_forward(hf_model, ids, mask)
    assert float(np.abs(ours - ref)[mask.astype(bool)].max()) <= TOL


def test_streaming_reads_only_shard_slices(checkpoints, mesh, monkeypatch):
    path, _ = checkpoints["llama_index"]
    reads = _record_reads(monkeypatch)
    model, streamed = load_hf(path, mesh=mesh)
    flat = _flat(streamed)
    hf_names = {hf.hf_to_flax_name(name): name for name, _ in reads}
    assert hf_names.keys() == flat.keys()
    eight_way = 0
    for path_, arr in flat.items():
        shard_size = math.prod(arr.addressable_shards[0].data.shape)
        mine = [size for name, size in reads if name == hf_names[path_]]
        assert max(mine) <= shard_size, path_  # no read bigger than one shard
        assert sum(mine) == arr.size, path_  # each distinct shard read once (replicas share the block)
        if shard_size * 8 == arr.size:
            eight_way += 1
            assert len(mine) == 8, path_
    assert eight_way >= 1 + 6 * model.cfg.num_layers  # embedding, lm_head?, q/o/gate/up/down, k/v


@pytest.mark.parametrize("name,layout_shape", [
    ("model.layers.0.self_attn.q_proj.weight", (24, 12)),  # HF [N*H, D], N=6, H=4 -> Flax [12, 6, 4]
    ("model.layers.0.self_attn.o_proj.weight", (12, 24)),  # HF [D, N*H] -> Flax [6, 4, 12]
    ("model.layers.0.self_attn.q_proj.bias", (24,)),  # HF [N*H] -> Flax [6, 4]
    ("lm_head.weight", (10, 12)),
])
def test_layout_slices_equal_slices_of_the_whole_tensor(name, layout_shape):
    """Any block of any layout (whole heads, part of one head, parts of several heads) reads right."""
    from mtjax.models import ModelConfig

    cfg = ModelConfig(vocab_size=10, hidden_size=12, intermediate_size=8, num_layers=1, num_heads=6,
                      num_kv_heads=2, head_dim=4)
    row, _ = hf._match(name, "hf")
    w = np.arange(math.prod(layout_shape), dtype=np.float32).reshape(layout_shape)
    full = row.layout.to_flax(w, cfg)
    rng = np.random.default_rng(0)
    for _ in range(40):
        index = []
        for dim in full.shape:
            a = int(rng.integers(0, dim))
            index.append(slice(a, int(rng.integers(a + 1, dim + 1))))
        hf_index, finish = row.layout.hf_slice(tuple(index), full.shape, cfg)
        block = w[hf_index]
        np.testing.assert_array_equal(finish(block), full[tuple(index)])
        assert block.size <= math.prod(full.shape)
    np.testing.assert_array_equal(row.layout.to_hf(full, cfg), w)


def test_bf16_params(checkpoints, mesh, tmp_path):
    path, hf_model = checkpoints["llama_untied"]
    model, eager = load_hf(path, dtype=jnp.bfloat16)
    _, streamed = load_hf(path, dtype=jnp.bfloat16, mesh=mesh)
    assert model.cfg.param_dtype == "bfloat16"
    _assert_same_params(streamed, eager, mesh)
    # a bf16 checkpoint read into float32 params
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path)
    hf_model.float()
    _, eager = load_hf(tmp_path)
    _, streamed = load_hf(tmp_path, mesh=mesh)
    _assert_same_params(streamed, eager, mesh)
    assert _flat(streamed)["model/embed_tokens/embedding"].dtype == jnp.float32


def test_streaming_errors_name_file_and_tensor(checkpoints, mesh, tmp_path):
    path, _ = checkpoints["llama_untied"]
    bad = tmp_path / "shape"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 512}))
    with pytest.raises(ValueError, match=r"shape.*mlp\.\w+_proj\.weight.*config expects"):
        load_hf(bad, mesh=mesh)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text(json.dumps(cfg))
    data = (path / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated/model.safetensors.*truncated or corrupt"):
        load_hf(truncated, mesh=mesh)


def _dpo_batch(num_pairs: int, vocab: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Right-padded chosen/rejected rows sharing a 4-token prompt (as tests/test_train.py)."""
    rng = np.random.default_rng(seed)
    out = {}
    for side, length in (("chosen", 16), ("rejected", 13)):
        ids = rng.integers(3, vocab, (num_pairs, length)).astype(np.int32)
        attention = np.zeros((num_pairs, length), np.int32)
        loss = np.zeros((num_pairs, length), np.int32)
        for row in range(num_pairs):
            end = int(rng.integers(6, length + 1))
            attention[row, :end], loss[row, 4:end], ids[row, end:] = 1, 1, 0
        if side == "rejected":
            ids[:, :4] = out["chosen_input_ids"][:, :4]
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_loss_mask": loss})
    return out


def test_train_step_and_sampler_match_single_device(checkpoints):
    """A DPO step and greedy sampling on the streamed 8B-layout params give the 1x1x1 results, with layers
    unrolled and scanned (stacked params and KV cache sharded by the same rules)."""
    path, _ = checkpoints["llama_untied"]
    optimizer = train.OptimizerConfig(learning_rate=1e-3, total_steps=10, warmup_ratio=0.0, eps=1e-3)
    batch = _dpo_batch(4, LAYOUT_8B["vocab_size"])
    prompts = [[5, 17, 300, 42, 9], [7, 8]]
    results = {}
    for shape, options in ((MESH_SHAPE, {}), (MESH_SHAPE, {"scan_layers": True}), ((1, 1, 1), {})):
        mesh = sharding.make_mesh(*shape)
        model, params = load_hf(path, mesh=mesh, **options)
        step = train.make_dpo_step(model, train.DPOConfig(beta=0.1), optimizer, mesh)
        state = train.init_train_state(params, optimizer, mesh)
        state, first = step(state, params, batch)
        state, second = step(state, params, batch)  # policy != reference now: a non-trivial loss
        tokens = sampling.generate(model, params, prompts, max_new_tokens=8, temperature=0.0, eos_token_ids=[],
                                   pad_token_id=0, batch_size=4, mesh=mesh, progress=False)
        flat = dict(hf.params_to_hf_tensors(model, jax.tree.map(np.asarray, state.params)))  # per layer, HF names
        results[shape, bool(options)] = (float(first["loss"]), float(second["loss"]), flat,
                                         [[g.token_ids for g in row] for row in tokens])
    *runs, (base1, base2, base_params, base_tokens) = results.values()
    for loss1, loss2, params, tokens in runs:  # sharded unrolled, sharded scanned
        assert loss1 == pytest.approx(math.log(2.0), abs=1e-6) and loss2 < loss1
        np.testing.assert_allclose([loss1, loss2], [base1, base2], atol=1e-5)
        assert params.keys() == base_params.keys()
        for name, value in params.items():
            np.testing.assert_allclose(value, base_params[name], atol=1e-5, err_msg=name)
        assert tokens == base_tokens
        assert all(len(row[0]) == 8 for row in tokens)
