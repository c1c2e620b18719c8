"""The run directory: resolved config, completed phases, artifacts, metrics and checkpoints.

Multi-process runs share one run directory on storage every host sees: process 0 writes files (and
the others wait at a barrier before reading them); checkpoints are written by all processes through
Orbax, each its own shards.

Resume is phase-granular: a phase's outputs are written first (each file atomically: temp name,
then rename), and only then is the phase recorded in `phases.json`. A crash, `kill -9` or Ctrl-C
therefore loses at most the phase in flight, and a rerun skips every recorded phase (a training phase
in flight also saves its train state as it goes: `mtjax.train_checkpoint`).

Layout:
    RUN/config.json      the resolved config; a different config is refused unless overridden
    RUN/phases.json      [{"name": ..., "summary": {...}}, ...] in completion order
    RUN/metrics.jsonl    one JSON object per logged row (steps and phase summaries)
    RUN/<phase files>    JSONL artifacts and Orbax checkpoints named by the caller
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mtjax.distributed import barrier, is_primary


class ConfigMismatchError(RuntimeError):
    pass


def _atomic_write_text(path: Path, text: str) -> None:
    """Process 0 writes (temp file, fsync, rename); every process returns once the file is in place."""
    if is_primary():
        _write_text(path, text)
    barrier(f"mtjax-write:{path}")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _canonical(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, indent=2, default=str)


# Config sections that change how a run saves its work or reports it, not the algorithm: they may differ
# on resume (`checkpoint.sample_every_prompts` also sets how prompts are batched, which can move a sampled
# token where float rounding decides a draw; `logging` picks the tracking sinks).
OPERATIONAL_SECTIONS = ("checkpoint", "logging")


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`key.path: old -> new` for every leaf that differs between two nested configs (as saved in JSON),
    leaving out the `OPERATIONAL_SECTIONS` and the operational settings (`device_memory.OPERATIONAL_KEYS`)."""
    from mtjax.device_memory import OPERATIONAL_KEYS

    old, new = ({k: v for k, v in json.loads(_canonical(c)).items() if k not in OPERATIONAL_SECTIONS}
                for c in (old, new))
    return [c for c in _diff(old, new) if c.split(":", 1)[0] not in OPERATIONAL_KEYS]


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped); reads a run directory without opening it as one."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class RunDir:
    """A run directory bound to one config. `RunDir(path, config)` creates or reopens it."""

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any], allow_config_change: bool = False):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        config_file = self.path / "config.json"
        canonical = _canonical(config)
        if config_file.exists():
            saved = json.loads(config_file.read_text())
            changes = config_changes(saved, json.loads(canonical))
            if changes and not allow_config_change:
                raise ConfigMismatchError(
                    f"{self.path} was written by a different config ({len(changes)} change(s): "
                    f"{'; '.join(changes[:5])}). Use a new --workdir, or pass the override flag to resume "
                    "with the new config anyway."
                )
        _atomic_write_text(config_file, canonical + "\n")

    @staticmethod
    def has_completed(path: str | os.PathLike, phase: str) -> bool:
        """Whether the run directory at `path` (if any) recorded `phase`, read without opening it as a run."""
        file = Path(path) / "phases.json"
        return file.exists() and any(p["name"] == phase for p in json.loads(file.read_text()))

    @staticmethod
    def read_config(path: str | os.PathLike) -> dict:
        file = Path(path) / "config.json"
        if not file.exists():
            raise FileNotFoundError(f"{path} is not a run directory (no config.json)")
        return json.loads(file.read_text())

    # -- phases -------------------------------------------------------------------------------

    def _phases(self) -> list[dict]:
        file = self.path / "phases.json"
        return json.loads(file.read_text()) if file.exists() else []

    def completed(self) -> list[str]:
        return [p["name"] for p in self._phases()]

    def done(self, phase: str) -> bool:
        return phase in self.completed()

    def summary(self, phase: str) -> dict:
        for p in self._phases():
            if p["name"] == phase:
                return p["summary"]
        raise KeyError(f"phase {phase!r} has not completed in {self.path}")

    def mark_done(self, phase: str, summary: Mapping[str, Any] | None = None) -> None:
        """Records `phase` as complete — call only after all its outputs are written."""
        phases = [p for p in self._phases() if p["name"] != phase]
        phases.append({"name": phase, "summary": dict(summary or {})})
        _atomic_write_text(self.path / "phases.json", json.dumps(phases, indent=2, default=float) + "\n")

    def adopt_phases(self, other: RunDir, phases: Mapping[str, Iterable[str]]) -> None:
        """Copies finished phases of `other` (phase -> its files and folders) with their metrics rows, then
        records them done with their original summaries: as if this run had computed them."""
        for name, paths in phases.items():
            for rel in paths if is_primary() else ():
                src, dst = other.file(rel), self.file(rel)
                if dst.exists():
                    shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
            barrier(f"mtjax-adopt:{name}")
            for row in other.metrics():
                if row.get("phase") == name:
                    self.log_metrics(row)
            self.mark_done(name, other.summary(name))

    # -- artifacts ----------------------------------------------------------------------------

    def file(self, relpath: str) -> Path:
        return self.path / relpath

    def write_json(self, relpath: str, obj: Any) -> Path:
        path = self.file(relpath)
        _atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")
        return path

    def read_json(self, relpath: str) -> Any:
        return json.loads(self.file(relpath).read_text())

    def write_jsonl(self, relpath: str, rows: Iterable[Mapping[str, Any]]) -> Path:
        path = self.file(relpath)
        _atomic_write_text(path, "".join(json.dumps(r, default=float) + "\n" for r in rows))
        return path

    def read_jsonl(self, relpath: str) -> list[dict]:
        return read_jsonl(self.file(relpath))

    def log_metrics(self, row: Mapping[str, Any]) -> None:
        """Appends one row to metrics.jsonl (flushed and fsynced: a crash keeps every logged row)."""
        if not is_primary():
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(row), default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return self.read_jsonl("metrics.jsonl") if path.exists() else []

    # -- checkpoints --------------------------------------------------------------------------

    def save_params(self, relpath: str, params: Any) -> Path:
        """Saves a param pytree with Orbax: every process writes its shards into a temporary folder that
        is renamed into place once complete, so a crash never leaves a half-written checkpoint under `relpath`."""
        import orbax.checkpoint as ocp

        final = self.file(relpath).absolute()
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(final, params, force=True)
            ckpt.wait_until_finished()
        return final

    def load_params(self, relpath: str, like: Any = None) -> Any:
        """Restores a param pytree; `like` (arrays or ShapeDtypeStructs with shardings) places it. Without
        `like` it lands on this process's first device, whatever topology wrote it."""
        import jax
        import orbax.checkpoint as ocp

        path = self.file(relpath).absolute()
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}; the run directory is incomplete")
        with ocp.StandardCheckpointer() as ckpt:
            if like is None:
                device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
                meta = ckpt.metadata(path)  # orbax versions differ in how they wrap the tree
                tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
                like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
            return ckpt.restore(path, like)
