"""Reliability of a run on the `tiny` preset (issue 17): every case ends in an exact resume or in one line
naming the file or setting, with nothing lost and nothing wrong saved.

The tests start from copies of one finished run (`tiny_run`), cut back to a phase or damaged, so that
only the phases concerned run again."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from test_em_run import PHASES, assert_trees_equal, without_timings

from mtjax import em, stored_samples, train
from mtjax.divergence import DivergenceError
from mtjax.em import MutualTaught
from mtjax.rundir import RunDir, RunDirError

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def reference(tiny_run):
    return tiny_run


def copy_run(reference, tmp_path, keep: int | None = None) -> Path:
    """A copy of the finished reference run; with `keep`, cut back to its first `keep` phases (the later
    phases' records and artifacts removed, as if the run had stopped there)."""
    run, _ = reference
    path = tmp_path / "run"
    shutil.copytree(run.rd.path, path)
    if keep is not None:
        record = json.loads((path / "phases.json").read_text())
        for entry in record["phases"][keep:]:
            for rel in entry["artifacts"]:
                target = path / rel
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        record["phases"] = record["phases"][:keep]
        (path / "phases.json").write_text(json.dumps(record))
        (path / "summary.json").unlink()
    return path


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def train_rows(rd: RunDir, phase: str) -> int:
    return sum(1 for r in rd.metrics() if r.get("phase") == phase and "train" in r)


# ----------------------------------------------------------------------------- damaged or missing artifacts


def test_a_deleted_evaluation_is_regenerated(reference, tmp_path, capsys):
    ref, _ = reference
    path = copy_run(reference, tmp_path)
    (path / "eval/iter_1.json").unlink()
    run = MutualTaught(tiny_config(), str(path))
    assert "eval/iter_1.json is missing; redoing iter_1/eval" in capsys.readouterr().out
    assert "iter_1/eval" not in run.rd.completed()
    run.run()
    assert run.rd.completed() == PHASES  # in place: the record keeps the phases' order
    assert run.rd.read_json("eval/iter_1.json") == ref.rd.read_json("eval/iter_1.json")
    from mtjax.report import load_run_metrics

    table = load_run_metrics(path)
    assert table[1]["policy/gold_reward"] == load_run_metrics(ref.rd.path)[1]["policy/gold_reward"]


def test_a_damaged_checkpoint_redoes_its_phase_and_the_phases_that_depend_on_it(reference, tmp_path, capsys):
    ref, ref_results = reference
    path = copy_run(reference, tmp_path)
    data = max((p for p in (path / "iter_2/reward_model").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(b"\0" * data.stat().st_size)  # same size, zeroed: only the checksum sees it
    run = MutualTaught(tiny_config(), str(path))
    out = capsys.readouterr().out
    assert "iter_2/reward_model has changed (same size, different contents); redoing iter_2/m_step" in out
    assert "iter_2/eval wait for iter_2/m_step" in out
    assert run.rd.completed() == PHASES[:7]
    results = run.run()
    assert "iter_2/eval will be redone: iter_2/m_step wrote different outputs" in capsys.readouterr().out
    assert without_timings(results) == without_timings(ref_results)
    assert_trees_equal(run.params_at(2)[1], ref.params_at(2)[1])
    assert train_rows(run.rd, "iter_1/m_step") == train_rows(ref.rd, "iter_1/m_step")  # iteration 1 untouched


def test_a_truncated_prompt_file_is_regenerated_and_nothing_else_is_redone(reference, tmp_path, capsys):
    ref, _ = reference
    path = copy_run(reference, tmp_path)
    prompts = path / "prompts/policy_1.jsonl"
    written = sum(f.stat().st_size for f in (path / "prompts").iterdir())
    cut = prompts.stat().st_size - 700
    prompts.write_bytes(prompts.read_bytes()[:700])
    run = MutualTaught(tiny_config(), str(path))
    out = capsys.readouterr().out
    assert f"/prompts has changed ({written - cut} bytes, {written} when written); redoing prompts" in out
    assert out.count("is kept: prompts wrote the same outputs again") == len(PHASES) - 1
    assert run.rd.completed()[1:] == PHASES[1:] and run.rd.check_artifacts() == []
    assert prompts.read_bytes() == (ref.rd.path / "prompts/policy_1.jsonl").read_bytes()


def test_a_missing_config_json_is_refused_not_rewritten(reference, tmp_path):
    path = copy_run(reference, tmp_path, keep=5)
    (path / "config.json").unlink()
    cfg = tiny_config()
    cfg.dpo.beta = 0.5
    with pytest.raises(RunDirError, match="config.json is missing, but .*phases.json records phases"):
        MutualTaught(cfg, str(path))
    assert not (path / "config.json").exists()
    cfg.dpo.beta = tiny_config().dpo.beta
    with pytest.raises(RunDirError, match="config.json is missing"):  # even with the same config: restore it
        MutualTaught(cfg, str(path))


def test_a_changed_setting_a_finished_phase_used_is_refused(reference, tmp_path):
    from mtjax.rundir import ConfigMismatchError

    path = copy_run(reference, tmp_path, keep=5)  # iteration 1's DPO is done
    cfg = tiny_config()
    cfg.dpo.beta = 0.5
    with pytest.raises(ConfigMismatchError, match=r"dpo\.beta: 0\.1 -> 0\.5 \(used by iter_1/e_step"):
        MutualTaught(cfg, str(path))


# ----------------------------------------------------------------------------- divergence


def test_a_diverging_phase_stops_saves_nothing_and_resumes_with_a_lower_learning_rate(reference, tmp_path, capsys):
    ref, ref_results = reference
    path = copy_run(reference, tmp_path, keep=3)  # prompts, r0 and iteration 0's evaluation are done
    cfg = tiny_config()
    cfg.dpo.learning_rate = 1e6  # finite (an infinite one is refused by the config check before any work)
    run = MutualTaught(cfg, str(path))
    with pytest.raises(DivergenceError) as caught:
        run.run()
    message = str(caught.value)
    assert message.startswith("iter_1/e_step: training diverged at step 1 of ")
    assert "Lower dpo.learning_rate (now 1000000.0) and rerun the same command: the phase resumes from its " \
           "start" in message
    assert not (path / "iter_1/policy").exists() and not (path / "iter_1/e_step/train_state").exists()
    assert run.rd.completed() == PHASES[:3] and run.rd.in_flight() == ["iter_1/e_step"]

    run = MutualTaught(tiny_config(), str(path))  # the corrected value: accepted, the samples are kept
    assert "config changes accepted (no finished phase used them): dpo.learning_rate: 1000000.0 -> 0.001" in \
        capsys.readouterr().out
    assert run.rd.file("iter_1/e_step/samples.jsonl").exists()
    results = run.run()
    assert without_timings(results) == without_timings(ref_results)
    for t in (1, 2):
        for mine, theirs in zip(run.params_at(t), ref.params_at(t), strict=True):
            assert_trees_equal(mine, theirs)


def test_finite_but_absurd_weights_are_caught_at_the_first_step(reference, tmp_path):
    path = copy_run(reference, tmp_path, keep=4)
    cfg = tiny_config()
    cfg.rm.learning_rate = 1e6
    run = MutualTaught(cfg, str(path))
    with pytest.raises(DivergenceError, match=r"iter_1/m_step: training diverged at step 1 of \d+: one step scaled "
                                              r"the norm of the weights by [0-9.e+]+ .*Lower rm\.learning_rate"):
        run.run()
    assert not (path / "iter_1/reward_model").exists()


def test_a_divergence_mid_phase_resumes_from_the_last_good_state(reference, tmp_path, monkeypatch):
    """Step 2 of iteration 1's RM training gives a NaN loss once (saves after every step): the phase stops
    with step 1 saved, and the rerun continues from it to the same reward model as an uninterrupted run."""
    ref, _ = reference
    path = copy_run(reference, tmp_path, keep=4)
    cfg = tiny_config()
    cfg.checkpoint.update(train_every_steps=1, train_every_seconds=0.0)
    run = MutualTaught(cfg, str(path))
    pi0 = run.models.policy_params
    pi1 = run.rd.load_params("iter_1/policy", like=pi0)
    r0 = run.rd.load_params("base_rm/reward_model", like=run.models.reward_init_params)
    real_make = train.make_reward_model_step

    def make_step(*args, **kwargs):
        step, calls = real_make(*args, **kwargs), []

        def nan_at_step_2(state, batch):
            state, metrics = step(state, batch)
            calls.append(1)
            return state, ({**metrics, "loss": metrics["loss"] * np.nan} if len(calls) == 2 else metrics)
        return nan_at_step_2

    with monkeypatch.context() as m:
        m.setattr(train, "make_reward_model_step", make_step)
        with pytest.raises(DivergenceError, match=r"step 2 of .*: the loss is nan\. .*its last good state \(step 1\)"):
            run.m_step(1, pi0, pi1, r0, r0)
    assert run.train_checkpoint("iter_1/m_step").latest_step() == 1
    rm1 = run.m_step(1, pi0, pi1, r0, r0)
    assert_trees_equal(rm1, ref.rd.load_params("iter_1/reward_model", like=r0))
    assert {k: v for k, v in run.rd.summary("iter_1/m_step").items() if k != "wall_seconds"} == \
        {k: v for k, v in ref.rd.summary("iter_1/m_step").items() if k != "wall_seconds"}


# ----------------------------------------------------------------------------- partial samples


def test_a_partial_samples_file_keeps_whole_prompts_only(reference, tmp_path, monkeypatch, capsys):
    path = copy_run(reference, tmp_path, keep=3)
    cfg = tiny_config()
    cfg.checkpoint.sample_every_prompts = 2
    run = MutualTaught(cfg, str(path))
    policy, rm = run.models.policy_params, run.models.reward_init_params
    real, calls = em.sample_responses, []

    def interrupted_at_second_piece(*args, **kwargs):
        calls.append(kwargs["first_prompt_index"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(stored_samples, "sample_responses", interrupted_at_second_piece)
        with pytest.raises(KeyboardInterrupt):
            run.samples("iter_1/e_step", "samples", policy, "policy_1", 3, rm_params=rm)
    partial = run.rd.file("iter_1/e_step/samples.partial.jsonl")
    lines = partial.read_text().splitlines()
    assert len(lines) == 6  # 2 prompts x 3 samples
    partial.write_text("\n".join(lines[:4] + lines[5:]) + "\n")  # one row of the second prompt removed
    run.samples("iter_1/e_step", "samples", policy, "policy_1", 3, rm_params=rm)
    assert "row 5 is not sample 1 of prompt 1; keeping the first 1 whole prompts" in capsys.readouterr().out
    rows = run.rd.read_jsonl("iter_1/e_step/samples.jsonl")
    ids = list(run.splits["policy_1"]["prompt_id"])
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [(pid, k) for pid in ids for k in range(3)]
    assert [json.loads(line) for line in lines[:3]] == rows[:3]  # the whole prompt was kept as it was


# ----------------------------------------------------------------------------- read-only tools


def test_export_refuses_what_the_run_has_not_produced_and_writes_nothing(reference, tmp_path):
    from mtjax.export import export_iteration

    ref, _ = reference
    started = tmp_path / "killed_during_start_up"  # only config.json was written
    started.mkdir()
    shutil.copy(ref.rd.path / "config.json", started / "config.json")
    with pytest.raises(ValueError, match=r"the base reward model r0 is not trained yet in .*finished phases: none"):
        export_iteration(started, 0, tmp_path / "out0")
    assert [p.name for p in started.iterdir()] == ["config.json"]
    half = copy_run(reference, tmp_path, keep=4)  # iteration 1's E-step done, its M-step not
    before = snapshot(half)
    with pytest.raises(ValueError, match=r"iteration 1 has no reward model yet"):
        export_iteration(half, 1, tmp_path / "out1")
    assert snapshot(half) == before


def test_report_writes_only_when_asked(reference, tmp_path, capsys):
    from mtjax import report

    path = copy_run(reference, tmp_path)
    shutil.rmtree(path / "report", ignore_errors=True)
    before = snapshot(path)
    report.main([str(path)])
    assert "policy/gold_reward" in capsys.readouterr().out and snapshot(path) == before
    report.main([str(path), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report/report.md").exists() and snapshot(path) == before


def test_the_reference_logprob_cache_refuses_other_values(tmp_path, capsys):
    values = {"reference_chosen_logps": np.arange(4, dtype=np.float32),
              "reference_rejected_logps": -np.arange(4, dtype=np.float32)}
    train.ReferenceLogprobCache(tmp_path).put("k1", values)
    cached = train.ReferenceLogprobCache(tmp_path).get("k1")
    np.testing.assert_array_equal(cached["reference_chosen_logps"], values["reference_chosen_logps"])
    file = tmp_path / "reference_logps_k1.npz"
    np.savez(file, reference_chosen_logps=np.ones(4, np.float32), reference_rejected_logps=np.ones(4, np.float32))
    assert train.ReferenceLogprobCache(tmp_path).get("k1") is None  # other values of the same shape
    train.ReferenceLogprobCache(tmp_path).put("k2", values)
    shutil.copy(tmp_path / "reference_logps_k2.npz", file)  # a valid file, for another key
    assert train.ReferenceLogprobCache(tmp_path).get("k1") is None
    assert capsys.readouterr().out.count("does not match its checksum (damaged or replaced); recomputing") == 2


def test_batch_sizes_that_do_not_split_over_the_mesh_are_refused_before_anything_is_written(tmp_path):
    cfg = tiny_config()
    cfg.mesh.data = 8  # the 8 simulated devices
    cfg.dpo.batch_size, cfg.base_rm.batch_size = 4, 8
    cfg.rm.update(batch_size=16, num_micro_batches=4)
    with pytest.raises(ValueError) as err:
        MutualTaught(cfg, str(tmp_path / "run"))
    message = str(err.value)
    assert "dpo.batch_size=4 in dpo.num_micro_batches=1: each micro-batch must be a whole multiple of the " \
           "data*fsdp mesh size 8 (data=8 x fsdp=1 of 8 devices); use a multiple of 8" in message
    assert "rm.batch_size=16 in rm.num_micro_batches=4" in message and "use a multiple of 32" in message
    assert "base_rm." not in message and not (tmp_path / "run").exists()
    cfg.mt.rm_update = "frozen"  # a section the run does not use is not checked
    cfg.dpo.batch_size = 8
    MutualTaught(cfg, str(tmp_path / "run"))


def test_a_batch_that_does_not_split_into_its_micro_batches_is_named_as_such():
    from mtjax.em import check_batches_fit_mesh
    from mtjax.sharding import make_mesh

    cfg = tiny_config()
    cfg.dpo.update(batch_size=6, num_micro_batches=4)
    with pytest.raises(ValueError, match=r"^dpo.batch_size=6 in dpo.num_micro_batches=4: the batch does not split "
                                         r"into 4 equal micro-batches; use a multiple of 4 or fewer micro-batches$"):
        check_batches_fit_mesh(cfg, make_mesh(data=1))


# ----------------------------------------------------------------------------- the command line


# Phases long enough that the first run is still inside one when the second run has started and been refused
# (a tiny run can otherwise finish in the seconds a loaded machine takes to start the second interpreter).
_LONG_PHASES = tuple(f"--config.{name}.epochs=100000" for name in ("base_rm", "dpo", "rm"))


def _cli(workdir: Path, logs: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mtjax.run", "--config=configs/mt.py:tiny", f"--workdir={workdir}",
         f"--compilation_cache={logs / 'xla_cache'}", *_LONG_PHASES],
        cwd=REPO, stdout=open(logs / f"{name}.out", "w"), stderr=open(logs / f"{name}.err", "w"),
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)})


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, f"gave up waiting (exit {proc.poll()})"
        time.sleep(0.2)


def _last_line(text: str) -> str:
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-1]


def test_cli_one_run_per_workdir_and_signals_end_with_one_line(tmp_path):
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    first = _cli(workdir, logs, "first")
    try:
        _wait_for(lambda: "prompts" in RunDir.open_read_only(workdir).completed()
                  if (workdir / "phases.json").exists() else False, first)
        second = _cli(workdir, logs, "second")
        assert second.wait(timeout=300) == 1
        err = (logs / "second.err").read_text()
        assert f"is in use by another run (pid {first.pid} on host" in err and "Traceback" not in err
        first.send_signal(signal.SIGTERM)  # inside a phase (r0's sampling or training, or a later one)
        assert first.wait(timeout=300) == 143
    finally:
        first.kill()
    err = (logs / "first.err").read_text()
    assert "Traceback" not in err and "Exception ignored" not in err
    assert "(SIGTERM)" in _last_line(err) and _last_line(err).endswith("rerun the same command to resume.")

    # Ctrl-C during start-up (the models are loading) stops the run too, with one line.
    third = _cli(workdir, logs, "third")
    try:
        _wait_for(lambda: "(mtjax.arms), preset" in (logs / "third.out").read_text(), third)
        third.send_signal(signal.SIGINT)
        assert third.wait(timeout=120) == 130
    finally:
        third.kill()
    err = (logs / "third.err").read_text()
    assert "Traceback" not in err and "Exception ignored" not in err
    assert _last_line(err).startswith("mtjax: stopped (SIGINT)")
