"""The `paper` preset end to end at toy size, from hub ids alone: every model, prompt set and benchmark
is resolved through a prepared, offline HF cache under the preset's own ids (only sizes are overridden)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_cache import add_dataset, add_dataset_file, add_model
from tiny_llama3 import EOT, LLAMA3_TEMPLATE, RM_TEMPLATE, WORDS, save_policy, save_reward_model

from mtjax.rundir import RunDir

ROOT = Path(__file__).parents[1]
SIZES = ["--config.prompts.policy=(4,4)", "--config.prompts.reward_model=4", "--config.prompts.base_rm_labels=2",
         "--config.prompts.heldout_eval=2", "--config.prompts.max_prompt_tokens=64",
         "--config.sampling.max_new_tokens=24", "--config.sampling.batch_size=16",
         "--config.sampling.max_batch_tokens=4096",
         "--config.dpo.batch_size=4", "--config.dpo.num_micro_batches=2", "--config.dpo.max_length=128",
         "--config.rm.batch_size=4", "--config.rm.num_micro_batches=2", "--config.rm.max_length=128",
         "--config.eval.alpaca_eval_limit=3", "--config.eval.arena_hard_limit=3", "--config.eval.rewardbench_limit=8"]


def sentence(i: int, n: int = 6) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n)) + " ?"


def fill_hub_cache(hf_home: Path) -> None:
    """The preset's repo ids: models in the hub cache, prompt sets and benchmarks where `datasets` and
    `hf_hub_download` look for them offline."""
    models = hf_home / "models"
    add_model(hf_home, "meta-llama/Meta-Llama-3-8B-Instruct", save_policy(models / "policy"))
    add_model(hf_home, "sfairXC/FsfairX-LLaMA3-RM-v0.1", save_reward_model(models / "reward"))
    long_prompt = " ".join(WORDS * 3)  # ~150 words: over the 64-token cap
    prompts = [sentence(i) for i in range(12)] + [long_prompt]
    rows = [{"prompt": p, "prompt_id": f"{i:04d}",
             "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": "bad"}],
             "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "good"}],
             "score_chosen": 8.0, "score_rejected": 3.0} for i, p in enumerate(prompts)]
    add_dataset(hf_home, "HuggingFaceH4/ultrafeedback_binarized", {"train_prefs": rows, "test_prefs": rows[:2]})
    alpaca = [{"instruction": sentence(100 + i), "output": sentence(200 + i, 12), "generator": "gpt4_1106_preview",
               "dataset": "helpful_base"} for i in range(4)]
    add_dataset_file(hf_home, "tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline.json", json.dumps(alpaca))
    arena = [{"question_id": f"q{i}", "category": "arena-hard-v0.1", "cluster": "c",
              "turns": [{"content": long_prompt if i == 1 else sentence(300 + i)}]} for i in range(4)]
    add_dataset(hf_home, "lmarena-ai/arena-hard-auto-v0.1", {"train": arena})
    subsets = ["alpacaeval-easy", "mt-bench-hard", "refusals-dangerous", "math-prm"]
    pairs = [{"prompt": sentence(400 + i), "chosen": sentence(500 + i), "rejected": sentence(600 + i),
              "chosen_model": "a", "rejected_model": "b", "subset": subsets[i % 4], "id": i} for i in range(10)]
    add_dataset(hf_home, "allenai/reward-bench", {"filtered": pairs})


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, xla_cache):
    root = tmp_path_factory.mktemp("paper")
    hf_home = root / "hf_home"
    fill_hub_cache(hf_home)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    workdir = root / "run"
    command = [sys.executable, "-m", "mtjax.run", "--config=configs/mt.py:paper", f"--workdir={workdir}",
               f"--compilation_cache={xla_cache}", *SIZES]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return workdir, proc.stdout, env, root


def test_models_come_from_hub_ids_and_stop_on_the_generation_configs_eot(paper_run):
    workdir, stdout, _, _ = paper_run
    assert "policy meta-llama/Meta-Llama-3-8B-Instruct: stop ids 128001 (config.json+generation_config.json" \
           "+tokenizer), 128009 (generation_config.json)" in stdout
    run = RunDir.open_read_only(workdir)
    phases = run.completed()
    assert phases == ["prompts", "iter_0/eval", "iter_1/e_step", "iter_1/m_step", "iter_1/eval", "iter_2/e_step",
                      "iter_2/m_step", "iter_2/eval"]  # no r0 phase: FsfairX is already a trained RM
    rows = [json.loads(line) for line in (workdir / "iter_1/e_step/samples.jsonl").read_text().splitlines()]
    stopped = [r for r in rows if r["stopped"]]
    assert stopped and all(r["response_ids"][-1] == EOT for r in stopped)
    assert not any(128001 in r["response_ids"] for r in rows)
    summary = run.summary("iter_1/e_step")
    assert summary["pairs"] >= 1 and summary["trained_pairs"] >= 1


def test_over_long_prompts_are_dropped_and_counted_before_sampling(paper_run):
    workdir = paper_run[0]
    summary = RunDir.open_read_only(workdir).summary("prompts")
    assert summary["dropped_longer_than_max_prompt_tokens"] == 1  # the long UltraFeedback prompt
    assert summary["bench_arena_hard_dropped_longer_than_max_prompt_tokens"] == 1
    assert summary["prompts_policy_1"] == summary["prompts_policy_2"] == summary["prompts_reward_model"] == 4
    assert summary["prompts_bench_arena_hard"] == 2 and summary["prompts_bench_alpaca_eval"] == 3


def test_benchmark_outputs_are_in_the_official_formats(paper_run):
    workdir = paper_run[0]
    for t in (0, 1, 2):
        outputs = json.loads((workdir / f"eval/iter_{t}/alpaca_eval_outputs.json").read_text())
        assert len(outputs) == 3
        assert all(set(o) == {"instruction", "output", "generator", "dataset"} for o in outputs)
        assert outputs[0]["generator"] == f"mtjax-paper-iter{t}" and outputs[0]["dataset"] == "helpful_base"
        answers = [json.loads(line) for line in
                   (workdir / f"eval/iter_{t}/arena_hard_answers.jsonl").read_text().splitlines()]
        assert [a["uid"] for a in answers] == ["q0", "q2"]
        for a in answers:
            assert set(a) == {"uid", "ans_id", "model", "messages", "tstamp", "metadata"}
            assert [m["role"] for m in a["messages"]] == ["user", "assistant"]
            assert isinstance(a["messages"][1]["content"]["answer"], str)
            assert a["metadata"]["token_len"] >= 1 and set(a["metadata"]["list_count"]) == {"ordered", "unordered"}
        metrics = json.loads((workdir / f"eval/iter_{t}.json").read_text())["metrics"]
        assert {"Chat", "Chat Hard", "Safety", "Reasoning", "score", "accuracy"} <= set(metrics["rewardbench"])
        assert metrics["rewardbench"]["pairs"] == 8
        assert "proxy_win_rate" in metrics["alpaca_eval"] and "policy" not in metrics  # no testbed metrics


def test_export_loads_back_in_transformers_with_each_models_template(paper_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    workdir, _, env, _ = paper_run
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "mtjax.export", str(workdir), "--iteration", "2", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    policy = AutoModelForCausalLM.from_pretrained(out / "policy")
    reward = AutoModelForSequenceClassification.from_pretrained(out / "reward_model")
    assert policy.config.eos_token_id == [128001, EOT] and reward.config.num_labels == 1
    assert AutoTokenizer.from_pretrained(out / "policy").chat_template == LLAMA3_TEMPLATE
    assert AutoTokenizer.from_pretrained(out / "reward_model").chat_template == RM_TEMPLATE
