"""Experiment tracking: every row a run logs goes to `metrics.jsonl` and to TensorBoard and/or Weights & Biases.

Sits at the end of the data flow, beside the run directory: the EM driver (`mtjax.em`) hands each row it
logs (a training step's metrics, a sampling pass, an iteration's evaluation) to `MetricsWriter.log`, which
appends it to `RUN/metrics.jsonl` (always) and sends every number in it to the sinks that the config's
`logging` section turns on (`TrackingConfig`): TensorBoard event files in `RUN/tensorboard/` (written by
tensorboardX, which needs no TensorFlow; on by default) and Weights & Biases (`pip install 'mtjax[wandb]'`;
`WANDB_MODE=offline` keeps everything under `RUN/wandb/`). In a multi-host run only process 0 writes.

Steps and names. Each row gets a global step, one more than the previous row's, stamped into the row as
`global_step`: it increases across phases and iterations, and on a fresh run it is the row's line number
in metrics.jsonl. Every number of a row goes to the sinks under the tag `iter_T/PHASE/KEY`, the row's nested
keys joined with "/" after its iteration and phase: `iter_1/e_step/train/rewards/margins`,
`iter_0/base_rm/train/loss`, `iter_2/m_step/sampling/new_policy_samples/tokens_per_second`,
`iter_2/eval/policy/gold_reward`. Booleans count as 0/1, text is skipped, and the keys that place a row
(`report.METADATA_KEYS`: iteration, phase, step, epoch, global_step) are not sent. TensorBoard stores
float32: a value read back equals the row's value rounded to float32 (the train steps' metrics are float32
to begin with, so they come back exactly).

Training rows also get TRL's `num_tokens`: the non-padding tokens the phase has trained on up to and
including this step (the running sum of the step's `num_input_tokens`, kept across a resume).

Resume. A rerun continues the step count after the last row of metrics.jsonl and writes a new event file.
Before its first row it scans the event files already there: rows they lack (a crash between the two
writes, phases copied from another run by `em.share_base_phases`, TensorBoard turned on later) are sent
first, and steps they already hold are never used again, so across all event files no step repeats. A W&B
run keeps its id in `RUN/wandb_run.json` and is resumed with it (a W&B run started for a directory that
already has rows gets them all first).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import struct
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtjax.distributed import is_primary
from mtjax.layout import TENSORBOARD_FOLDER, WANDB_RUN_FILE
from mtjax.report import METADATA_KEYS, flatten_metrics
from mtjax.rundir import RunDir


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """The `logging` config section (`--config.logging.NAME=value`); metrics.jsonl is always written.

    tensorboard: event files in RUN/tensorboard (`tensorboard --logdir runs/NAME`).
    wandb: log to Weights & Biases (needs `pip install 'mtjax[wandb]'` and `wandb login`, or
      `WANDB_MODE=offline` to keep the run under RUN/wandb and upload it later with `wandb sync`).
    wandb_project, wandb_entity, wandb_run_name: where the W&B run goes; empty entity = your default
      entity, empty name = the run directory's name.
    """

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "mtjax"
    wandb_entity: str = ""
    wandb_run_name: str = ""

    def __post_init__(self) -> None:
        for flag, module, install in (("tensorboard", "tensorboardX", "pip install tensorboardX"),
                                      ("wandb", "wandb", "pip install 'mtjax[wandb]'")):
            if getattr(self, flag) and importlib.util.find_spec(module) is None:
                raise ValueError(f"logging.{flag}=True needs the {module} package ({install}), "
                                 f"or turn it off with --config.logging.{flag}=False")
        if self.wandb and not self.wandb_project:
            raise ValueError("logging.wandb_project must name a W&B project when logging.wandb=True")


def tag_prefix(row: Mapping[str, Any]) -> str:
    """`iter_T/PHASE` of a row: its phase, led by its iteration (`iter_0/base_rm`, `iter_1/e_step`)."""
    phase = str(row.get("phase", ""))
    iteration = f"iter_{row.get('iteration', 0)}"
    return phase if phase.startswith(f"{iteration}/") else f"{iteration}/{phase}".rstrip("/")


def row_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """Every number of a metrics row under its sink tag (see the module docstring)."""
    values = {k: v for k, v in row.items() if k not in METADATA_KEYS}
    return flatten_metrics(values, tag_prefix(row))


def sampling_metrics(rows: Sequence[Mapping[str, Any]], num_new_rows: int, seconds: float,
                     resumed_after_prompts: int) -> dict[str, float]:
    """The metrics of one sampling pass, from the rows of its samples file (`response_ids`, `stopped`).

    Throughput of the responses this pass sampled (the last `num_new_rows`; a resumed pass read the
    others back): `responses`, `tokens`, `seconds`, `tokens_per_second`. Over all responses of the file,
    TRL's completion statistics in tokens: `completions/mean_length`, `completions/p95_length`,
    `completions/max_length`, and `completions/clipped_ratio`, the fraction cut at `max_new_tokens`.
    """
    lengths = np.asarray([len(r["response_ids"]) for r in rows], np.float64)
    new = rows[len(rows) - num_new_rows:] if num_new_rows else []
    tokens = sum(len(r["response_ids"]) for r in new)
    out = {"responses": len(new), "tokens": tokens, "seconds": seconds,
           "tokens_per_second": tokens / max(seconds, 1e-9), "resumed_after_prompts": resumed_after_prompts}
    if len(rows):
        out.update({"completions/mean_length": float(lengths.mean()),
                    "completions/p95_length": float(np.percentile(lengths, 95)),
                    "completions/max_length": float(lengths.max()),
                    "completions/clipped_ratio": float(np.mean([not r["stopped"] for r in rows]))})
    return out


class MetricsWriter:
    """The run's one metrics writer: `log(row)` appends to metrics.jsonl and feeds every enabled sink.

    `open()` starts the sinks (the driver calls it before any work, so a W&B login problem shows at once;
    `log` opens them itself otherwise, and a run directory that is only read never gets an event file);
    `close()` flushes them and ends the W&B run.
    """

    def __init__(self, run_dir: RunDir, config: TrackingConfig, run_config: Mapping[str, Any] | None = None):
        self.run_dir = run_dir
        self.config = config
        self._run_config = dict(run_config or {})
        self._sinks: list[_Sink] | None = None
        self._last_step = 0
        self._cumulative_tokens: dict[str, dict[int, float]] = {}  # phase -> step -> tokens so far

    def log(self, row: Mapping[str, Any]) -> None:
        if not is_primary():
            return
        self.open()
        row = self._with_running_values(row)
        self.run_dir.log_metrics(row)
        scalars = row_scalars(row)
        for sink in self._sinks:
            sink.write(scalars, row["global_step"])

    def close(self) -> None:
        for sink in self._sinks or ():
            sink.close()
        self._sinks = None

    def open(self) -> None:
        """Reads the run so far (steps, token counts), opens the sinks and sends them the rows they lack."""
        if self._sinks is not None or not is_primary():
            return
        history = list(_stepped(self.run_dir.metrics()))
        for step, row in history:
            self._last_step = step
            self._count_tokens(row)
        self._sinks = []
        if self.config.tensorboard:
            folder = self.run_dir.file(TENSORBOARD_FOLDER)
            written = last_event_step(folder)
            self._last_step = max(self._last_step, written)
            self._sinks.append(_TensorBoardSink(folder))
            self._sinks[-1].write_history(history, after_step=written)
        if self.config.wandb:
            sink = _WandbSink(self.run_dir, self.config, self._run_config)
            if sink.is_new:
                sink.write_history(history, after_step=0)
            self._sinks.append(sink)

    def _with_running_values(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of `row` with its global step and, for a training row, the phase's cumulative tokens (the
        caller's dicts are left alone: the train loop keeps them as its resumable history)."""
        self._last_step += 1
        out = {}
        for key, value in row.items():
            out[key] = dict(value) if key == "train" else value
            if key == "phase":
                out["global_step"] = self._last_step
        out.setdefault("global_step", self._last_step)
        self._count_tokens(out)
        return out

    def _count_tokens(self, row: dict[str, Any]) -> None:
        """Sets `train.num_tokens` (TRL's running token count) from the step's `num_input_tokens` and the
        count up to the step before, as logged so far (a replayed step gets the same count again)."""
        train = row.get("train")
        if not isinstance(train, dict) or "num_input_tokens" not in train or "step" not in row:
            return
        per_step = self._cumulative_tokens.setdefault(row.get("phase", ""), {})
        step = int(row["step"])
        train["num_tokens"] = per_step.get(step - 1, 0.0) + float(train["num_input_tokens"])
        per_step[step] = train["num_tokens"]


def _stepped(rows: Sequence[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(global step, row) of logged rows; rows written before steps were stamped count on from the last."""
    step = 0
    for row in rows:
        step = int(row.get("global_step", step + 1))
        yield step, row


# ----------------------------------------------------------------------------- sinks


class _Sink:
    def write(self, scalars: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def write_history(self, history: Sequence[tuple[int, dict[str, Any]]], after_step: int) -> None:
        for step, row in history:
            if step > after_step:
                self.write(row_scalars(row), step)

    def close(self) -> None:
        pass


class _TensorBoardSink(_Sink):
    """One new event file per writer (unique name: a rerun never appends to or replaces an old file), one
    event per row, written and fsynced before `write` returns (tensorboardX's own SummaryWriter queues
    events for a thread that flushes every two minutes: a crash would lose them, and a resumed run could not
    tell which rows the file holds)."""

    def __init__(self, folder: Path):
        from tensorboardX.event_file_writer import EventsWriter

        # NaN is a value the run means to log (an accuracy with no pair to judge), not a fault to warn about.
        logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
        folder.mkdir(parents=True, exist_ok=True)
        self._writer = EventsWriter(str(folder / "events"), filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")

    def write(self, scalars: Mapping[str, float], step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import scalar

        values = [value for tag, number in scalars.items() for value in scalar(tag, number).value]
        self._writer.write_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _WandbSink(_Sink):
    """A W&B run whose id is kept in the run directory, so a rerun resumes the same W&B run."""

    def __init__(self, run_dir: RunDir, config: TrackingConfig, run_config: Mapping[str, Any]):
        import wandb

        id_file = run_dir.file(WANDB_RUN_FILE)
        try:
            run_id = json.loads(id_file.read_text())["id"]
        except (FileNotFoundError, ValueError, KeyError):  # none yet (or a half-written one): a new W&B run
            run_id = None
        self.is_new = run_id is None
        if self.is_new:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(json.dumps({"id": run_id}) + "\n")  # process 0 only: no collective write
        self._run = wandb.init(project=config.wandb_project, entity=config.wandb_entity or None,
                               name=config.wandb_run_name or run_dir.path.absolute().name,
                               dir=str(run_dir.path.absolute()), config=dict(run_config), id=run_id,
                               resume="allow", reinit="create_new")

    def write(self, scalars: Mapping[str, float], step: int) -> None:
        self._run.log(dict(scalars), step=step)

    def close(self) -> None:
        self._run.finish()


# ----------------------------------------------------------------------------- reading event files


def last_event_step(folder: str | os.PathLike) -> int:
    """The largest step of any scalar in the TensorBoard event files under `folder` (0 if none).

    Reads the TFRecord framing itself (length, masked CRC-32C, payload, CRC) and stops at a truncated or
    corrupt tail, such as a process killed mid-write leaves."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    last = 0
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        with open(path, "rb") as f:
            while len(header := f.read(12)) == 12:
                (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
                payload, (payload_crc,) = f.read(length), struct.unpack("<I", f.read(4).ljust(4, b"\0"))
                if (length_crc != masked_crc32c(header[:8]) or len(payload) != length
                        or payload_crc != masked_crc32c(payload)):
                    break
                event = Event.FromString(payload)
                if event.summary.value:
                    last = max(last, event.step)
    return last
