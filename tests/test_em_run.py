"""The EM driver end to end on the `tiny` preset: phases, artifacts, resume, ablation switches, export."""

import json
import sys
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
import tracking_files
from conftest import tiny_config

from mtjax import em, stored_samples
from mtjax.em import MutualTaught

PHASES = ["prompts", "base_rm", "iter_0/eval", "iter_1/e_step", "iter_1/m_step", "iter_1/eval",
          "iter_2/e_step", "iter_2/m_step", "iter_2/eval"]


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def trees_differ(a, b) -> bool:
    return any(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), a, b)))


def without_timings(results):
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in results]


@pytest.fixture(scope="module")
def reference_run(tiny_run):
    return tiny_run


def test_tiny_run_writes_every_phase_and_artifact(reference_run):
    run, results = reference_run
    rd = run.rd
    assert rd.completed() == PHASES
    assert [r["iteration"] for r in results] == [0, 1, 2]
    for t in (1, 2):
        for name in ("policy", "reward_model"):
            assert rd.file(f"iter_{t}/{name}").is_dir()
        assert rd.read_jsonl(f"iter_{t}/e_step/samples.jsonl")
        assert json.loads(rd.file(f"eval/iter_{t}.json").read_text())["iteration"] == t
    # Every E-step prompt is accounted for: a pair, or a counted reason for having none.
    cfg = run.cfg
    for t in (1, 2):
        summary = rd.summary(f"iter_{t}/e_step")
        skipped = sum(v for k, v in summary.items() if k.startswith("skipped_"))
        assert summary["pairs"] + skipped == cfg.prompts.policy[t - 1]
        assert len(rd.read_jsonl(f"iter_{t}/e_step/pairs.jsonl")) == summary["pairs"]
        assert summary["wall_seconds"] > 0
    # The models moved: DPO changed π, Bradley-Terry changed r.
    pi1, r1 = run.params_at(1)
    pi0, r0 = run.params_at(0)
    assert trees_differ(pi0, pi1) and trees_differ(r0, r1)
    # metrics.jsonl: per-step training lines, all tagged with their iteration and phase.
    rows = rd.metrics()
    assert all(isinstance(r["iteration"], int) and "phase" in r for r in rows)
    assert any(r["phase"] == "iter_1/e_step" and "loss" in r.get("train", {}) for r in rows)
    assert any(r["phase"] == "iter_2/m_step" and "accuracy" in r.get("train", {}) for r in rows)


def test_report_and_summary_table_render(reference_run):
    from mtjax.report import write_report
    from mtjax.run import summary_table

    run, _ = reference_run
    report = write_report(run.rd.path)
    assert report["plots"] and all(p.stat().st_size > 0 for p in report["plots"])
    table = summary_table(report["table"])
    assert "policy/gold_reward" in table and "iter 2" in table


def _interrupting(monkeypatch, phase: str, step: int, exc: BaseException) -> None:
    """Makes the run's metrics logger raise `exc` right after logging training step `step` of `phase`."""
    real_log = MutualTaught.log

    def log(self, name):
        inner = real_log(self, name)

        def row_then_raise(row):
            inner(row)
            if name == phase and row.get("step") == step:
                raise exc
        return row_then_raise
    monkeypatch.setattr(MutualTaught, "log", log)


def _train_rows(rd, phase: str) -> dict[int, dict]:
    """step -> its training metrics row (the last one logged: a resumed phase may log a step again)."""
    return {r["step"]: r["train"] for r in rd.metrics() if r.get("phase") == phase and "train" in r}


def test_resume_after_interruptions_equals_uninterrupted_run(reference_run, tmp_path, monkeypatch):
    """A crash in the middle of iteration 1's RM training (resumed from the periodic train-state save,
    the M-step's stored samples reused) and Ctrl-C in the middle of iteration 2's DPO (saved on the
    spot); each rerun continues where the last left off and ends with the same models, metrics and
    per-step training rows as an uninterrupted run."""
    ref_run, ref_results = reference_run
    workdir = str(tmp_path / "resumed")
    rm_steps = ref_run.rd.summary("iter_1/m_step")["steps"]
    dpo_steps = ref_run.rd.summary("iter_2/e_step")["steps"]
    assert rm_steps >= 2 and dpo_steps >= 2  # so that each interruption lands mid-phase

    def config(every_steps: int):
        cfg = tiny_config()
        cfg.checkpoint.update(train_every_steps=every_steps, train_every_seconds=0.0)  # operational: resumable
        return cfg

    # 1. A crash right after the last RM step was logged: saves came after every earlier step.
    with monkeypatch.context() as m:
        _interrupting(m, "iter_1/m_step", rm_steps, RuntimeError("simulated crash"))
        run = MutualTaught(config(every_steps=1), workdir)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run.run()
    assert run.rd.completed() == PHASES[:4]
    assert run.rd.file("iter_1/m_step/new_policy_samples.jsonl").exists()  # kept for the rerun
    assert run.train_checkpoint("iter_1/m_step").latest_step() == rm_steps - 1

    # 2. Ctrl-C after DPO step 1 of iteration 2, no periodic saves: the interrupt itself saves the state.
    with monkeypatch.context() as m:
        _interrupting(m, "iter_2/e_step", 1, KeyboardInterrupt())
        run = MutualTaught(config(every_steps=0), workdir)
        with pytest.raises(KeyboardInterrupt):
            run.run()
    assert run.rd.completed() == PHASES[:6]
    assert not run.rd.file("iter_1/m_step/train_state").exists()  # removed once its phase was recorded
    assert run.train_checkpoint("iter_2/e_step").latest_step() == 1

    run = MutualTaught(tiny_config(), workdir)
    results = run.run()
    assert without_timings(results) == without_timings(ref_results)
    for t in (1, 2):
        for mine, ref in zip(run.params_at(t), ref_run.params_at(t), strict=True):
            assert_trees_equal(mine, ref)
    for phase in ("iter_1/m_step", "iter_2/e_step"):
        assert _train_rows(run.rd, phase) == _train_rows(ref_run.rd, phase)
        assert {k: v for k, v in run.rd.summary(phase).items() if k != "wall_seconds"} == \
            {k: v for k, v in ref_run.rd.summary(phase).items() if k != "wall_seconds"}
    assert not list(run.rd.path.glob("**/train_state"))
    # Resumed, not redone: only the step logged after the last save was logged (and trained) twice.
    logged = Counter(r["step"] for r in run.rd.metrics() if r.get("phase") == "iter_1/m_step" and "train" in r)
    assert logged == {**{s: 1 for s in range(1, rm_steps)}, rm_steps: 2}
    logged = Counter(r["step"] for r in run.rd.metrics() if r.get("phase") == "iter_2/e_step" and "train" in r)
    assert logged == {s: 1 for s in range(1, dpo_steps + 1)}
    # Tracking across the three processes: global steps continue, each (re)run writes its own event file,
    # and together the event files hold every scalar of metrics.jsonl once, at its step.
    rows = run.rd.metrics()
    assert [r["global_step"] for r in rows] == list(range(1, len(rows) + 1))
    files = tracking_files.event_files(run.rd.file("tensorboard"))
    assert len(files) == 3
    steps = [step for events in files for step in sorted({e[0] for e in events})]
    assert steps == sorted(set(steps))  # strictly increasing from file to file: no step twice
    events = {(step, tag): value for file in files for step, tag, value in file}
    expected = tracking_files.jsonl_scalars(rows)
    assert events.keys() == expected.keys()
    assert all(tracking_files.same_float32(events[k], v) for k, v in expected.items())


def test_scanned_fused_models_resume_mid_dpo_like_an_uninterrupted_run(tmp_path, monkeypatch):
    """With `scan_layers` (stacked params, optimizer state and KV cache) and the fused attention call
    (`attention_impl="xla"`, cuDNN's arguments): Ctrl-C in the middle of iteration 1's DPO saves the train
    state, and the rerun ends with the policy and per-step rows of an uninterrupted run. Only the first
    E-step runs (no r0 training), to keep the test short."""
    cfg = tiny_config()
    cfg.base_rm.enabled = False  # r0 = the seeded head: the E-step still scores with the scanned, fused RM
    for section in (cfg.policy, cfg.reward_model):
        section.update(scan_layers=True, attention_impl="xla")

    def first_e_step(workdir):
        run = MutualTaught(cfg, workdir)
        return run, run.e_step(1, run.models.policy_params, run.base_reward_model())

    reference, ref_policy = first_e_step(str(tmp_path / "reference"))
    assert "layers" in ref_policy["model"]  # stacked, not layers_0, layers_1, ...
    steps = reference.rd.summary("iter_1/e_step")["steps"]
    assert steps >= 2
    workdir = str(tmp_path / "resumed")
    with monkeypatch.context() as m:
        _interrupting(m, "iter_1/e_step", 1, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            first_e_step(workdir)
    run, policy = first_e_step(workdir)
    assert_trees_equal(policy, ref_policy)
    assert _train_rows(run.rd, "iter_1/e_step") == _train_rows(reference.rd, "iter_1/e_step")
    logged = Counter(r["step"] for r in run.rd.metrics() if r.get("phase") == "iter_1/e_step" and "train" in r)
    assert logged == {s: 1 for s in range(1, steps + 1)}  # resumed after step 1, not redone


def test_an_interrupted_sampling_pass_resumes_with_the_next_piece(tmp_path, monkeypatch):
    """Ctrl-C in the second of three pieces of a sampling pass: the rerun samples only the pieces left and
    stores what an uninterrupted pass stores."""
    cfg = tiny_config()
    cfg.checkpoint.sample_every_prompts = 2
    run = MutualTaught(cfg, str(tmp_path / "run"))
    policy, rm = run.models.policy_params, run.models.reward_init_params
    assert len(run.prompt_ids("policy_1")) == 6
    real, pieces = em.sample_responses, []

    def recorded(interrupt_at: int | None):
        def sample(*args, **kwargs):
            pieces.append(kwargs["first_prompt_index"])
            if len(pieces) == interrupt_at:
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return sample

    def sample_pass():
        return run.samples("iter_1/e_step", "samples", policy, "policy_1", 3, rm_params=rm)

    with monkeypatch.context() as m:
        m.setattr(stored_samples, "sample_responses", recorded(interrupt_at=2))
        with pytest.raises(KeyboardInterrupt):
            sample_pass()
    assert len(run.rd.read_jsonl("iter_1/e_step/samples.partial.jsonl")) == 2 * 3  # the first piece's rows
    pieces.clear()
    with monkeypatch.context() as m:
        m.setattr(stored_samples, "sample_responses", recorded(interrupt_at=None))
        resumed = sample_pass()
    assert pieces == [2, 4]
    assert not run.rd.file("iter_1/e_step/samples.partial.jsonl").exists()
    rows = run.rd.read_jsonl("iter_1/e_step/samples.jsonl")
    run.rd.file("iter_1/e_step/samples.jsonl").unlink()
    assert sample_pass() == resumed and run.rd.read_jsonl("iter_1/e_step/samples.jsonl") == rows


def test_changed_config_is_refused(reference_run):
    from mtjax.rundir import ConfigMismatchError

    run, _ = reference_run
    with pytest.raises(ConfigMismatchError, match=r"dpo\.beta"):
        cfg = tiny_config()
        cfg.dpo.beta = 0.5
        MutualTaught(cfg, str(run.rd.path))


@pytest.mark.parametrize("rm_update", ["frozen", "contrastive_only"])
def test_ablation_switches_change_exactly_their_data(rm_update, tmp_path):
    cfg = tiny_config(rm_update=rm_update)
    cfg.iterations = 1
    cfg.prompts.policy = (6,)
    run = MutualTaught(cfg, str(tmp_path))
    run.run()
    if rm_update == "frozen":  # iterative DPO: the RM is never trained after r0
        assert "iter_1/m_step" not in run.rd.completed()
        assert_trees_equal(run.params_at(1)[1], run.params_at(0)[1])
    else:  # contrastive pairs only: no self-training (D(PM)) pairs
        assert run.rd.file("iter_1/m_step/contrastive_pairs.jsonl").exists()
        assert not run.rd.file("iter_1/m_step/self_pairs.jsonl").exists()
        assert "self_pairs" not in run.rd.summary("iter_1/m_step")


def test_export_loads_in_transformers(reference_run, tmp_path):
    import torch
    import transformers

    from mtjax.export import export_iteration

    run, _ = reference_run
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rd.path.rglob("*")}
    paths = export_iteration(run.rd.path, 2, tmp_path)
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rd.path.rglob("*")} == before  # read only
    policy, reward = run.params_at(2)
    ids = np.asarray([run.prompt_ids("heldout_eval")[0]], np.int32)
    hf_policy = transformers.AutoModelForCausalLM.from_pretrained(paths["policy"], torch_dtype=torch.float32)
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(paths["reward_model"],
                                                                            torch_dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf_policy(torch.from_numpy(ids).long()).logits.numpy()
        hf_reward = hf_rm(torch.from_numpy(ids).long()).logits[:, 0].numpy()
    ours = run.models.policy.apply({"params": policy}, ids)
    np.testing.assert_allclose(np.asarray(ours), hf_logits, atol=1e-4)
    np.testing.assert_allclose(np.asarray(run.models.reward.apply({"params": reward}, ids)), hf_reward, atol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--config.sampling.no_such_key=3"], "unknown config key"),
    (["--config.sampling.top_p=1.5", "--config.iterations=0"], "sampling.top_p must be in (0, 1], got 1.5"),
    (["--config.sampling.top_p=abc"], "could not convert string to float"),
])
def test_cli_rejects_bad_config_with_one_clear_message(args, message, tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "mtjax.run", "--config=configs/mt.py:tiny",
                           f"--workdir={tmp_path}", *args], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "phases.json").exists()  # nothing ran


def test_checkpoint_gate_continues_from_the_kept_policy(tmp_path):
    """With τ = 1 the gate (almost surely) rejects π_1; iteration 2 must then sample from the kept policy."""
    cfg = tiny_config(gate_win_rate=1.0)
    run = MutualTaught(cfg, str(tmp_path))
    run.run()
    gate_1 = run.rd.summary("iter_1/gate")
    assert gate_1["accepted"] == (gate_1["win_rate"] >= 1.0) and gate_1["against_iteration"] == 0
    kept = 1 if gate_1["accepted"] else 0
    assert run.rd.summary("iter_2/gate")["against_iteration"] == kept
    stored = run.sample_rows("iter_2/e_step/samples.jsonl", "policy_2")
    again = em.sample_responses(run.models, run.params_at(kept)[0], run.prompt_ids("policy_2"),
                                cfg.sampling.num_samples, run.sampling, run._seed("iter_2/e_step/samples.jsonl"),
                                run.mesh)
    assert [[tuple(r["response_ids"]) for r in g] for g in stored] == [[s.ids for s in g] for g in again]


def test_evaluation_scores_the_sampled_tokens_not_a_text_round_trip(reference_run):
    """A truncated response has no EOS; re-tokenising its text would append one and change the reward."""
    run, _ = reference_run
    row = next(r for r in run.rd.read_jsonl("iter_1/eval/samples.jsonl") if not r["stopped"])
    i = list(run.splits["heldout_eval"]["prompt_id"]).index(row["prompt_id"])
    prompt_text, prompt_ids = run.splits["heldout_eval"]["prompt"][i], run.prompt_ids("heldout_eval")[i]
    _, rm = run.params_at(1)
    known = {(prompt_text, row["text"]): (prompt_ids, row["response_ids"])}
    on_ids = run.scorer.score_ids(rm, [prompt_text], [prompt_ids], [row["response_ids"]])
    np.testing.assert_array_equal(run.text_score_fn(rm, known)([prompt_text], [row["text"]]), on_ids)
    round_trip = run.text_score_fn(rm, {})([prompt_text], [row["text"]])
    assert not np.array_equal(round_trip, on_ids)


@pytest.mark.parametrize("arm", ["frozen_with_rm_prompts", "offline"])
def test_baseline_arms_share_the_base_phases_and_see_every_prompt(arm, reference_run, tmp_path):
    """The ablation arms start from the mutual run's prompts, r0 and iteration-0 evaluation, and the
    RM-frozen baselines train the policy on the RM's prompts too (as in the paper)."""
    ref, _ = reference_run
    if arm == "offline":
        cfg = tiny_config(rm_update="frozen", schedule="offline")
    else:
        cfg = tiny_config(rm_update="frozen", policy_prompts="with_rm")
    # every shared phase the reference ran (it has no `sft` phase: π0 is the policy source)
    assert em.share_base_phases(str(ref.rd.path), cfg, str(tmp_path)) == ["prompts", "base_rm", "iter_0/eval"]
    run = MutualTaught(cfg, str(tmp_path))
    run.run()
    p = cfg.prompts
    if arm == "offline":  # one round on D_1 ∪ D_2 ∪ D_R
        assert run.rd.completed() == PHASES[:4] + ["iter_1/eval"]
        expected = {1: sum(p.policy) + p.reward_model}
    else:  # D_t plus half of D_R each
        assert "iter_1/m_step" not in run.rd.completed() and "iter_2/eval" in run.rd.completed()
        expected = {1: p.policy[0] + p.reward_model // 2, 2: p.policy[1] + p.reward_model - p.reward_model // 2}
    for t, n in expected.items():
        summary = run.rd.summary(f"iter_{t}/e_step")
        assert summary["pairs"] + sum(v for k, v in summary.items() if k.startswith("skipped_")) == n
    assert_trees_equal(run.params_at(0)[1], ref.params_at(0)[1])  # the same r0, not retrained
    assert run.rd.summary("base_rm") == ref.rd.summary("base_rm")
    assert [r for r in run.rd.metrics() if r["phase"] == "base_rm"] == \
        [r for r in ref.rd.metrics() if r["phase"] == "base_rm"]


def test_sharing_phases_refuses_a_config_differing_outside_mt(reference_run, tmp_path):
    from mtjax.rundir import ConfigMismatchError

    ref, _ = reference_run
    cfg = tiny_config(rm_update="frozen")
    cfg.dpo.beta = 0.5
    with pytest.raises(ConfigMismatchError, match=r"dpo\.beta"):
        em.share_base_phases(str(ref.rd.path), cfg, str(tmp_path))
