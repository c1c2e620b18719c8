"""Evaluators end to end on tiny random-weight mtjax models: the JAX sampler generates, a reward head
judges, with a byte-level tokenizer in SmolLM2's chat layout (no downloads)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from mtjax import evaluate
from mtjax.testbed.benchmarks import AlpacaEvalExample, instruction_prompts_from_rows
from mtjax.testbed.prompts import PromptGeneratorConfig, PromptSplitSizes, generate_prompt_rows

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + chat specials) with a ChatML template: SmolLM2's layout,
    small enough that the tiny models compile in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tiny():
    """(policy, policy params, reward model, reward params, tokenizer) of small random-weight models."""
    import jax
    import jax.numpy as jnp

    from mtjax.models import ModelConfig, make_model

    tokenizer = byte_tokenizer()
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
                      eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    dummy = jnp.zeros((1, 1), jnp.int32)
    policy = make_model(cfg, "causal_lm")
    reward = make_model(cfg, "reward")
    return (policy, jax.jit(policy.init)(jax.random.PRNGKey(0), dummy)["params"], reward,
            jax.jit(reward.init)(jax.random.PRNGKey(1), dummy)["params"], tokenizer)


def _heldout(n: int):
    sizes = PromptSplitSizes(policy=(), reward_model=0, base_rm_labels=0, heldout_eval=n)
    rows = generate_prompt_rows(PromptGeneratorConfig(seed=0, sizes=sizes))["heldout_eval"]
    return instruction_prompts_from_rows(rows)


def test_policy_and_reward_model_evaluations_with_tiny_models(tiny) -> None:
    policy, policy_params, reward, reward_params, tokenizer = tiny
    generate = evaluate.generate_fn_from_model(policy, policy_params, tokenizer, max_new_tokens=6, batch_size=4,
                                               progress=False)
    prompts = _heldout(4)
    result = evaluate.evaluate_instruction_following(
        prompts, generate_fn=generate, count_tokens=lambda r: len(tokenizer(r)["input_ids"]), progress=False
    )
    assert result["num_prompts"] == 4 and result["num_instructions"] >= 4
    for key in ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose"):
        assert 0.0 <= result[key] <= 1.0
    assert result["instruction_level_loose"] >= result["instruction_level_strict"]
    assert result["generation_seconds"] > 0 and result["length_p95_tokens"] >= result["length_mean_tokens"] > 0
    generations = generate.last_generations
    assert len(generations) == 4 and all(1 <= len(g.token_ids) <= 6 for g in generations)
    texts = generate([p.prompt for p in prompts])
    assert texts == generate([p.prompt for p in prompts])  # greedy: deterministic

    judge = evaluate.score_fn_from_model(reward, reward_params, tokenizer, batch_size=4)
    one = judge([prompts[0].prompt], [texts[0]])
    both = judge([prompts[1].prompt, prompts[0].prompt], [texts[1], texts[0]])
    np.testing.assert_allclose(both[1], one[0], rtol=1e-5, atol=1e-5)  # batch-independent

    references = ["A reference answer that is longer than the tiny model's output." for _ in prompts]
    examples = [AlpacaEvalExample(p.prompt, r, "ref", "test") for p, r in zip(prompts, references, strict=True)]
    win = evaluate.evaluate_alpaca_eval_win_rate(judge, examples, responses=texts, progress=False)
    scores = judge([p.prompt for p in prompts], texts) - judge([p.prompt for p in prompts], references)
    assert win["win_rate"] == pytest.approx(100 * np.mean(np.where(scores > 0, 1, np.where(scores < 0, 0, 0.5))))
    assert 0 <= win["length_controlled_win_rate"] <= 100

    samples = [[t, "ok", p.prompt + " ok ok"] for t, p in zip(texts, prompts, strict=True)]
    accuracy = evaluate.gold_pairwise_accuracy(judge, prompts, samples, progress=False)
    assert 0.0 <= accuracy["accuracy"] <= 1.0 and accuracy["num_prompts"] == 4


JUDGE_MODULE = '''
import numpy as np


def words(prompts, responses):
    return np.array([len(r.split()) for r in responses], dtype=np.float64)


def lowercase_policy(prompts):
    return ["a calm answer in lowercase words only" for _ in prompts]


def make_judge(bonus_word):
    return lambda prompts, responses: np.array([r.count(bonus_word) for r in responses], dtype=np.float64)
'''


def test_win_rate_and_rm_accuracy_commands(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "toy_judges.py").write_text(JUDGE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_judges", raising=False)
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"q{i}", "output": "a b c", "generator": "gpt4_1106_preview",
                                   "dataset": "test"} for i in range(6)]))
    outputs = tmp_path / "outputs.jsonl"
    outputs.write_text("".join(json.dumps({"instruction": f"q{i}", "response": "a " * (i + 1)}) + "\n"
                               for i in range(6)))
    evaluate.main(["win-rate", "--data", str(alpaca), "--responses", str(outputs), "--score-fn", "toy_judges:words"])
    result = json.loads(capsys.readouterr().out)
    assert result["win_rate"] == pytest.approx(100 * (3 + 0.5) / 6)  # 4-6 words beat 3, 3 ties, 1-2 lose
    assert result["num_ties"] == 1

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "p", "chosen": "x x", "rejected": "y", "subset": "s1"},
        {"prompt": "p", "chosen": "x", "rejected": "y y", "subset": "s2"},
    ]))
    evaluate.main(["rm-accuracy", "--pairs", str(pairs), "--score-fn", "toy_judges:make_judge",
                   "--score-kwargs", '{"bonus_word": "x"}', "--out", str(tmp_path / "rm.json")])
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == 1.0 and result["subsets"] == {"s1": 1.0, "s2": 1.0}
    assert json.loads((tmp_path / "rm.json").read_text())["num_pairs"] == 2

    # one generator, two prompt sets (a generated split by name, and a file), with timings
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text(json.dumps({"key": 7, "prompt": "Say hi.", "instruction_id_list":
                                       ["change_case:english_lowercase"], "kwargs": [{}]}) + "\n")
    evaluate.main(["ifeval", "--data", "testbed:heldout_eval", str(prompt_file), "--limit", "3", "--quiet",
                   "--generate-fn", "toy_judges:lowercase_policy",
                   "--save-responses", str(tmp_path / "responses_{data}.jsonl")])
    result = json.loads(capsys.readouterr().out)["results"]
    assert result["testbed:heldout_eval"]["num_prompts"] == 3
    assert result[str(prompt_file)]["prompt_level_strict"] == 1.0
    assert result[str(prompt_file)]["wall_seconds"] >= result[str(prompt_file)]["generation_seconds"]
    assert len((tmp_path / "responses_testbed_heldout_eval.jsonl").read_text().splitlines()) == 3

    # gold-labelled pairs from several sampled responses per generated prompt
    prompts = _heldout(3)
    samples = tmp_path / "samples.jsonl"
    rows = [{"key": p.key, "response": r} for p in prompts for r in ("ok", p.prompt + " " + "word " * 30)]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluate.main(["rm-accuracy", "--pairs", "testbed:heldout_eval", "--samples", str(samples),
                   "--score-fn", "toy_judges:words"])
    result = json.loads(capsys.readouterr().out)
    assert result["num_prompts"] == 3 and result["num_pairs"] + result["num_tied_pairs_skipped"] == 3


def test_named_models_load_as_a_run_loads_them(tmp_path) -> None:
    """`mtjax_generate_fn` / `mtjax_score_fn` on a checkpoint folder go through `mtjax.sources`: every stop id
    of the checkpoint (generation_config.json's <|eot_id|> too), the folder's own chat template, and an Orbax
    checkpoint replacing the reward model's weights."""
    import jax
    from tiny_llama3 import EOT, save_policy, save_reward_model

    from mtjax import sources
    from mtjax.rundir import RunDir, RunDirError

    policy_dir, rm_dir = save_policy(tmp_path / "policy"), save_reward_model(tmp_path / "rm")
    lm, _, _ = evaluate._load_mtjax_model(str(policy_dir), "causal_lm", "float32")
    assert sources.special_ids(lm, sources.load_tokenizer(policy_dir, "model"))[0][-1] == EOT
    generate = evaluate.mtjax_generate_fn(str(policy_dir), max_new_tokens=32, temperature=1.0, batch_size=4,
                                          progress=False)
    generate([f"hello {i}" for i in range(4)])
    stopped = [g for g in generate.last_generations if g.finish_reason == "stop"]
    assert stopped and all(g.token_ids[-1] == EOT for g in stopped)  # config.json names only 128001

    judge = evaluate.mtjax_score_fn(str(rm_dir))
    rm, params, _ = evaluate._load_mtjax_model(str(rm_dir), "reward", "float32")
    doubled = jax.tree.map(lambda x: x * 2, params)
    run = RunDir(tmp_path / "run", {"seed": 0})
    ckpt = run.save_params("rm_doubled", doubled, artifact=False)
    judge_ckpt = evaluate.mtjax_score_fn(str(rm_dir), checkpoint=str(ckpt))
    expected = evaluate.score_fn_from_model(rm, doubled, sources.load_tokenizer(rm_dir, "model"))
    restored = judge_ckpt(["hello"], ["the a"])
    assert restored == pytest.approx(expected(["hello"], ["the a"]), abs=1e-5)
    assert judge(["hello"], ["the a"]) != pytest.approx(restored, abs=1e-5)
    with pytest.raises(RunDirError, match="no checkpoint at .*missing"):
        evaluate.mtjax_score_fn(str(rm_dir), checkpoint=str(tmp_path / "missing"))
