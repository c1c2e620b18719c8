"""Per-iteration report of a Mutual-Taught run: a table and PNG plots from the run directory's metrics.

``python -m mtjax.report RUN_DIR`` reads the run directory and prints the table, writing nothing;
``--out DIR`` also writes ``report.md``, ``metrics.csv`` and one PNG per metric group into ``DIR``.
``python -m mtjax.run`` calls :func:`write_report` at the end of a run (into ``RUN_DIR/report/``); the EM
driver writes ``metrics.jsonl`` through ``mtjax.tracking.MetricsWriter`` (which also feeds TensorBoard and
W&B). :func:`record_metrics` appends a row to a run directory assembled by hand (scripts, tests): it
reaches ``metrics.jsonl`` only, not the tracking sinks.

Input format (both sources optional; every value must be a number, other values are ignored):

* ``RUN_DIR/metrics.jsonl`` -- one JSON object per line, each with an integer ``"iteration"``
  (0 = the initial policy/RM, t = after Mutual-Taught iteration t) and metric name -> number pairs.
  Nested objects are flattened with ``/`` (``{"policy": {"gold_reward": 0.4}}`` is
  ``policy/gold_reward``). Several lines may share an iteration; later values win. Optional keys
  ``"phase"`` (e.g. ``"e_step"``), ``"global_step"`` (the tracking step) and ``"time"`` are kept out of
  the table; lines with a ``"step"`` (per-step training logs) are skipped: the table holds one value per
  iteration. The driver's lines: per training step ``{"step", "epoch", "train": {...}}`` (TRL's names:
  ``rewards/margins``, ``logps/chosen``, ``kl``, ``entropy``, ``mean_token_accuracy``, ``num_tokens``
  ... for DPO; ``accuracy``, ``margin``, ``min_reward/chosen`` ... for the RM); per sampling pass
  ``{"sampling": {FILE: {"tokens_per_second", "completions/mean_length", ...}}}``; per evaluation the
  same ``policy`` / ``rm`` / ``pairs`` metrics as ``eval/iter_T.json``.
* ``RUN_DIR/eval/*.json`` -- one JSON object per file: ``{"iteration": t, "metrics": {...}}``
  (for example the output of ``python -m mtjax.evaluate`` wrapped with its iteration), flattened the
  same way and merged after ``metrics.jsonl``.

Metric names the driver and evaluators use (others are shown too, under "other"):

=====================================  ====================================================
``policy/gold_reward``                 mean gold reward on the held-out generated split (strict)
``policy/heldout/prompt_level_strict``  ... and the other IFEval accuracies on that split
``policy/ifeval/prompt_level_strict``  IFEval prompt-level strict accuracy (also ``_loose``,
                                       ``instruction_level_strict``, ``instruction_level_loose``)
``policy/win_rate``                    RM-judged win rate vs AlpacaEval-2 references (%)
``policy/length_controlled_win_rate``  ... length-controlled (%)
``policy/length_mean_tokens``          mean response length (also ``length_p95_*``, chars/words)
``rm/accuracy_current_policy``         RM pairwise accuracy vs gold on the current policy's samples
``rm/accuracy_base_policy``            ... on the base policy's samples
``rm/rewardbench/accuracy``            accuracy on a RewardBench-format file
``pairs/policy``                       E-step DPO pairs built (``pairs/policy_skipped``: prompts without)
``pairs/rm_contrastive``, ``pairs/rm_self_training``  M-step pair counts
=====================================  ====================================================
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtjax import layout

# Keys that place a row (iteration, phase, step) rather than measure anything.
METADATA_KEYS = frozenset({"iteration", "phase", "time", "step", "epoch", "global_step"})
# Plot groups: (file stem, title, regex on metric names). A metric goes to the first group it matches.
METRIC_GROUPS: tuple[tuple[str, str, str], ...] = (
    (
        "policy_quality",
        "Policy: gold reward and instruction following",
        rf"^{layout.POLICY_METRICS}/(gold_reward|ifeval|ifbench|heldout)",
    ),
    ("win_rates", "Policy: RM-judged win rates vs AlpacaEval-2 references (%)", r"win_rate"),
    ("reward_model", "Reward model accuracy", rf"^{layout.RM_METRICS}/"),
    ("lengths", "Response length", r"length"),
    ("pair_counts", "Pair counts", rf"^{layout.PAIR_METRICS}/"),
)
OTHER_GROUP = ("other", "Other metrics")


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested dicts with ``/``; keep numbers (bools become 0/1), drop everything else."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, (bool, int, float)) and not isinstance(value, str):
            flat[name] = float(value)
    return flat


def record_metrics(
    run_dir: str | Path, iteration: int, metrics: Mapping[str, Any], phase: str | None = None
) -> None:
    """Append one line to ``RUN_DIR/metrics.jsonl`` (nested metrics are flattened)."""
    if not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be a non-negative int, got {iteration!r}")
    line: dict[str, Any] = {"iteration": iteration}
    if phase is not None:
        line["phase"] = phase
    line.update(flatten_metrics(metrics))
    path = Path(run_dir) / layout.METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def _iteration_of(record: Mapping[str, Any], where: str) -> int:
    iteration = record.get("iteration")
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise ValueError(f"{where}: 'iteration' must be a non-negative integer, got {iteration!r}")
    return iteration


def load_run_metrics(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """iteration -> metric name -> value, merged from ``metrics.jsonl`` then ``eval/*.json``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    table: dict[int, dict[str, float]] = {}
    metrics_file = run_dir / layout.METRICS_FILE
    if metrics_file.is_file():
        with open(metrics_file, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{metrics_file}:{line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
                if not isinstance(record, dict):
                    raise ValueError(f"{where}: expected a JSON object")
                iteration = _iteration_of(record, where)
                if "step" in record:  # a training step's row: a curve within a phase, not a per-iteration value
                    continue
                values = {k: v for k, v in record.items() if k not in METADATA_KEYS}
                table.setdefault(iteration, {}).update(flatten_metrics(values))
    for path in sorted((run_dir / layout.EVAL_FOLDER).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
            raise ValueError(f"{path}: expected {{'iteration': int, 'metrics': {{...}}}}")
        table.setdefault(_iteration_of(record, str(path)), {}).update(flatten_metrics(record["metrics"]))
    if not table:
        raise FileNotFoundError(f"no metrics in {run_dir}: expected metrics.jsonl and/or eval/*.json")
    return dict(sorted(table.items()))


def group_metrics(names: Sequence[str]) -> dict[tuple[str, str], list[str]]:
    """Assign each metric name to its plot group (in METRIC_GROUPS order, then "other")."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in sorted(names):
        key = next(
            ((stem, title) for stem, title, pattern in METRIC_GROUPS if re.search(pattern, name)), OTHER_GROUP
        )
        groups.setdefault(key, []).append(name)
    order = [(stem, title) for stem, title, _ in METRIC_GROUPS] + [OTHER_GROUP]
    return {key: groups[key] for key in order if key in groups}


def _format(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    return f"{value:.4g}"


def markdown_table(table: Mapping[int, Mapping[str, float]]) -> str:
    """Metrics as rows (grouped), iterations as columns."""
    iterations = list(table)
    names = sorted({n for metrics in table.values() for n in metrics})
    lines = [
        "| metric | " + " | ".join(f"iter {t}" for t in iterations) + " |",
        "| --- | " + " | ".join("---:" for _ in iterations) + " |",
    ]
    for (_, title), members in group_metrics(names).items():
        lines.append(f"| **{title}** | " + " | ".join("" for _ in iterations) + " |")
        for name in members:
            lines.append(f"| {name} | " + " | ".join(_format(table[t].get(name)) for t in iterations) + " |")
    return "\n".join(lines)


def plot_groups(table: Mapping[int, Mapping[str, float]], out_dir: Path) -> list[Path]:
    """One PNG per metric group: each metric against the iteration."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    names = sorted({n for metrics in table.values() for n in metrics})
    paths = []
    for (stem, title), members in group_metrics(names).items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in members:
            points = [(t, m[name]) for t, m in table.items() if name in m and not math.isnan(m[name])]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("Mutual-Taught iteration")
        ax.set_xticks(list(table))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``metrics.csv`` and the PNGs; return their paths and the table."""
    table = load_run_metrics(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / layout.REPORT_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    markdown = markdown_table(table)
    pngs = plot_groups(table, out)
    (out / "report.md").write_text(
        f"# Mutual-Taught run report: {Path(run_dir).name}\n\n{markdown}\n\n"
        + "\n".join(f"![{p.stem}]({p.name})" for p in pngs)
        + "\n",
        encoding="utf-8",
    )
    names = sorted({n for metrics in table.values() for n in metrics})
    with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", *names])
        for t, metrics in table.items():
            writer.writerow([t, *(metrics.get(n, "") for n in names)])
    return {
        "markdown": markdown,
        "report": out / "report.md",
        "csv": out / "metrics.csv",
        "plots": pngs,
        "table": table,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mtjax.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="run directory with metrics.jsonl and/or eval/*.json")
    parser.add_argument("--out", default=None, help="also write report.md, metrics.csv and the plots into this "
                        "folder (RUN_DIR/report to refresh the run's own); without it nothing is written")
    args = parser.parse_args(argv)
    try:
        if args.out is None:  # read-only: the run directory may be read-only, or in use by a running run
            print(markdown_table(load_run_metrics(args.run_dir)))
            return
        result = write_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"mtjax.report: {e}")
    print(result["markdown"])
    print(f"\nwrote {result['report']}, {result['csv']} and {len(result['plots'])} plots")


if __name__ == "__main__":
    main(sys.argv[1:])
