"""Loaders for the evaluation sets: IFEval/IFBench-style prompts, AlpacaEval-2, RewardBench-format pairs.

Every loader takes a local path (``.jsonl``, ``.json`` or ``.parquet``) or a hub dataset name for
``datasets.load_dataset``, so the same code runs offline on copied files and online from the hub.
Rows are validated on load and a malformed row raises an error naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtjax.testbed.gold import normalize_kwargs

HUB_ALIASES = {
    "ifeval": "google/IFEval",
    "ifbench": "allenai/IFBench_test",
    "alpaca_eval": "tatsu-lab/alpaca_eval",
}


@dataclass(frozen=True)
class InstructionPrompt:
    """An IFEval-format row: the prompt and its verifiable instructions (kwargs without None values)."""

    key: str
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class AlpacaEvalExample:
    instruction: str
    reference_output: str
    reference_generator: str
    dataset: str


@dataclass(frozen=True)
class PreferenceExample:
    """A RewardBench-format pair: ``chosen`` should score above ``rejected``."""

    prompt: str
    chosen: str
    rejected: str
    subset: str = "all"


def _is_local(source: str | Path) -> bool:
    return Path(source).exists() or Path(source).suffix in (".jsonl", ".json", ".parquet")


def read_rows(
    source: str | Path, split: str | None = None, hub_config: str | None = None
) -> list[dict[str, Any]]:
    """Rows of a local ``.jsonl``/``.json``/``.parquet`` file, or of a hub dataset split."""
    if _is_local(source):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation data file not found: {path}")
        if path.suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for line_number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg})") from e
            return rows
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and split is not None and split in data:
                data = data[split]
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
            return data
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        raise ValueError(
            f"unsupported evaluation data file type {path.suffix!r} ({path}); use .jsonl/.json/.parquet"
        )
    import datasets

    name = HUB_ALIASES.get(str(source), str(source))
    loaded = datasets.load_dataset(name, hub_config) if hub_config else datasets.load_dataset(name)
    if split is None:
        if len(loaded) != 1:
            raise ValueError(f"hub dataset {name!r} has splits {list(loaded)}; pass split=")
        split = next(iter(loaded))
    return list(loaded[split])


def _require(row: Mapping[str, Any], keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; row has {sorted(row)}")


def instruction_prompts_from_rows(
    rows: Iterable[Mapping[str, Any]], where: str = "rows"
) -> list[InstructionPrompt]:
    """Validate IFEval-format rows (``prompt``, ``instruction_id_list``, ``kwargs``; ``key`` or
    ``prompt_id`` optional) into :class:`InstructionPrompt`s."""
    prompts = []
    for index, row in enumerate(rows):
        at = f"{where} row {index}"
        _require(row, ("prompt", "instruction_id_list", "kwargs"), at)
        ids, kwargs = list(row["instruction_id_list"]), list(row["kwargs"] or [])
        if len(ids) != len(kwargs):
            raise ValueError(f"{at}: {len(ids)} instruction ids but {len(kwargs)} kwargs dicts")
        key = row.get("prompt_id", row.get("key", index))
        prompts.append(
            InstructionPrompt(str(key), row["prompt"], tuple(ids), tuple(normalize_kwargs(k) for k in kwargs))
        )
    return prompts


def load_instruction_prompts(source: str | Path, split: str | None = None) -> list[InstructionPrompt]:
    """IFEval (541), IFBench (299) or a generated split: a local file or a hub name/alias
    (``ifeval`` -> ``google/IFEval``, ``ifbench`` -> ``allenai/IFBench_test``)."""
    return instruction_prompts_from_rows(read_rows(source, split), where=str(source))


def load_alpaca_eval(source: str | Path, split: str | None = None) -> list[AlpacaEvalExample]:
    """AlpacaEval-2's 805 instructions with the baseline (GPT-4-turbo) outputs.

    A hub name loads config ``alpaca_eval_gpt4_baseline`` of ``tatsu-lab/alpaca_eval``.
    """
    if _is_local(source):
        rows = read_rows(source, split)
    else:
        rows = read_rows(source, split or "eval", hub_config="alpaca_eval_gpt4_baseline")
    examples = []
    for index, row in enumerate(rows):
        _require(row, ("instruction", "output"), f"{source} row {index}")
        examples.append(
            AlpacaEvalExample(
                row["instruction"],
                row["output"],
                row.get("generator", "baseline"),
                row.get("dataset", "unknown"),
            )
        )
    return examples


def load_preference_pairs(source: str | Path, split: str | None = None) -> list[PreferenceExample]:
    """RewardBench-format rows: ``prompt``, ``chosen``, ``rejected`` and optional ``subset``.

    A hub name loads e.g. ``allenai/reward-bench`` (pass ``split="filtered"``).
    """
    examples = []
    for index, row in enumerate(read_rows(source, split)):
        where = f"{source} row {index}"
        _require(row, ("prompt", "chosen", "rejected"), where)
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row[key], str):
                raise ValueError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
        examples.append(
            PreferenceExample(row["prompt"], row["chosen"], row["rejected"], str(row.get("subset", "all")))
        )
    return examples


def read_responses(path: str | Path, response_key: str = "response") -> list[dict[str, Any]]:
    """A JSONL of generated responses: each row has ``response_key`` and ``prompt``/``instruction``,
    ``key`` or ``prompt_id``."""
    rows = read_rows(path)
    for index, row in enumerate(rows):
        where = f"{path} row {index}"
        _require(row, (response_key,), where)
        if not isinstance(row[response_key], str):
            raise ValueError(
                f"{where}: {response_key!r} must be a string, got {type(row[response_key]).__name__}"
            )
        if not any(k in row for k in ("prompt", "instruction", "key", "prompt_id")):
            raise ValueError(
                f"{where}: needs 'prompt' (or 'instruction'), 'key' or 'prompt_id' to match it to its prompt"
            )
    return rows


def align_responses(
    prompts: Sequence[InstructionPrompt],
    rows: Sequence[Mapping[str, Any]],
    response_key: str = "response",
    allow_missing: bool = False,
) -> tuple[list[InstructionPrompt], list[str]]:
    """Match response rows to prompts by ``key``/``prompt_id`` when present, else by prompt text.

    Missing responses raise unless ``allow_missing`` (then those prompts are left out: the returned
    prompt list says which were scored). Responses to unknown prompts always raise.
    """
    by_key = {p.key: p for p in prompts}
    by_text = {p.prompt: p for p in prompts}
    found: dict[str, str] = {}
    for index, row in enumerate(rows):
        key = row.get("key", row.get("prompt_id"))
        prompt = by_key.get(str(key)) if key is not None else None
        if prompt is None and "prompt" in row:
            prompt = by_text.get(row["prompt"])
        if prompt is None:
            raise ValueError(
                f"response row {index} matches no prompt "
                f"(key={key!r}, prompt={str(row.get('prompt'))[:60]!r})"
            )
        if prompt.key in found:
            raise ValueError(f"response row {index}: a second response for prompt {prompt.key!r}")
        found[prompt.key] = row[response_key]
    missing = [p.key for p in prompts if p.key not in found]
    if missing and not allow_missing:
        raise ValueError(f"{len(missing)} of {len(prompts)} prompts have no response (first: {missing[:5]})")
    kept = [p for p in prompts if p.key in found]
    return kept, [found[p.key] for p in kept]
