"""Run report: metrics.jsonl + eval/*.json -> table, CSV and PNG plots."""

from __future__ import annotations

import csv
import json

import pytest

from mtjax import report


def _write_run(run_dir) -> None:
    report.record_metrics(
        run_dir,
        0,
        {"policy": {"gold_reward": 0.31, "length_mean_tokens": 180.0}, "rm": {"accuracy_base_policy": 0.62}},
    )
    for t, (gold, win, pairs) in enumerate([(0.38, 41.0, 900), (0.44, 47.5, 870)], start=1):
        report.record_metrics(
            run_dir, t, {"pairs/policy": pairs, "pairs/policy_skipped": 1000 - pairs}, phase="e_step"
        )
        report.record_metrics(
            run_dir,
            t,
            {
                "policy/gold_reward": gold,
                "policy/win_rate": win,
                "rm/accuracy_current_policy": 0.6 + 0.05 * t,
                "note": "text is ignored",
            },
        )
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "iter_2_ifeval.json").write_text(
        json.dumps({"iteration": 2, "metrics": {"policy": {"ifeval": {"prompt_level_strict": 0.25}}}})
    )


def test_report_renders_table_csv_and_pngs(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    _write_run(run_dir)
    table = report.load_run_metrics(run_dir)
    assert table[0]["policy/gold_reward"] == 0.31
    assert table[2]["policy/gold_reward"] == 0.44 and table[2]["pairs/policy"] == 870
    assert table[2]["policy/ifeval/prompt_level_strict"] == 0.25
    assert "note" not in table[1] and "phase" not in table[1]

    report.main([str(run_dir)])  # without --out it only reads (the run directory may be in use)
    assert "| policy/gold_reward | 0.31 | 0.38 | 0.44 |" in capsys.readouterr().out
    assert not (run_dir / "report").exists()
    out = run_dir / "report"
    report.main([str(run_dir), "--out", str(out)])
    assert "| policy/gold_reward | 0.31 | 0.38 | 0.44 |" in capsys.readouterr().out
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "lengths.png",
        "pair_counts.png",
        "policy_quality.png",
        "reward_model.png",
        "win_rates.png",
    ]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["iteration"] for r in rows] == ["0", "1", "2"]
    assert rows[1]["pairs/policy"] == "900.0" and rows[0]["pairs/policy"] == ""
    assert "![win_rates](win_rates.png)" in (out / "report.md").read_text()


def test_malformed_inputs_name_the_file_and_line(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"iteration": 0, "a": 1}\n{"iteration": "one", "a": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: 'iteration' must be"):
        report.load_run_metrics(run_dir)
    (run_dir / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not valid JSON"):
        report.load_run_metrics(run_dir)
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        report.load_run_metrics(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics"):
        report.load_run_metrics(empty)


def test_training_step_rows_stay_out_of_the_table(tmp_path) -> None:
    """The EM driver logs every train step (with "step") next to per-iteration rows; only the latter
    are table values."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [
        {"iteration": 1, "phase": "iter_1/e_step", "step": 1, "epoch": 0, "train": {"loss": 0.69}},
        {"iteration": 1, "phase": "iter_1/m_step", "step": 1, "epoch": 0, "train": {"loss": 0.5}},
        {"iteration": 1, "phase": "iter_1/e_step", "sampling": {"samples": {"tokens_per_second": 90.0}}},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    table = report.load_run_metrics(run_dir)
    assert table == {1: {"sampling/samples/tokens_per_second": 90.0}}
