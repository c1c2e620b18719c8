"""Reading what the tracking sinks wrote, with the tools' own readers, for tests/test_tracking.py and the
resume test: TensorBoard event files through TensorBoard's EventAccumulator, W&B's offline `.wandb` files
through its record protobufs, and the scalars of metrics.jsonl flattened independently of mtjax.tracking."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

PLACEMENT_KEYS = ("iteration", "phase", "step", "epoch", "global_step")


def jsonl_scalars(rows: list[dict]) -> dict[tuple[int, str], float]:
    """(global step, tag) -> value for every number of every row: `iter_T/PHASE/` + the nested keys."""
    out: dict[tuple[int, str], float] = {}

    def walk(values: dict, name: str, step: int) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(value, f"{name}/{key}", step)
            elif isinstance(value, (int, float)):
                out[(step, f"{name}/{key}")] = float(value)

    for row in rows:
        iteration, phase = row["iteration"], row["phase"]
        prefix = phase if phase.startswith(f"iter_{iteration}/") else f"iter_{iteration}/{phase}"
        walk({k: v for k, v in row.items() if k not in PLACEMENT_KEYS}, prefix, row["global_step"])
    return out


def event_files(folder: Path) -> list[list[tuple[int, str, float]]]:
    """The scalar events (step, tag, value) of each TensorBoard event file under `folder`, one list per
    file, files in the order of their first step, each read on its own (so duplicates would show)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    files = []
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
        accumulator.Reload()
        events = [(e.step, tag, e.value) for tag in accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag)]
        if events:
            files.append(sorted(events))
    return sorted(files, key=lambda events: events[0][0])


def same_float32(a: float, b: float) -> bool:
    """TensorBoard keeps float32: equal after rounding to float32 (NaN equals NaN)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return np.float32(a) == np.float32(b)


def wandb_history(run_file: Path) -> dict[tuple[int, str], float]:
    """(step, key) -> value of every history row in an offline W&B run file (`run-ID.wandb`): a LevelDB-style
    log of `wandb_internal_pb2.Record`s (header ":W&B" + magic + version, then 32 KiB blocks of records
    with a 7-byte header: checksum, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    out, position, block, pending = {}, 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # the rest of a block too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        payload = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 2):  # FULL, FIRST
            pending = payload
        elif kind in (3, 4):  # MIDDLE, LAST
            pending += payload
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record.FromString(pending)
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    out[(record.history.step.num, key)] = float(json.loads(item.value_json))
    return out
