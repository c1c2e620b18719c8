"""Entry point: `python -m mtjax.run --config=configs/mt.py[:PRESET] [--config.a.b=value ...] [--workdir=DIR]`.

Runs the Mutual-Taught loop (`mtjax.em`). Rerunning the same command on the same workdir resumes
after the last finished phase; a workdir whose finished phases used other settings is refused unless
`--override_config` is given. One run at a time per workdir (`mtjax.runlock`). Ctrl-C or SIGTERM stop the
run with one line after saving the train state of a training phase in flight (`mtjax.interrupts`);
errors a user can fix (a damaged file, a full disk, a diverged phase) end with one line naming it.

Multi-host: run the same command on every host with `--num_processes=N --process_id=I
--coordinator_address=HOST0:PORT`, or `--distributed` to let jax read them from the environment
(JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, SLURM, TPU pods, Open MPI); the workdir
must be on storage every host sees. See README "Multi-host launches".
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from mtjax import layout

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<preset>).")
_OVERRIDE = flags.DEFINE_bool("override_config", False, "Resume a workdir even if its config differs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 .. N-1.")
_CACHE = flags.DEFINE_string("compilation_cache", "~/.cache/mtjax/xla", "Folder of jax's persistent compilation "
                              "cache (resumed runs and later phases skip recompiling); empty to disable.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Multi-host with jax's auto-detection (SLURM, TPU, "
                                 "JAX_* environment variables).")

# The headline rows of the end-of-run table (the full table and plots are in RUN_DIR/report/).
SUMMARY_METRICS = (
    "policy/gold_reward",
    "policy/gold_reward_se",
    "policy/heldout/prompt_level_strict",
    "policy/heldout/instruction_level_loose",
    "policy/length_mean_tokens",
    "policy/truncated_fraction",
    "policy/coverage",  # the synthetic task's
    "policy/decoy_rate",
    "rm/accuracy_current_policy",
    "rm/accuracy_base_policy",
    "rm/r0_accuracy_current_policy",
    "rm/pairs_current_policy",
    *(layout.metric_name(layout.PAIR_METRICS, name)
      for name in (layout.PAIR_POLICY, layout.PAIR_RM_CONTRASTIVE, layout.PAIR_RM_SELF_TRAINING)),
    # the paper's benchmarks (eval.benchmarks): proxies judged offline by r0, RewardBench by r_t
    "alpaca_eval/proxy_win_rate",
    "alpaca_eval/proxy_lc_win_rate",
    "arena_hard/length_mean_tokens",
    "rewardbench/score",
    "rewardbench/accuracy",
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
    from mtjax import distributed
    from mtjax.settings import validate_config

    try:
        validate_config(cfg)  # before any model is loaded (or any host waits for another)
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
    except ValueError as e:
        sys.exit(f"mtjax: {e}")
    if _CACHE.value:
        enable_compilation_cache(_CACHE.value)
    with distributed.fail_fast():
        run_loop(cfg, _WORKDIR.value or default_workdir(cfg), say=distributed.primary_print)


def _stop(message: str, code: int = 1) -> None:
    """Ends the run with one line on stderr (SystemExit carries the code through `distributed.fail_fast`)."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)


def enable_compilation_cache(folder: str) -> None:
    """jax's persistent cache: a compiled program (train step, sampler) is reused by later phases with the
    same shapes, by resumed runs and by other processes of a multi-host run that share the folder."""
    import os

    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def default_workdir(cfg) -> str:
    """runs/PRESET for Mutual-Taught, runs/PRESET_ARM for another arm (so arms never share a directory)."""
    arm = cfg.get("arm", "mutual")
    return f"runs/{cfg.preset}" if arm == "mutual" else f"runs/{cfg.preset}_{arm}"


def run_loop(cfg, workdir: str, say: Callable[..., None] = print) -> None:
    """The run on `workdir`, holding its lock; stops with one line on an interrupt or an error a user can fix."""
    import contextlib
    from pathlib import Path

    import jax

    from mtjax.device_memory import OutOfDeviceMemory
    from mtjax.distributed import is_primary
    from mtjax.divergence import DivergenceError
    from mtjax.interrupts import stop_message
    from mtjax.rundir import RunDirError
    from mtjax.runlock import RunDirLocked, exclusive_run_lock

    hosts = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    say(f"mtjax: {cfg.get('arm', 'mutual')} (mtjax.arms), preset {cfg.preset!r}, workdir {workdir}, "
        f"{jax.device_count()} {jax.devices()[0].platform} devices{hosts}")
    try:
        if is_primary():
            Path(workdir).mkdir(parents=True, exist_ok=True)
        with exclusive_run_lock(workdir, say) if is_primary() else contextlib.nullcontext():
            _run(cfg, workdir, say)
    except KeyboardInterrupt as e:
        _stop(stop_message(e, workdir), getattr(e, "exit_code", 130))
    except (RunDirError, RunDirLocked, DivergenceError, OutOfDeviceMemory) as e:
        _stop(f"mtjax: {e}")
    except OSError as e:  # the workdir or its lock file cannot be created (read-only, full, no permission)
        _stop(f"mtjax: cannot use {e.filename or workdir} as the run directory: {e.strerror or e}")


def _run(cfg, workdir: str, say: Callable[..., None]) -> None:
    from mtjax.em import MutualTaught

    try:
        run = MutualTaught(cfg, workdir, allow_config_change=_OVERRIDE.value)
    except ValueError as e:
        _stop(f"mtjax: {e}")
    done = [p for p in run.rd.completed() if p != layout.PROMPTS]
    if done:
        say(f"mtjax: resuming; finished phases: {', '.join(done)}")
    run.run()
    from mtjax.distributed import is_primary
    from mtjax.report import write_report

    if not is_primary():
        return
    report = write_report(workdir)
    say("\n" + summary_table(report["table"]))
    seconds = run.phase_seconds()
    say("\nwall time per phase: " + ", ".join(f"{p} {s:.0f}s" for p, s in seconds.items()))
    say(f"\nmtjax: done. Run directory: {workdir}; full report: {report['report']} "
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
    from mtjax.interrupts import handle_signals, stop_message

    with handle_signals():
        try:
            app.run(main, flags_parser=parse_flags_or_exit)
        except KeyboardInterrupt as e:  # during start-up, before the run directory is known
            print(stop_message(e, "the run directory"), file=sys.stderr)
            sys.exit(getattr(e, "exit_code", 130))
