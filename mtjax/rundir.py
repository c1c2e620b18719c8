"""The run directory: its config, its phases and the artifacts each phase wrote, metrics and checkpoints.

Multi-process runs share one run directory on storage every host sees: process 0 writes files (and
the others wait at a barrier before reading them); checkpoints are written by all processes through
Orbax, each its own shards.

Resume is phase-granular: a phase's outputs are written first (each file atomically: temp name,
then rename), and only then is the phase recorded done in `phases.json`. A crash, `kill -9` or Ctrl-C
therefore loses at most the phase in flight, and a rerun skips every finished phase (a training phase
in flight also saves its train state as it goes: `mtjax.train_checkpoint`).

`phases.json` is the run's record, and the only file the run trusts:
  - `config`: the run's config (`config.json` is its readable copy; a run directory whose phases.json
    records phases but whose config.json is gone is refused, never rewritten from a new command line);
  - per phase: its state, summary, the config sections it does not depend on, and every artifact it
    wrote with its size and SHA-256. A rerun checks them all (`repair`): a phase whose artifact is
    missing or changed is redone, and the finished phases that depend on it wait for it — kept if the
    redone phase writes the same bytes again, redone otherwise.
A config change is accepted when no finished phase depends on the changed sections (e.g. a learning rate
that made the first training phase diverge), refused otherwise with the changes and phases named.

Layout:
    RUN/phases.json      {"format": 2, "config": {...}, "phases": [{"name", "state", "summary",
                         "independent_of", "artifacts": {relpath: {"bytes", "sha256"}}}, ...]}
    RUN/config.json      the config, for people
    RUN/metrics.jsonl    one JSON object per logged row (steps and phase summaries), append-only
    RUN/<phase files>    JSONL artifacts and Orbax checkpoints named by the caller
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from mtjax.distributed import barrier, is_primary
from mtjax.layout import CONFIG_FILE, METRICS_FILE, PHASES_FILE  # the run's record (names in mtjax.layout)

FORMAT = 2
# Phase states: running (in flight; its artifacts so far are recorded), done, redo (was done; an artifact is
# damaged), stale (was done; waits for a redone phase it depends on).
RUNNING, DONE, REDO, STALE = "running", "done", "redo", "stale"

# Config sections that change how a run saves its work or reports it, not the algorithm: they may differ
# on resume (`checkpoint.sample_every_prompts` also sets how prompts are batched, which can move a sampled
# token where float rounding decides a draw; `logging` picks the tracking sinks). Single operational
# settings (batching, micro-batching, remat) are `device_memory.OPERATIONAL_KEYS`.
OPERATIONAL_SECTIONS = ("checkpoint", "logging")
# Names for settings the config holds anyway (`arm`: the name of `mtjax.arms`' settings, which are in their
# sections): two configs differing only in such a name run the same computation.
LABELS = ("arm",)


class RunDirError(RuntimeError):
    """A run-directory file that cannot be read, parsed or written; the message names it."""


class ConfigMismatchError(RunDirError):
    pass


# ----------------------------------------------------------------------------- files


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunDirError(f"cannot write {path}: {e.strerror or e}") from None


def _atomic_write_text(path: Path, text: str) -> None:
    """Process 0 writes (temp file, fsync, rename); every process returns once the file is in place."""
    if is_primary():
        _write_text(path, text)
    barrier(f"mtjax-write:{path}")


def _canonical(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, indent=2, default=str)


def read_json_file(path: str | os.PathLike, error: type[Exception] = RunDirError) -> Any:
    """A JSON file's value; an unreadable or damaged file is an `error` (a `RunDirError` unless the caller
    names its own, e.g. `sources.SourceError` for a model folder's file) naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; the file is damaged") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); the file is damaged") from None


def read_jsonl(path: str | os.PathLike, partial_last_line: bool = False) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped); a bad line is a `RunDirError` naming file and line.
    With `partial_last_line`, a last line cut short by an interrupted append (no newline) is left out."""
    rows, problem = read_jsonl_prefix(path)
    if problem is not None and not (partial_last_line and problem.endswith(_CUT_SHORT)):
        raise RunDirError(problem)
    return rows


_CUT_SHORT = "(the last line, cut short)"


def read_jsonl_prefix(path: str | os.PathLike) -> tuple[list[dict], str | None]:
    """The rows before the first bad line, and what is wrong with that line (None if every line is good)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise RunDirError(f"cannot read {path}: {e.strerror or e}") from None
    rows = []
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            last = number == len(lines)  # no newline after it: an append that did not finish
            reason = getattr(e, "msg", "not UTF-8")
            return rows, f"{path}: line {number}: not valid JSON ({reason}){' ' + _CUT_SHORT if last else ''}"
        if not isinstance(row, dict):
            return rows, f"{path}: line {number}: expected a JSON object, found {type(row).__name__}"
        rows.append(row)
    return rows, None


def _drop_partial_last_line(path: Path) -> int:
    """Cuts a last line that has no newline (an append cut short by a crash or a full disk); returns the
    number of bytes removed."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        f.truncate(end)
        return size - end


# ----------------------------------------------------------------------------- artifacts


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def artifact_digest(path: str | os.PathLike) -> dict[str, Any]:
    """Size and SHA-256 of a file, or of a folder's files (names included) for an Orbax checkpoint."""
    path = Path(path)
    if not path.is_dir():
        return {"bytes": path.stat().st_size, "sha256": _file_sha256(path)}
    digest, total, files = hashlib.sha256(), 0, sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}\0{size}\0{_file_sha256(file)}\n".encode())
        total += size
    return {"bytes": total, "files": len(files), "sha256": digest.hexdigest()}


def _text_digest(text: str) -> dict[str, Any]:
    data = text.encode("utf-8")
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _damage(path: Path, recorded: Mapping[str, Any]) -> str | None:
    """What is wrong with an artifact compared with its record (None: intact)."""
    if not path.exists():
        return "is missing"
    try:
        found = artifact_digest(path)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if found["bytes"] != recorded["bytes"]:
        return f"has changed ({found['bytes']} bytes, {recorded['bytes']} when written)"
    if found["sha256"] != recorded["sha256"]:
        return "has changed (same size, different contents)"
    return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class Damage:
    phase: str
    relpath: str
    problem: str  # "is missing", "has changed (...)"


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class ConfigChange:
    key: str  # dotted path
    old: Any
    new: Any

    @property
    def section(self) -> str:
        return self.key.split(".")[0]

    def within(self, names: Iterable[str]) -> bool:
        """Whether the changed setting is one of `names`: sections (`dpo`) or single settings
        (`reward_model.head_seed`)."""
        return any(self.key == n or self.key.startswith(f"{n}.") for n in names)

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


_ABSENT = "<absent>"


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[ConfigChange]:
    """The leaves that differ between two nested configs, as `config_changes` lists them."""
    from mtjax.device_memory import OPERATIONAL_KEYS
    from mtjax.settings import library_default

    old, new = ({k: v for k, v in json.loads(_canonical(c)).items() if k not in OPERATIONAL_SECTIONS + LABELS}
                for c in (old, new))
    # A setting added to the library after `old` was written, now at its default, is what `old` ran with.
    return [c for c in _diff(old, new) if c.key not in OPERATIONAL_KEYS
            and not (c.old == _ABSENT and c.new == library_default(c.key))]


def _diff(old: Any, new: Any, prefix: str = "") -> list[ConfigChange]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}{key}.")
        return out
    return [] if old == new else [ConfigChange(prefix.rstrip("."), old, new)]


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`key.path: old -> new` for every leaf that differs between two nested configs (as saved in JSON),
    leaving out the `OPERATIONAL_SECTIONS` and `device_memory.OPERATIONAL_KEYS`."""
    return [str(c) for c in config_diff(old, new)]


# ----------------------------------------------------------------------------- the run directory


class RunDir:
    """A run directory bound to one config. `RunDir(path, config)` creates or reopens it for a run;
    `RunDir.open_read_only(path)` reads one without writing anything (export, report, comparisons)."""

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any], allow_config_change: bool = False):
        self.path = Path(path)
        self.read_only = False
        self._in_flight: str | None = None
        self._metrics_checked = False
        if is_primary():
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RunDirError(f"cannot create the run directory {self.path}: {e.strerror or e}") from None
        barrier(f"mtjax-rundir:{self.path}")
        new = json.loads(_canonical(config))
        record = self._read_record()
        barrier(f"mtjax-rundir-read:{self.path}")  # every process decides on the same record
        self.accepted_changes: list[ConfigChange] = []
        if record["config"] is not None:
            changes = config_diff(record["config"], new)
            refused = self._refused(changes, record["phases"])
            if refused and not allow_config_change:
                raise ConfigMismatchError(
                    f"{self.path} was written by a different config ({len(refused)} change(s) to settings that "
                    f"finished phases used: {'; '.join(refused[:5])}). Use a new --workdir, or pass "
                    "--override_config to resume with the new config anyway.")
            self.accepted_changes = changes
        record["config"] = new
        self._write_record(record)
        _atomic_write_text(self.path / CONFIG_FILE, _canonical(new) + "\n")

    @classmethod
    def open_read_only(cls, path: str | os.PathLike) -> RunDir:
        self = cls.__new__(cls)
        self.path, self.read_only, self._in_flight, self._metrics_checked = Path(path), True, None, True
        self.accepted_changes = []
        if not self.path.is_dir():
            raise FileNotFoundError(f"{path}: no such run directory")
        if self._read_record()["config"] is None:
            raise FileNotFoundError(f"{path} is not a run directory (no {CONFIG_FILE})")
        return self

    @staticmethod
    def read_config(path: str | os.PathLike) -> dict:
        return RunDir.open_read_only(path).config

    @staticmethod
    def has_completed(path: str | os.PathLike, phase: str) -> bool:
        """Whether the run directory at `path` (if there is one) recorded `phase` done; reads only."""
        try:
            return RunDir.open_read_only(path).done(phase)
        except FileNotFoundError:
            return False

    @property
    def config(self) -> dict:
        return self._read_record()["config"]

    # -- the record (phases.json) -------------------------------------------------------------

    def _read_record(self) -> dict:
        phases_file, config_file = self.path / PHASES_FILE, self.path / CONFIG_FILE
        raw = read_json_file(phases_file) if phases_file.exists() else None
        if raw is None:
            record = {"format": FORMAT, "config": None, "phases": []}
        elif isinstance(raw, list):  # format 1: a list of {"name", "summary"}, config only in config.json
            record = {"format": FORMAT, "config": None, "phases": [
                {"name": p.get("name"), "state": DONE, "summary": p.get("summary", {}), "artifacts": {}}
                for p in raw if isinstance(p, dict)]}
        elif isinstance(raw, dict) and isinstance(raw.get("config"), dict) and isinstance(raw.get("phases"), list):
            record = raw
        else:
            raise RunDirError(f"{phases_file}: expected the run's phase record ({{\"config\": {{...}}, "
                              f"\"phases\": [...]}}); the file is damaged")
        for i, entry in enumerate(record["phases"]):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and entry.get("state", DONE) in (RUNNING, DONE, REDO, STALE)):
                raise RunDirError(f"{phases_file}: phase record {i} is malformed; the file is damaged")
        saved = None
        if config_file.exists():
            saved = read_json_file(config_file)
            if not isinstance(saved, dict):
                raise RunDirError(f"{config_file}: expected a JSON object holding the run's config, found "
                                  f"{type(saved).__name__}; the file is damaged")
        elif record["phases"]:
            raise RunDirError(
                f"{config_file} is missing, but {phases_file} records phases "
                f"({', '.join(e['name'] for e in record['phases'][:4])} ...): part of this run directory was "
                f"deleted. Restore {CONFIG_FILE} (phases.json keeps a copy under \"config\") or use a new --workdir.")
        if record["config"] is None:
            record["config"] = saved
        return record

    def _write_record(self, record: Mapping[str, Any]) -> None:
        self._check_writable()
        _atomic_write_text(self.path / PHASES_FILE, json.dumps(record, indent=1, default=float) + "\n")

    def _update(self, change: Callable[[dict], Any]) -> Any:
        """Applies `change` to the record on process 0 and saves it; every process returns after that."""
        self._check_writable()
        result = None
        if is_primary():
            record = self._read_record()
            result = change(record)
            _write_text(self.path / PHASES_FILE, json.dumps(record, indent=1, default=float) + "\n")
        barrier(f"mtjax-record:{self.path}")
        return result

    def _check_writable(self) -> None:
        if self.read_only:
            raise RunDirError(f"{self.path} is open read-only")

    @staticmethod
    def _refused(changes: Iterable[ConfigChange], entries: Iterable[dict]) -> list[str]:
        """The changes that a finished (or redone, or waiting) phase depends on, with those phases named."""
        out = []
        for change in changes:
            users = [e["name"] for e in entries
                     if e.get("state", DONE) != RUNNING and not change.within(e.get("independent_of", ()))]
            if users:
                out.append(f"{change} (used by {', '.join(users[:3])}{' ...' if len(users) > 3 else ''})")
        return out

    def _entries(self) -> list[dict]:
        return self._read_record()["phases"]

    @staticmethod
    def _find(record: Mapping[str, Any], name: str) -> dict | None:
        return next((e for e in record["phases"] if e["name"] == name), None)

    # -- phases -------------------------------------------------------------------------------

    def completed(self) -> list[str]:
        return [e["name"] for e in self._entries() if e.get("state", DONE) == DONE]

    def in_flight(self) -> list[str]:
        """Phases that started and have not finished (their artifacts so far are recorded)."""
        return [e["name"] for e in self._entries() if e.get("state") == RUNNING]

    def done(self, phase: str) -> bool:
        return phase in self.completed()

    def summary(self, phase: str) -> dict:
        for e in self._entries():
            if e["name"] == phase and e.get("state", DONE) == DONE:
                return e["summary"]
        raise KeyError(f"phase {phase!r} has not completed in {self.path}")

    def start_phase(self, phase: str, independent_of: Iterable[str] = ()) -> None:
        """Records `phase` as in flight: the artifacts written from now on are recorded under it.
        `independent_of`: config sections (or single settings) whose change does not affect this phase's results."""
        def start(record):
            entry = self._find(record, phase)
            if entry is None:
                record["phases"].append({"name": phase, "state": RUNNING, "summary": {}, "artifacts": {}})
                entry = record["phases"][-1]
            elif entry.get("state") == STALE:  # started before the phase it waits for was redone: start afresh
                for rel in entry["artifacts"]:
                    _remove(self.file(rel))
                entry.update(artifacts={}, waits_for=[])
            entry.update(state=RUNNING, independent_of=sorted(independent_of))
        self._update(start)
        self._in_flight = phase

    def abandon_phase(self) -> None:
        """The phase in flight stopped (an error or interrupt); it stays recorded as running."""
        self._in_flight = None

    def record_artifact(self, relpath: str, digest: Mapping[str, Any] | None = None,
                        keep_recorded: bool = False) -> None:
        """Records `relpath` (size and checksum) as an output of the phase in flight; outside a phase, nothing.
        `keep_recorded`: leave an existing record as it is (a file an earlier attempt at the phase wrote)."""
        phase = self._in_flight
        if phase is None:
            return

        def record(rec):
            entry = self._find(rec, phase)
            if entry is not None and not (keep_recorded and relpath in entry["artifacts"]):
                entry["artifacts"][relpath] = dict(digest or artifact_digest(self.file(relpath)))
        self._update(record)

    def mark_done(self, phase: str, summary: Mapping[str, Any] | None = None) -> list[str]:
        """Records `phase` as complete — call only after all its outputs are written. If the phase was redone,
        the phases waiting for it are kept when it wrote the same bytes as before and dropped (their
        artifacts deleted, to be redone) otherwise; returns one message per phase dropped or kept."""
        def finish(record):
            entry = self._find(record, phase)
            if entry is None:
                record["phases"].append(entry := {"name": phase, "artifacts": {}})
            previous = entry.pop("previous", None)
            entry.update(state=DONE, summary=dict(summary or {}))
            return [] if previous is None else self._settle_waiting(record, phase, previous == entry["artifacts"])
        messages = self._update(finish) or []
        self._in_flight = None
        return messages

    def _settle_waiting(self, record: dict, phase: str, same_outputs: bool) -> list[str]:
        """Settles the stale phases waiting for `phase`: kept once nothing they wait for changed, dropped (their
        artifacts deleted) as soon as something did; either settles the phases waiting for them in turn."""
        messages, settled = [], [(phase, same_outputs)]
        while settled:
            name, same = settled.pop(0)
            for entry in list(record["phases"]):
                if entry.get("state") != STALE or name not in entry.get("waits_for", ()):
                    continue
                if same:
                    entry["waits_for"].remove(name)
                    if not entry["waits_for"]:
                        entry["state"] = DONE
                        entry.pop("waits_for")
                        messages.append(f"{entry['name']} is kept: {phase} wrote the same outputs again")
                        settled.append((entry["name"], True))
                else:
                    for rel in entry["artifacts"]:
                        _remove(self.file(rel))
                    record["phases"].remove(entry)
                    messages.append(f"{entry['name']} will be redone: {phase} wrote different outputs")
                    settled.append((entry["name"], False))
        return messages

    def check_artifacts(self, phases: Iterable[str] | None = None) -> list[Damage]:
        """Every recorded artifact (of `phases`, default all) compared with its size and checksum."""
        wanted = None if phases is None else set(phases)
        return [Damage(e["name"], rel, problem) for e in self._entries() if wanted is None or e["name"] in wanted
                for rel, digest in e["artifacts"].items()
                if (problem := _damage(self.file(rel), digest)) is not None]

    def repair(self, depends_on: Callable[[str, str], bool]) -> list[str]:
        """Checks every artifact; a phase with a missing or changed one is redone (its intact artifacts are
        kept for it), and the finished phases that depend on it (`depends_on(later, earlier)`) wait for it.
        An in-flight phase just loses the damaged artifact. Returns one message per problem found."""
        def fix(record):
            damage = [Damage(e["name"], rel, problem) for e in record["phases"]
                      for rel, digest in e["artifacts"].items()
                      if (problem := _damage(self.file(rel), digest)) is not None]
            messages, redo = [], []
            for d in damage:
                entry = self._find(record, d.phase)
                _remove(self.file(d.relpath))
                if entry["state"] == RUNNING:
                    del entry["artifacts"][d.relpath]
                    messages.append(f"{self.file(d.relpath)} {d.problem}; {d.phase} will write it again")
                    continue
                if entry["state"] != REDO:
                    entry["previous"] = dict(entry["artifacts"])
                    entry["state"] = REDO
                    entry.pop("waits_for", None)
                    redo.append(d.phase)
                del entry["artifacts"][d.relpath]
                messages.append(f"{self.file(d.relpath)} {d.problem}; redoing {d.phase}")
            waiting = {e["name"] for e in record["phases"] if e["state"] in (REDO, STALE) or "previous" in e}
            newly_stale = []
            for entry in record["phases"]:  # in completion order: dependents of dependents follow
                if entry["state"] == DONE and entry["name"] not in waiting:
                    inputs = sorted(w for w in waiting if depends_on(entry["name"], w))
                    if inputs:
                        entry.update(state=STALE, waits_for=inputs)
                        waiting.add(entry["name"])
                        newly_stale.append(entry["name"])
            if newly_stale:
                messages.append(f"{', '.join(newly_stale)} wait for {', '.join(redo)}: kept if the redone phases "
                                "write the same outputs again, redone otherwise")
            return messages
        return self._update(fix) or []

    def discard_in_flight(self, phase: str) -> None:
        """Deletes what an unfinished phase has written so far (it starts again from nothing)."""
        def discard(record):
            entry = self._find(record, phase)
            if entry is not None and entry.get("state") == RUNNING:
                for rel in entry["artifacts"]:
                    _remove(self.file(rel))
                record["phases"].remove(entry)
        self._update(discard)

    def adopt_phases(self, other: RunDir, phases: Mapping[str, Iterable[str]]) -> None:
        """Copies finished phases of `other` (phase -> its files and folders) with their metrics rows and records
        (summaries and artifact checksums): as if this run had computed them."""
        for name, paths in phases.items():
            for rel in paths if is_primary() else ():
                src, dst = other.file(rel), self.file(rel)
                _remove(dst)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
            barrier(f"mtjax-adopt:{name}")
            for row in other.metrics():
                if row.get("phase") == name:
                    self.log_metrics(row)
            theirs = next(e for e in other._entries() if e["name"] == name)

            def adopt(record, theirs=theirs):
                record["phases"] = [e for e in record["phases"] if e["name"] != theirs["name"]]
                record["phases"].append({**theirs, "state": DONE})
            self._update(adopt)

    # -- artifacts ----------------------------------------------------------------------------

    def file(self, relpath: str) -> Path:
        return self.path / relpath

    def write_json(self, relpath: str, obj: Any, artifact: bool = True) -> Path:
        """Writes `relpath` atomically; with `artifact`, records it as an output of the phase in flight."""
        return self._write(relpath, json.dumps(obj, indent=2, default=float) + "\n", artifact)

    def write_jsonl(self, relpath: str, rows: Iterable[Mapping[str, Any]], artifact: bool = True) -> Path:
        return self._write(relpath, "".join(json.dumps(r, default=float) + "\n" for r in rows), artifact)

    def _write(self, relpath: str, text: str, artifact: bool) -> Path:
        self._check_writable()
        path = self.file(relpath)
        _atomic_write_text(path, text)
        if artifact:
            self.record_artifact(relpath, _text_digest(text))
        return path

    def read_json(self, relpath: str) -> Any:
        return read_json_file(self.file(relpath))

    def read_jsonl(self, relpath: str) -> list[dict]:
        return read_jsonl(self.file(relpath))

    def log_metrics(self, row: Mapping[str, Any]) -> None:
        """Appends one row to metrics.jsonl (flushed and fsynced: a crash keeps every logged row). A last line
        cut short by an earlier crash or full disk is removed first, so no row is glued onto it."""
        self._check_writable()
        if not is_primary():
            return
        path = self.path / METRICS_FILE
        try:
            if not self._metrics_checked and path.exists():
                cut = _drop_partial_last_line(path)
                if cut:
                    print(f"mtjax: {path} ended in a line cut short ({cut} bytes, from an interrupted write); "
                          "removed it before appending", flush=True)
            self._metrics_checked = True
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(row), default=float) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise RunDirError(f"cannot write {path}: {e.strerror or e}") from None

    def metrics(self) -> list[dict]:
        path = self.path / METRICS_FILE
        return read_jsonl(path, partial_last_line=True) if path.exists() else []

    # -- checkpoints --------------------------------------------------------------------------

    def save_params(self, relpath: str, params: Any, artifact: bool = True) -> Path:
        """Saves a param pytree with Orbax: every process writes its shards into a temporary folder that
        is renamed into place once complete, so a crash never leaves a half-written checkpoint under
        `relpath`. Refuses weights that are not finite (`DivergenceError`)."""
        import orbax.checkpoint as ocp

        from mtjax.divergence import DivergenceError, all_finite

        self._check_writable()
        final = self.file(relpath).absolute()
        if not all_finite(params):
            raise DivergenceError(f"refusing to save weights that are not finite to {final}")
        try:
            with ocp.StandardCheckpointer() as ckpt:
                ckpt.save(final, params, force=True)
                ckpt.wait_until_finished()
        except Exception as e:  # tensorstore reports a full disk or a read-only folder as ValueError etc.
            if is_primary():
                for tmp in final.parent.glob(f"{final.name}.orbax-checkpoint-tmp*"):
                    _remove(tmp)
            raise RunDirError(f"cannot write the checkpoint {final}: {first_line(e)}") from None
        if artifact:
            self.record_artifact(relpath)
        return final

    def load_params(self, relpath: str, like: Any = None) -> Any:
        """Restores a param pytree; `like` (arrays or ShapeDtypeStructs with shardings) places it. Without
        `like` it lands on this process's first device, whatever topology wrote it. A read-only run directory
        checks the checkpoint against its recorded checksum first."""
        path = self.file(relpath).absolute()
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}; the run directory is incomplete")
        if self.read_only:
            for entry in self._entries():
                if relpath in entry["artifacts"] and (problem := _damage(path, entry["artifacts"][relpath])):
                    raise RunDirError(f"{path} {problem} since {entry['name']} wrote it; rerun the run's command "
                                      f"to redo {entry['name']}")
        return restore_params(path, like)


def restore_params(path: str | os.PathLike, like: Any = None) -> Any:
    """The param pytree of the Orbax checkpoint folder `path`; `like` (arrays or ShapeDtypeStructs with
    shardings) places it, without it it lands on this process's first device. A missing or damaged folder is
    one `RunDirError` naming it."""
    import jax
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.exists():
        raise RunDirError(f"no checkpoint at {path}")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            if like is None:
                device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
                meta = ckpt.metadata(path)  # orbax versions differ in how they wrap the tree
                tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
                like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
            return ckpt.restore(path, like)
    except Exception as e:  # a damaged folder (checksums catch recorded ones first), or a lost peer process
        raise RunDirError(f"cannot read the checkpoint {path}: {first_line(e)}") from None


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (tensorstore and XLA errors run for pages)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
