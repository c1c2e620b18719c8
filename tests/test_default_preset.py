"""The main command, `python -m mtjax.run --config=configs/mt.py`, on the real SmolLM2-135M-Instruct weights:
the default preset end to end with only its sizes reduced (one EM iteration, 2 prompts per split, 2 samples of
8 tokens), so that the test suite proves the path a newcomer runs first: the GGUF weights for the policy and the
reward model's backbone, the generated testbed prompts, r0's gold labels, both training steps, the report.
The loop's logic over several iterations is tested on the `tiny` preset (tests/test_em_run.py)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mtjax.rundir import RunDir

ROOT = Path(__file__).parents[1]
SIZES = ["--config.iterations=1", "--config.prompts.policy=(2,)", "--config.prompts.reward_model=2",
         "--config.prompts.base_rm_labels=2", "--config.prompts.heldout_eval=2", "--config.sampling.num_samples=2",
         "--config.sampling.max_new_tokens=8", "--config.eval.num_samples=2", "--config.dpo.batch_size=2",
         "--config.rm.batch_size=2", "--config.base_rm.batch_size=2", "--config.base_rm.epochs=1"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, xla_cache):
    workdir = tmp_path_factory.mktemp("default") / "run"
    command = [sys.executable, "-m", "mtjax.run", "--config=configs/mt.py", f"--workdir={workdir}",
               f"--compilation_cache={xla_cache}", *SIZES]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a newcomer's machine
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return workdir, proc.stdout


def test_the_main_command_runs_every_phase_on_smollm2(default_run):
    workdir, stdout = default_run
    assert "mtjax: mutual (mtjax.arms), preset 'default', workdir" in stdout and "1 cpu devices" in stdout
    assert "policy smollm2: stop ids 2" in stdout and "reward_model smollm2: stop ids 2" in stdout
    assert "| policy/gold_reward |" in stdout and "mtjax: done." in stdout
    run = RunDir.open_read_only(workdir)
    assert run.completed() == ["prompts", "base_rm", "iter_0/eval", "iter_1/e_step", "iter_1/m_step", "iter_1/eval"]
    assert sorted(p.name for p in (workdir / "report").glob("*.png")) and (workdir / "report/report.md").exists()
    for t in range(2):
        metrics = json.loads((workdir / f"eval/iter_{t}.json").read_text())["metrics"]
        gold = metrics["policy"]["gold_reward"]
        assert 0.0 <= gold <= 1.0, metrics


def test_smollm2_writes_text_and_both_models_train(default_run, smollm2):
    workdir, _ = default_run
    run = RunDir.open_read_only(workdir)
    rows = run.read_jsonl("iter_1/e_step/samples.jsonl")
    assert len(rows) == 2 * 2  # 2 prompts x 2 samples
    assert all(1 <= len(r["response_ids"]) <= 8 for r in rows)
    assert sum(any(c.isalpha() for c in r["text"]) for r in rows) >= 3  # SmolLM2 answers in words
    # r0's labels: every prompt gave a gold pair or a tie (8-token answers often satisfy the same instructions)
    base = run.summary("base_rm")
    assert base["pairs"] + base["tied_pairs_skipped"] == 2 and base["trained_pairs"] == base["pairs"]
    losses = {r["phase"]: r["train"]["loss"] for r in run.metrics() if "train" in r}
    assert {"iter_1/e_step", "iter_1/m_step"} <= set(losses) and all(map(math.isfinite, losses.values()))
    assert run.summary("iter_1/e_step")["trained_pairs"] == 2 and run.summary("iter_1/m_step")["trained_pairs"] >= 1
    # π_1 is SmolLM2 moved by one DPO step (AdamW at lr 1e-5: each weight by about 1e-5)
    _, base_params, _ = smollm2
    trained = run.load_params("iter_1/policy")
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
             for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(base_params), strict=True)]
    assert all(np.isfinite(moved)) and 0 < max(moved) < 1e-3
