"""Entry point: `python -m mtjax.run --config=configs/mt.py[:PRESET] [--config.a.b=value ...] [--workdir=DIR]`.

Runs the Mutual-Taught loop (`mtjax.em`). Rerunning the same command on the same workdir resumes
after the last finished phase; a workdir written by another config is refused unless
`--override_config` is given.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<preset>).")
_OVERRIDE = flags.DEFINE_bool("override_config", False, "Resume a workdir even if its config differs.")

# The headline rows of the end-of-run table (the full table and plots are in RUN_DIR/report/).
SUMMARY_METRICS = (
    "policy/gold_reward",
    "policy/heldout/prompt_level_strict",
    "policy/heldout/instruction_level_loose",
    "policy/length_mean_tokens",
    "policy/truncated_fraction",
    "rm/accuracy_current_policy",
    "rm/accuracy_base_policy",
    "rm/pairs_current_policy",
    "pairs/policy",
    "pairs/rm_contrastive",
    "pairs/rm_self_training",
)


def summary_table(table: dict[int, dict[str, float]]) -> str:
    """The headline metrics per iteration, as the report renders them."""
    from mtjax.report import markdown_table

    return markdown_table({t: {k: v for k, v in m.items() if k in SUMMARY_METRICS} for t, m in table.items()})


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # absl's INFO lines (e.g. "no TPU backend") are noise here
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config=configs/mt.py")
    from mtjax.em import MutualTaught

    workdir = _WORKDIR.value or f"runs/{cfg.preset}"
    print(f"mtjax: Mutual-Taught, preset {cfg.preset!r}, workdir {workdir}")
    from mtjax.em import validate_config
    from mtjax.rundir import ConfigMismatchError

    try:
        validate_config(cfg)  # before any model is loaded
        run = MutualTaught(cfg, workdir, allow_config_change=_OVERRIDE.value)
    except (ValueError, ConfigMismatchError) as e:
        sys.exit(f"mtjax: {e}")
    done = [p for p in run.rd.completed() if p != "prompts"]
    if done:
        print(f"mtjax: resuming; finished phases: {', '.join(done)}")
    run.run()
    from mtjax.report import write_report

    report = write_report(workdir)
    print("\n" + summary_table(report["table"]))
    seconds = run.phase_seconds()
    print("\nwall time per phase: " + ", ".join(f"{p} {s:.0f}s" for p, s in seconds.items()))
    print(f"\nmtjax: done. Run directory: {workdir}; full report: {report['report']} "
          f"({len(report['plots'])} plots); checkpoints per iteration (export with python -m mtjax.export)")


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """Parse the command line so that a wrong override (`--config.no.such.key=1`, a bad value, an
    unknown preset) ends with one clear line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        detail = str(e).strip()
        if "Traceback" in detail:  # an error inside configs/mt.py: its last line is the message
            detail = detail.splitlines()[-1]
        if isinstance(e, (AttributeError, KeyError)):
            detail = f"unknown config key {detail} in an override"
        sys.exit(f"mtjax.run: bad command line: {detail}\n(config keys and presets: configs/mt.py)")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
