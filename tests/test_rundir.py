"""Run directory: config record and guard, phase markers, artifact checksums and repair, atomic files,
errors that name the file, metrics repair, Orbax round trip."""

import errno
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax.divergence import DivergenceError
from mtjax.rundir import ConfigMismatchError, RunDir, RunDirError, read_jsonl

CONFIG = {"seed": 0, "model": {"lr": 1e-6}, "train": {"lr": 1e-3}}


def finished(tmp_path, *phases, config=CONFIG, independent_of=("train",)):
    """A run directory in which `phases` finished (each writing one artifact, PHASE/out.jsonl)."""
    run = RunDir(tmp_path, config)
    for name in phases:
        run.start_phase(name, independent_of)
        run.write_jsonl(f"{name}/out.jsonl", [{"phase": name}])
        run.mark_done(name, {"rows": 1})
    return run


def test_phases_persist_across_reopen(tmp_path):
    run = RunDir(tmp_path, {"seed": 0, "model": {"lr": 1e-6}})
    assert run.completed() == []
    run.write_jsonl("iter_1/pairs.jsonl", [{"a": 1}, {"a": 2}])
    run.mark_done("iter_1/e_step", {"pairs": 2, "skipped": 0})
    again = RunDir(tmp_path, {"model": {"lr": 1e-6}, "seed": 0})  # key order does not matter
    assert again.done("iter_1/e_step") and not again.done("iter_1/m_step")
    assert again.summary("iter_1/e_step") == {"pairs": 2, "skipped": 0}
    assert again.read_jsonl("iter_1/pairs.jsonl") == [{"a": 1}, {"a": 2}]
    again.log_metrics({"iteration": 1, "loss": 0.5})
    assert again.metrics() == [{"iteration": 1, "loss": 0.5}]
    assert not list(tmp_path.rglob(".*tmp*"))  # no temp files left behind


def test_a_change_is_refused_only_where_a_finished_phase_used_it(tmp_path):
    finished(tmp_path, "first")  # independent of the `train` section
    with pytest.raises(ConfigMismatchError, match=r"model\.lr: 1e-06 -> 2e-06 \(used by first\)"):
        RunDir(tmp_path, {**CONFIG, "model": {"lr": 2e-6}})
    # A section no finished phase used may change (e.g. a learning rate that made training diverge) ...
    run = RunDir(tmp_path, {**CONFIG, "train": {"lr": 1e-4}})
    assert [str(c) for c in run.accepted_changes] == ["train.lr: 0.001 -> 0.0001"]
    assert json.loads((tmp_path / "config.json").read_text())["train"] == {"lr": 1e-4}
    assert run.config["train"] == {"lr": 1e-4}  # the record follows
    # ... and so may how the run saves its work and where it reports; a new section counts as used
    # (conservative).
    RunDir(tmp_path, {**CONFIG, "train": {"lr": 1e-4}, "checkpoint": {"train_every_steps": 5}})
    RunDir(tmp_path, {**CONFIG, "train": {"lr": 1e-4}, "logging": {"wandb": True}})
    with pytest.raises(ConfigMismatchError, match=r"reward: '<absent>' -> \{'beta': 2\}"):
        RunDir(tmp_path, {**CONFIG, "train": {"lr": 1e-4}, "reward": {"beta": 2}})
    RunDir(tmp_path, {**CONFIG, "model": {"lr": 2e-6}}, allow_config_change=True)  # --override_config


def test_any_change_is_accepted_before_a_phase_finished(tmp_path):
    """A run directory whose run failed before finishing a phase (a bad value) resumes with the fixed value."""
    run = RunDir(tmp_path, CONFIG)
    run.start_phase("first")  # started, then failed: nothing was computed from the config
    run.abandon_phase()
    fixed = {**CONFIG, "model": {"lr": 5e-6}}
    assert [c.key for c in RunDir(tmp_path, fixed).accepted_changes] == ["model.lr"]


def test_config_is_recorded_where_the_run_cannot_lose_it(tmp_path):
    finished(tmp_path, "first")
    (tmp_path / "config.json").unlink()
    with pytest.raises(RunDirError, match="config.json is missing, but .*phases.json records phases"):
        RunDir(tmp_path, {**CONFIG, "model": {"lr": 5e-6}})
    assert not (tmp_path / "config.json").exists()  # refused, not rewritten
    assert json.loads((tmp_path / "phases.json").read_text())["config"] == CONFIG


@pytest.mark.parametrize("name, content, message", [
    ("config.json", "[1, 2]", r"config.json: expected a JSON object holding the run's config, found list"),
    ("config.json", '{"seed": 0, "mo', r"config.json: line 1: not valid JSON \(Unterminated string"),
    ("phases.json", '{"format": 2, "config": {"seed"', r"phases.json: line 1: not valid JSON"),
    ("phases.json", '{"config": {}, "phases": [3]}', r"phases.json: phase record 0 is malformed"),
    ("phases.json", "\xff\xfe", r"phases.json: not UTF-8 text"),
])
def test_damaged_run_files_are_named(tmp_path, name, content, message):
    finished(tmp_path, "first")
    (tmp_path / name).write_bytes(content.encode("latin-1"))
    with pytest.raises(RunDirError, match=message):
        RunDir(tmp_path, CONFIG)


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(RunDirError, match=r"rows.jsonl: line 2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(RunDirError, match=r"rows.jsonl: line 2: expected a JSON object, found list"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"a": 2')  # an append cut short: tolerated only where asked
    assert read_jsonl(path, partial_last_line=True) == [{"a": 1}]
    with pytest.raises(RunDirError, match="line 2.*cut short"):
        read_jsonl(path)


def test_a_line_cut_short_is_removed_before_appending(tmp_path, capsys):
    run = RunDir(tmp_path, CONFIG)
    run.log_metrics({"step": 1})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a crash or a full disk in the middle of an append
    again = RunDir(tmp_path, CONFIG)
    again.log_metrics({"step": 2})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert "metrics.jsonl ended in a line cut short (15 bytes" in capsys.readouterr().out


def test_artifacts_are_recorded_with_size_and_checksum(tmp_path):
    run = finished(tmp_path, "first")
    entry = json.loads((tmp_path / "phases.json").read_text())["phases"][0]
    data = (tmp_path / "first/out.jsonl").read_bytes()
    assert entry["state"] == "done" and entry["artifacts"]["first/out.jsonl"]["bytes"] == len(data)
    assert run.check_artifacts() == []
    (tmp_path / "first/out.jsonl").write_text('{"phase": "FIRST"}\n')  # same size, other contents
    (damage,) = run.check_artifacts()
    assert (damage.phase, damage.relpath, damage.problem) == ("first", "first/out.jsonl",
                                                                "has changed (same size, different contents)")
    run.write_jsonl("notes.jsonl", [{"a": 1}])  # outside a phase: not an artifact
    assert "notes.jsonl" not in json.dumps(json.loads((tmp_path / "phases.json").read_text()))


def _depends(later, earlier):
    order = ["a", "b", "c", "d"]
    return earlier in ("a", "b") and order.index(earlier) < order.index(later)  # c, d use a and b; d not c


def test_a_damaged_artifact_redoes_its_phase_and_its_dependents_wait(tmp_path):
    """b's output is deleted: b is redone; c (reads b) waits for it and is kept when b writes the same bytes
    again; d does not depend on b's... but on a and b: it waits too. a is untouched."""
    run = finished(tmp_path, "a", "b", "c", "d")
    (tmp_path / "b/out.jsonl").unlink()
    messages = RunDir(tmp_path, CONFIG).repair(_depends)
    assert messages[0].endswith("b/out.jsonl is missing; redoing b") and "c, d wait for b" in messages[1]
    run = RunDir(tmp_path, CONFIG)
    assert run.completed() == ["a"]
    run.start_phase("b", ("train",))
    run.write_jsonl("b/out.jsonl", [{"phase": "b"}])  # the same bytes as before
    assert run.mark_done("b", {"rows": 1}) == ["c is kept: b wrote the same outputs again",
                                               "d is kept: b wrote the same outputs again"]
    assert run.completed() == ["a", "b", "c", "d"] and run.check_artifacts() == []


def test_phases_waiting_on_each_other_are_all_kept_when_the_first_writes_the_same_bytes(tmp_path):
    finished(tmp_path, "a", "b", "c")
    (tmp_path / "a/out.jsonl").unlink()
    run = RunDir(tmp_path, CONFIG)
    run.repair(lambda later, earlier: earlier < later)  # every phase reads all earlier ones
    assert run.completed() == []
    run.start_phase("a", ("train",))
    run.write_jsonl("a/out.jsonl", [{"phase": "a"}])
    assert run.mark_done("a", {"rows": 1}) == ["b is kept: a wrote the same outputs again",
                                               "c is kept: a wrote the same outputs again"]
    assert run.completed() == ["a", "b", "c"]


def test_a_redone_phase_with_new_outputs_drops_its_dependents(tmp_path):
    finished(tmp_path, "a", "b", "c")
    (tmp_path / "a/out.jsonl").write_text("{}\n")
    run = RunDir(tmp_path, CONFIG)
    run.repair(_depends)
    assert run.completed() == []
    run.start_phase("a")
    run.write_jsonl("a/out.jsonl", [{"phase": "a", "new": True}])
    assert run.mark_done("a") == ["b will be redone: a wrote different outputs",
                                  "c will be redone: a wrote different outputs"]
    assert run.completed() == ["a"]
    assert not (tmp_path / "b/out.jsonl").exists() and not (tmp_path / "c/out.jsonl").exists()


def test_an_unfinished_phase_loses_only_its_damaged_artifact(tmp_path):
    run = finished(tmp_path, "a")
    run.start_phase("b")
    run.write_jsonl("b/samples.jsonl", [{"x": 1}])
    run.write_jsonl("b/pairs.jsonl", [{"x": 2}])
    (tmp_path / "b/samples.jsonl").write_text('{"x": 1')
    (message,) = RunDir(tmp_path, CONFIG).repair(_depends)
    assert message.endswith("b/samples.jsonl has changed (7 bytes, 9 when written); b will write it again")
    assert not (tmp_path / "b/samples.jsonl").exists() and (tmp_path / "b/pairs.jsonl").exists()
    assert RunDir(tmp_path, CONFIG).in_flight() == ["b"]


def test_a_full_disk_is_one_error_naming_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    run = RunDir(tmp_path, CONFIG)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RunDirError, match=r"cannot write .*samples.jsonl: No space left on device"):
        run.write_jsonl("samples.jsonl", [{"a": 1}])
    with pytest.raises(RunDirError, match=r"cannot write .*metrics.jsonl: No space left on device"):
        run.log_metrics({"a": 1})
    assert not list(tmp_path.rglob(".*tmp*")) and not (tmp_path / "samples.jsonl").exists()


def test_read_only_opening_writes_nothing(tmp_path):
    finished(tmp_path, "a")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    run = RunDir.open_read_only(tmp_path)
    assert run.completed() == ["a"] and run.config == CONFIG
    assert RunDir.has_completed(tmp_path, "a") and not RunDir.has_completed(tmp_path, "b")
    assert not RunDir.has_completed(tmp_path / "nowhere", "a")
    with pytest.raises(RunDirError, match="read-only"):
        run.write_json("x.json", {})
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        RunDir.open_read_only(tmp_path / "a")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_orbax_params_round_trip(tmp_path):
    run = RunDir(tmp_path, {})
    params = {"model": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}}
    run.save_params("iter_1/policy", params)
    run.save_params("iter_1/policy", params)  # overwriting a finished checkpoint is allowed
    restored = run.load_params("iter_1/policy", like=params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, restored)
    assert restored["model"]["b"].dtype == jnp.bfloat16
    with pytest.raises(FileNotFoundError, match="incomplete"):
        run.load_params("iter_2/policy")


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    run = RunDir(tmp_path, {})
    with pytest.raises(DivergenceError, match=r"refusing to save weights that are not finite to .*iter_1/policy"):
        run.save_params("iter_1/policy", {"w": jnp.asarray([1.0, jnp.nan])})
    assert not (tmp_path / "iter_1").exists()


def test_damaged_checkpoints_are_found_and_named(tmp_path):
    run = RunDir(tmp_path, CONFIG)
    run.start_phase("a")
    run.save_params("a/policy", {"w": jnp.arange(4096.0)})
    run.mark_done("a")
    data = max((p for p in (tmp_path / "a/policy").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])  # a truncated shard file
    (damage,) = run.check_artifacts()
    assert damage.relpath == "a/policy" and damage.problem.startswith("has changed")
    with pytest.raises(RunDirError, match=r"a/policy has changed .* since a wrote it; rerun the run's command"):
        RunDir.open_read_only(tmp_path).load_params("a/policy")
    with pytest.raises(RunDirError, match=r"cannot read the checkpoint .*a/policy: "):
        run.load_params("a/policy", like={"w": jnp.zeros(4096)})


def test_a_failed_checkpoint_write_is_one_error_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    run = RunDir(tmp_path, {})

    def no_space(self, directory, *args, **kwargs):
        (directory.parent / f"{directory.name}.orbax-checkpoint-tmp-1").mkdir(parents=True)
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device\n[long trace]")
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", no_space)
    with pytest.raises(RunDirError, match=r"cannot write the checkpoint .*iter_1/policy: RESOURCE_EXHAUSTED.*device$"):
        run.save_params("iter_1/policy", {"w": jnp.ones(3)})
    assert not list((tmp_path / "iter_1").iterdir())
