"""The prompts of a run: D_1..D_T for the policy and D_R for the reward model, from the generated testbed or
any prompt set (a local `.jsonl` / `.json` / `.parquet` file, a `save_to_disk` folder, or a hub dataset
read through `datasets` and its cache, so `HF_HOME` / `HF_HUB_OFFLINE` work as usual).

A prompt is a string, or a chat (a list of `{role, content}` turns, cut after its last user turn). Every
prompt is measured in the policy's and the reward model's own chat templates before anything is sampled:
one longer than `max_prompt_tokens`, or one that cannot fit a model's context with the response budget,
is dropped and counted by reason, never sampled. Real prompt sets hold a few prompts of thousands of
tokens (UltraFeedback, Arena-Hard); SimPO's recipe caps prompts at 1800 of 2048 tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

Prompt = str | list  # a string, or chat turns [{"role": ..., "content": ...}, ...] ending with a user turn


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """Where the training prompts come from and how many each split takes.

    source: 'testbed' (the prompts the run's task generates, `mtjax.tasks`) or a prompt set for D_1..D_T
      and D_R (a local file, a `save_to_disk` folder, or a hub dataset id read with `split` / `column` /
      `revision`; testbed task only); the held-out evaluation and the base-RM label split always come
      from the task.
    column: the prompt column: a string, or chat turns (e.g. `messages`, or a `prompt` list of turns).
    seed: shuffles the prompt set before it is split (the task's prompt generator's seed too).
    policy: one size per iteration (D_1..D_T); reward_model: |D_R|; base_rm_labels, heldout_eval: the task's;
      sft: the task's prompts whose demonstrations train π0 in the sft phase (0 = none).
    max_prompt_tokens: longer prompts (in the policy's chat template) are dropped before sampling.
    """

    source: str = "testbed"
    split: str = "train"
    column: str = "prompt"
    revision: str | None = None
    seed: int = 0
    policy: tuple[int, ...] = (8, 8)
    reward_model: int = 8
    base_rm_labels: int = 8
    heldout_eval: int = 8
    sft: int = 0
    max_prompt_tokens: int = 512

    def __post_init__(self) -> None:
        problems = []
        if not self.policy or any(not isinstance(n, int) or n < 1 for n in self.policy):
            problems.append(f"policy={self.policy!r} must be one size >= 1 per iteration")
        for name in ("reward_model", "heldout_eval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r} must be an int >= 1")
        for name in ("base_rm_labels", "sft"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r} must be an int >= 0")
        if not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 1:
            problems.append(f"max_prompt_tokens={self.max_prompt_tokens!r} must be an int >= 1")
        if not self.source or not self.column or not self.split:
            problems.append("source, split and column must be non-empty")
        if problems:
            raise ValueError("; ".join(f"PromptConfig.{p}" for p in problems))

    @property
    def sizes(self) -> dict[str, int]:
        """The splits drawn from an external prompt set, in the order they are filled."""
        return {f"policy_{t}": n for t, n in enumerate(self.policy, start=1)} | {"reward_model": self.reward_model}


class PromptSetError(ValueError):
    """A prompt set cannot be read or does not hold what the run needs; the message names the file or setting."""


# ----------------------------------------------------------------------------- reading


def read_prompt_column(cfg: PromptConfig) -> list[Any]:
    """The `cfg.column` values of `cfg.source` (not the testbed), with errors that name the file and line, or
    the hub id and what to do offline. Hub and saved datasets are read one column only (UltraFeedback's
    responses are not loaded)."""
    from mtjax.sources import is_hub_id

    path = Path(cfg.source).expanduser()
    if path.is_dir():
        return _column(_read_saved_dataset(path, cfg), cfg)
    if path.is_file() or path.suffix in (".jsonl", ".json", ".parquet"):
        rows = _read_file(path)
        missing = next((i for i, row in enumerate(rows) if cfg.column not in row), None)
        if missing is not None:
            raise PromptSetError(f"prompts.source={cfg.source!r} row {missing}: no column {cfg.column!r} (it has "
                                 f"{sorted(rows[missing])}); set prompts.column")
        return [row[cfg.column] for row in rows]
    if is_hub_id(cfg.source):
        return _column(_read_hub(cfg), cfg)
    raise PromptSetError(f"prompts.source={cfg.source!r}: no such file or folder, and not a hub dataset id "
                         "(owner/name)")


def _column(table: Any, cfg: PromptConfig) -> list[Any]:
    if cfg.column not in table.column_names:
        raise PromptSetError(f"prompts.source={cfg.source!r} has no column {cfg.column!r} (columns: "
                             f"{table.column_names}); set prompts.column")
    return list(table.select_columns([cfg.column])[cfg.column])


def _read_file(path: Path) -> list[Mapping[str, Any]]:
    from mtjax.testbed.benchmarks import read_rows

    if not path.is_file():
        raise PromptSetError(f"prompts.source={str(path)!r}: no such file")
    try:
        rows = read_rows(path)
    except UnicodeDecodeError as e:
        raise PromptSetError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from e
    except (ValueError, OSError) as e:  # read_rows names the file and line
        raise PromptSetError(str(e)) from e
    except Exception as e:  # a damaged parquet file
        raise PromptSetError(f"{path}: cannot read it ({type(e).__name__}: {e})") from e
    if not rows:
        raise PromptSetError(f"{path}: holds no rows")
    return rows


def _read_saved_dataset(path: Path, cfg: PromptConfig) -> Any:
    import datasets

    try:
        table = datasets.load_from_disk(str(path))
    except Exception as e:
        raise PromptSetError(f"prompts.source={str(path)!r}: not a dataset folder written by save_to_disk ({e})") from e
    if isinstance(table, datasets.DatasetDict):
        if cfg.split not in table:
            raise PromptSetError(f"{path}: no split {cfg.split!r} (splits: {list(table)}); set prompts.split")
        table = table[cfg.split]
    return table


def _read_hub(cfg: PromptConfig) -> Any:
    import datasets

    try:
        return datasets.load_dataset(cfg.source, split=cfg.split, revision=cfg.revision)
    except ValueError as e:
        if "split" in str(e).lower():
            raise PromptSetError(f"prompts.source={cfg.source!r}: {e}; set prompts.split") from e
        raise PromptSetError(f"prompts.source={cfg.source!r}: {e}") from e
    except Exception as e:  # offline and not cached, no network, gated, unknown
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PromptSetError(
            f"prompts.source={cfg.source!r}: cannot load it ({reason}). Give a local file instead "
            "(--config.prompts.source=prompts.jsonl, one JSON object per line with a prompt column), or load it "
            "once where the hub is reachable (the datasets cache is $HF_HOME/datasets) and run with "
            "HF_HUB_OFFLINE=1") from e


def prompt_of(value: Any, where: str) -> Prompt | None:
    """A row's prompt: a stripped string, or chat turns cut after the last user turn (a chat of one user turn
    is its text). None for an empty prompt (skipped and counted)."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, Sequence) and all(isinstance(m, Mapping) for m in value):
        turns = [{"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in value]
        last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=None)
        if last_user is None:
            raise PromptSetError(f"{where}: a chat with no user turn (roles {[m['role'] for m in turns]})")
        turns = turns[: last_user + 1]
        if len(turns) == 1:
            return turns[0]["content"].strip() or None
        return turns
    raise PromptSetError(f"{where}: a prompt must be a string or a list of {{role, content}} turns, "
                         f"got {type(value).__name__}")


def read_prompts(cfg: PromptConfig) -> tuple[list[Prompt], Counter]:
    """The distinct prompts of the source in file order, and how many rows were skipped (empty, duplicate)."""
    prompts: dict[str, Prompt] = {}
    counts: Counter = Counter()
    for i, value in enumerate(read_prompt_column(cfg)):
        prompt = prompt_of(value, f"prompts.source={cfg.source!r} row {i}")
        if prompt is None:
            counts["skipped_empty"] += 1
            continue
        key = prompt_key(prompt)
        if key in prompts:
            counts["skipped_duplicate"] += 1
            continue
        prompts[key] = prompt
    if not prompts:
        raise PromptSetError(f"prompts.source={cfg.source!r}: no non-empty prompt in column {cfg.column!r}")
    return list(prompts.values()), counts


def prompt_key(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def prompt_id(prompt: Prompt) -> str:
    return hashlib.sha256(prompt_key(prompt).encode()).hexdigest()[:16]


def prompt_text(prompt: Prompt) -> str:
    """The text shown for a prompt (and used by text-keyed evaluators): a chat's last user turn."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


# ----------------------------------------------------------------------------- length


@dataclasses.dataclass(frozen=True)
class PromptLimits:
    """What a prompt must fit: the cap, and each model's context minus the response budget."""

    max_prompt_tokens: int
    max_new_tokens: int
    policy_context: int
    reward_context: int

    def reason_to_drop(self, policy_tokens: int, reward_tokens: int) -> str | None:
        if policy_tokens > self.max_prompt_tokens:
            return "dropped_longer_than_max_prompt_tokens"
        if policy_tokens + self.max_new_tokens > self.policy_context:
            return "dropped_exceeds_policy_context"
        if reward_tokens + self.max_new_tokens > self.reward_context:
            return "dropped_exceeds_reward_model_context"
        return None


def fitting_prompts(prompts: Sequence[Prompt], limits: PromptLimits, measure: Callable[[Prompt], tuple[int, int]],
                    wanted: int | None = None) -> tuple[list[int], Counter]:
    """Indices of the prompts that fit `limits` (the first `wanted` of them, if given; `measure` gives a
    prompt's policy and reward-model token counts), and the dropped ones counted by reason."""
    kept, counts = [], Counter()
    for i, prompt in enumerate(prompts):
        if wanted is not None and len(kept) == wanted:
            break
        reason = limits.reason_to_drop(*measure(prompt))
        if reason:
            counts[reason] += 1
        else:
            kept.append(i)
    return kept, counts


def external_splits(cfg: PromptConfig, limits: PromptLimits, measure: Callable[[Prompt], tuple[int, int]]
                    ) -> tuple[dict[str, list[dict[str, Any]]], Counter]:
    """D_1..D_T and D_R drawn from the shuffled (by `cfg.seed`) distinct prompts of `cfg.source` that fit
    `limits`, as prompt rows; and the counts of what was skipped or dropped."""
    import numpy as np

    prompts, counts = read_prompts(cfg)
    order = np.random.default_rng(cfg.seed).permutation(len(prompts))
    shuffled = [prompts[i] for i in order]
    need = sum(cfg.sizes.values())
    kept, dropped = fitting_prompts(shuffled, limits, measure, wanted=need)
    counts.update(dropped)
    if len(kept) < need:
        raise PromptSetError(
            f"prompts.source={cfg.source!r} has {len(prompts)} distinct prompts, {len(kept)} of them fit "
            f"({dict(dropped) or 'none dropped'}); the splits need {need} ({cfg.sizes}): lower the split sizes "
            "or raise prompts.max_prompt_tokens")
    out, start = {}, 0
    for name, n in cfg.sizes.items():
        out[name] = [prompt_row(shuffled[i]) for i in kept[start:start + n]]
        start += n
    return out, counts


def prompt_row(prompt: Prompt) -> dict[str, Any]:
    """A prompt split row (the testbed's layout; external prompts carry no verifiable instructions)."""
    return {"prompt_id": prompt_id(prompt), "prompt": prompt_text(prompt),
            "messages": [] if isinstance(prompt, str) else list(prompt), "task_id": "external",
            "task_category": "external", "instruction_id_list": [], "kwargs": []}


def row_prompt(row: Mapping[str, Any]) -> Prompt:
    """The prompt a split row holds (the inverse of `prompt_row`)."""
    return list(row["messages"]) if row.get("messages") else row["prompt"]
