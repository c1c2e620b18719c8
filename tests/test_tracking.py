"""Experiment tracking: metrics.jsonl, TensorBoard event files and an offline W&B run hold the same scalars
at the same global steps (read back with TensorBoard's and W&B's own formats), TRL's metric names, and
resuming without a repeated step."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tracking_files
from conftest import tiny_config

from mtjax import tracking
from mtjax.rundir import RunDir

# The names a TRL user looks for, per phase kind (step rows under "train/", sampling under "sampling/FILE/").
DPO_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "kl", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm", "learning_rate")
RM_NAMES = ("loss", "accuracy", "margin", "min_reward/chosen", "mean_reward/chosen", "max_reward/chosen",
            "min_reward/rejected", "mean_reward/rejected", "max_reward/rejected", "num_tokens")
SAMPLING_NAMES = ("tokens_per_second", "completions/mean_length", "completions/p95_length",
                  "completions/clipped_ratio")


def test_event_files_hold_every_scalar_of_metrics_jsonl(tiny_run):
    run, _ = tiny_run
    rows = run.rd.metrics()
    assert [r["global_step"] for r in rows] == list(range(1, len(rows) + 1))
    (events,) = tracking_files.event_files(run.rd.file("tensorboard"))  # one uninterrupted run: one file
    logged = {(step, tag): value for step, tag, value in events}
    assert len(logged) == len(events)  # no (tag, step) twice
    expected = tracking_files.jsonl_scalars(rows)
    assert logged.keys() == expected.keys()
    mismatched = [k for k, v in expected.items() if not tracking_files.same_float32(logged[k], v)]
    assert not mismatched
    # The train steps' metrics are float32 already: they come back bit for bit.
    train = {k: v for k, v in expected.items() if "/train/" in k[1]}
    assert train and all(logged[k] == v or np.isnan(v) for k, v in train.items())

    tags = {tag for _, tag in logged}
    for t in (1, 2):
        assert {f"iter_{t}/e_step/train/{name}" for name in DPO_NAMES} <= tags
        assert {f"iter_{t}/m_step/train/{name}" for name in RM_NAMES} <= tags
        assert {f"iter_{t}/e_step/sampling/samples/{name}" for name in SAMPLING_NAMES} <= tags
        assert {f"iter_{t}/eval/policy/gold_reward", f"iter_{t}/eval/rm/accuracy_current_policy"} <= tags
    assert "iter_0/eval/policy/gold_reward" in tags


def test_num_tokens_is_each_phases_running_sum_of_input_tokens(tiny_run):
    run, _ = tiny_run
    train_rows = [r for r in run.rd.metrics() if "train" in r]
    assert train_rows
    for phase in {r["phase"] for r in train_rows}:
        rows = sorted((r for r in train_rows if r["phase"] == phase), key=lambda r: r["step"])
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        running = np.cumsum([r["train"]["num_input_tokens"] for r in rows])
        np.testing.assert_array_equal([r["train"]["num_tokens"] for r in rows], running)


def test_sampling_metrics_over_a_samples_file():
    rows = [{"response_ids": [1] * n, "stopped": n < 8} for n in (3, 8, 5, 8, 2)]
    metrics = tracking.sampling_metrics(rows, num_new_rows=2, seconds=0.5, resumed_after_prompts=3)
    lengths = np.array([3, 8, 5, 8, 2])
    assert metrics["responses"] == 2 and metrics["tokens"] == 10 and metrics["tokens_per_second"] == 20.0
    assert metrics["completions/mean_length"] == lengths.mean()
    assert metrics["completions/p95_length"] == np.percentile(lengths, 95)
    assert metrics["completions/max_length"] == 8 and metrics["completions/clipped_ratio"] == 0.4
    assert metrics["resumed_after_prompts"] == 3


def test_offline_wandb_run_gets_every_scalar(tiny_run, tmp_path, monkeypatch):
    """Turning W&B on for a finished run directory (offline): the driver starts a W&B run, sends it every
    row of metrics.jsonl at its global step, and its local run file holds them all."""
    from mtjax.em import MutualTaught

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run, _ = tiny_run
    workdir = tmp_path / "run"
    shutil.copytree(run.rd.path, workdir)
    cfg = tiny_config()
    cfg.logging.update(wandb=True, wandb_project="mtjax-tests")  # `logging` may change on resume
    MutualTaught(cfg, str(workdir)).run()
    (run_file,) = workdir.glob("wandb/offline-run-*/run-*.wandb")
    run_id = json.loads((workdir / tracking.WANDB_RUN_FILE).read_text())["id"]
    assert run_file.name == f"run-{run_id}.wandb"
    history = tracking_files.wandb_history(run_file)
    expected = tracking_files.jsonl_scalars(run.rd.metrics())
    assert history.keys() == expected.keys()
    assert all(history[k] == v or (np.isnan(history[k]) and np.isnan(v)) for k, v in expected.items())


def _tiny_run_dir(tmp_path: Path) -> RunDir:
    return RunDir(tmp_path / "run", tiny_config().to_dict())


def _dpo_row(step: int, tokens: float) -> dict:
    return {"iteration": 1, "phase": "iter_1/e_step", "step": step, "epoch": 0,
            "train": {"loss": 0.7 - 0.01 * step, "rewards/margins": 0.1 * step, "num_input_tokens": tokens}}


def _steps_in_file_order(folder: Path) -> list[int]:
    return [step for events in tracking_files.event_files(folder) for step in sorted({e[0] for e in events})]


def test_a_resumed_writer_sends_what_tensorboard_missed_and_repeats_no_step(tmp_path, monkeypatch):
    """Run 1 logs steps 1-3, then is killed right after metrics.jsonl got training step 4 but before
    TensorBoard did. Run 2 replays training step 4 and goes on: TensorBoard first gets the row it missed,
    no global step repeats, and the replayed step has the same running token count."""
    rd = _tiny_run_dir(tmp_path)
    first = tracking.MetricsWriter(rd, tracking.TrackingConfig())
    for step in (1, 2, 3):
        first.log(_dpo_row(step, tokens=100.0 + step))

    def killed(self, scalars, step):
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(tracking._TensorBoardSink, "write", killed)
        with pytest.raises(RuntimeError, match="killed"):
            first.log(_dpo_row(4, tokens=104.0))

    second = tracking.MetricsWriter(rd, tracking.TrackingConfig())
    for step in (4, 5):
        second.log(_dpo_row(step, tokens=100.0 + step))
    second.close()

    rows = rd.metrics()
    assert [r["global_step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["train"]["num_tokens"] for r in rows] == [101, 203, 306, 410, 410, 515]
    folder = rd.file(tracking.TENSORBOARD_FOLDER)
    assert _steps_in_file_order(folder) == [1, 2, 3, 4, 5, 6]  # 4 came from the second writer
    events = {(step, tag): value for file in tracking_files.event_files(folder) for step, tag, value in file}
    expected = tracking_files.jsonl_scalars(rows)
    assert events.keys() == expected.keys()
    assert all(tracking_files.same_float32(events[k], v) for k, v in expected.items())


def test_steps_already_in_event_files_are_never_reused(tmp_path):
    """Event files ahead of metrics.jsonl (an older writer's steps 1-6, metrics.jsonl only to 3): the next
    rows start after the event files' last step."""
    from tensorboardX import SummaryWriter

    rd = _tiny_run_dir(tmp_path)
    writer = tracking.MetricsWriter(rd, tracking.TrackingConfig(tensorboard=False))
    for step in (1, 2, 3):
        writer.log(_dpo_row(step, tokens=10.0))
    folder = rd.file(tracking.TENSORBOARD_FOLDER)
    ahead = SummaryWriter(str(folder), filename_suffix=".ahead")
    for step in range(1, 7):
        ahead.add_scalar("iter_1/e_step/train/loss", 1.0, global_step=step)
    ahead.close()
    assert tracking.last_event_step(folder) == 6

    resumed = tracking.MetricsWriter(rd, tracking.TrackingConfig())
    resumed.log(_dpo_row(4, tokens=10.0))
    resumed.close()
    assert [r["global_step"] for r in rd.metrics()] == [1, 2, 3, 7]
    assert _steps_in_file_order(folder) == [1, 2, 3, 4, 5, 6, 7]


def test_a_truncated_event_file_is_read_up_to_its_last_whole_record(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.add_scalar("x", float(step), global_step=step)
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # killed in the middle of writing step 3
    assert tracking.last_event_step(tmp_path) == 2


def test_logging_config_is_the_tracking_config():
    """Every key of configs/mt.py's `logging` section is a TrackingConfig field with the same default (the
    config maps onto the dataclass by field name)."""
    import dataclasses

    section = tiny_config().logging.to_dict()
    fields = {f.name: f.default for f in dataclasses.fields(tracking.TrackingConfig)}
    assert section == fields


def test_a_missing_sink_package_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else object())
    with pytest.raises(ValueError, match=r"logging.wandb=True needs the wandb package \(pip install 'mtjax\[wandb\]'"):
        tracking.TrackingConfig(wandb=True)
    tracking.TrackingConfig(wandb=False)
