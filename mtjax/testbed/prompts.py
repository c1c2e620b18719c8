"""Seeded generator of verifiable-instruction prompts and their disjoint, recorded splits.

A prompt is one base task (``tasks.py``) plus 1-3 compatible constraints (``constraints.py``) in
IFEval's row format (``instruction_id_list`` + ``kwargs``), so :func:`mtjax.testbed.gold.gold_reward`
scores it like an IFEval prompt. Splits feed the Mutual-Taught loop: ``policy_1..T`` (E-steps),
``reward_model`` (M-steps), ``base_rm_labels`` (gold-labelled pairs that train the base RM) and
``heldout_eval``. They are filled from one seeded stream in that fixed order, held-out first, so
changing the policy or RM sizes never changes the held-out prompts. Prompt ids hash the prompt's
content, so the same prompt has the same id in every run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets

from mtjax.testbed.constraints import REPEAT_PROMPT, sample_constraints
from mtjax.testbed.tasks import BASE_TASKS, BaseTask

# 2: limits leave room for required text, sentence caps avoid structural constraints, line breaks after
# multi-line examples.
GENERATOR_VERSION = 2
HELDOUT = "heldout_eval"
BASE_RM_LABELS = "base_rm_labels"
REWARD_MODEL = "reward_model"
NUM_CONSTRAINTS_WEIGHTS = {1: 0.4, 2: 0.35, 3: 0.25}

# Every kwargs key our families use, with its type: rows keep IFEval's hub layout (unused keys None).
KWARGS_FEATURES = {
    "capital_frequency": datasets.Value("int64"),
    "capital_relation": datasets.Value("string"),
    "end_phrase": datasets.Value("string"),
    "first_word": datasets.Value("string"),
    "forbidden_words": datasets.List(datasets.Value("string")),
    "frequency": datasets.Value("int64"),
    "keyword": datasets.Value("string"),
    "keywords": datasets.List(datasets.Value("string")),
    "language": datasets.Value("string"),
    "let_frequency": datasets.Value("int64"),
    "let_relation": datasets.Value("string"),
    "letter": datasets.Value("string"),
    "nth_paragraph": datasets.Value("int64"),
    "num_bullets": datasets.Value("int64"),
    "num_highlights": datasets.Value("int64"),
    "num_paragraphs": datasets.Value("int64"),
    "num_placeholders": datasets.Value("int64"),
    "num_sections": datasets.Value("int64"),
    "num_sentences": datasets.Value("int64"),
    "num_words": datasets.Value("int64"),
    "postscript_marker": datasets.Value("string"),
    "prompt_to_repeat": datasets.Value("string"),
    "relation": datasets.Value("string"),
    "section_spliter": datasets.Value("string"),
}
PROMPT_FEATURES = datasets.Features(
    {
        "prompt_id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        # A multi-turn prompt's turns (empty for a single user message, which `prompt` holds).
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "task_id": datasets.Value("string"),
        "task_category": datasets.Value("string"),
        "instruction_id_list": datasets.List(datasets.Value("string")),
        "kwargs": [KWARGS_FEATURES],
    }
)


@dataclass(frozen=True)
class PromptSplitSizes:
    """Number of prompts per split; ``policy`` has one entry per Mutual-Taught iteration."""

    policy: tuple[int, ...] = (1000, 1000)
    reward_model: int = 1000
    base_rm_labels: int = 500
    heldout_eval: int = 300

    def named(self) -> dict[str, int]:
        """Split name -> size, in the order splits are filled."""
        sizes = {
            HELDOUT: self.heldout_eval,
            BASE_RM_LABELS: self.base_rm_labels,
            REWARD_MODEL: self.reward_model,
        }
        sizes.update({f"policy_{t}": n for t, n in enumerate(self.policy, start=1)})
        for name, n in sizes.items():
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"split size for {name!r} must be a non-negative int, got {n!r}")
        return sizes


@dataclass(frozen=True)
class PromptGeneratorConfig:
    seed: int = 0
    sizes: PromptSplitSizes = field(default_factory=PromptSplitSizes)
    # Fraction of base tasks reserved for the held-out split (0: held-out prompts share tasks with
    # training prompts but never the same prompt; >0: held-out also tests unseen tasks).
    heldout_task_fraction: float = 0.0


def _prompt_id(prompt: str, instruction_ids: tuple[str, ...], kwargs: tuple[dict, ...]) -> str:
    payload = json.dumps([prompt, instruction_ids, kwargs], sort_keys=True, ensure_ascii=False)
    return "tb-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def join_prompt_parts(parts: list[str]) -> str:
    """Sentences joined by spaces; a part ending in a multi-line example (a bullet list) gets a line break."""
    text = parts[0]
    for previous, part in itertools.pairwise(parts):
        text += ("\n" if "\n" in previous else " ") + part
    return text


def make_prompt(task: BaseTask, rng: random.Random, num_constraints: int) -> dict[str, Any]:
    """One prompt row (kwargs hold only the keys each instruction uses)."""
    sampled = sample_constraints(rng, num_constraints)
    kwargs = [dict(k) for k in sampled.kwargs]
    parts = [task.text]
    for instruction_id, instruction_kwargs, text in zip(
        sampled.instruction_ids, kwargs, sampled.texts, strict=True
    ):
        if instruction_id == REPEAT_PROMPT:
            instruction_kwargs["prompt_to_repeat"] = join_prompt_parts(parts)
        parts.append(text)
    prompt = join_prompt_parts(parts)
    return {
        "prompt_id": _prompt_id(prompt, sampled.instruction_ids, tuple(kwargs)),
        "prompt": prompt,
        "task_id": task.task_id,
        "task_category": task.category,
        "instruction_id_list": list(sampled.instruction_ids),
        "kwargs": kwargs,
    }


def _prompt_stream(rng: random.Random, tasks: tuple[BaseTask, ...]) -> Iterator[dict[str, Any]]:
    counts, weights = zip(*NUM_CONSTRAINTS_WEIGHTS.items(), strict=True)
    while True:
        task = rng.choice(tasks)
        yield make_prompt(task, rng, rng.choices(counts, weights)[0])


def _fill(stream: Iterator[dict[str, Any]], n: int, seen: set[str], name: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    attempts = 0
    max_attempts = 50 * n + 1000
    while len(rows) < n:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(f"could only make {len(rows)} distinct prompts for split {name!r} (asked {n})")
        row = next(stream)
        if row["prompt_id"] in seen:
            continue
        seen.add(row["prompt_id"])
        rows.append(row)
    return rows


def _to_hub_layout(row: dict[str, Any]) -> dict[str, Any]:
    """Give every kwargs dict all known keys (None when unused), as ``datasets`` needs one schema."""
    unknown = {k for kw in row["kwargs"] for k in kw} - set(KWARGS_FEATURES)
    if unknown:
        raise ValueError(
            f"prompt {row['prompt_id']} has kwargs keys missing from KWARGS_FEATURES: {sorted(unknown)}"
        )
    return {"messages": [], **row, "kwargs": [{k: kw.get(k) for k in KWARGS_FEATURES} for kw in row["kwargs"]]}


def generate_prompt_rows(config: PromptGeneratorConfig) -> dict[str, list[dict[str, Any]]]:
    """Split name -> rows (plain dicts, kwargs with only the used keys); deterministic in the config."""
    if not 0.0 <= config.heldout_task_fraction < 1.0:
        raise ValueError(f"heldout_task_fraction must be in [0, 1), got {config.heldout_task_fraction}")
    sizes = config.sizes.named()
    task_rng = random.Random(f"mtjax-testbed-tasks-{config.seed}")
    tasks = list(BASE_TASKS)
    heldout_tasks, train_tasks = tuple(tasks), tuple(tasks)
    if config.heldout_task_fraction > 0:
        task_rng.shuffle(tasks)
        n_heldout = max(1, round(config.heldout_task_fraction * len(tasks)))
        heldout_tasks, train_tasks = tuple(tasks[:n_heldout]), tuple(tasks[n_heldout:])
    # Separate streams: the held-out prompts depend only on the seed and the held-out size.
    heldout_stream = _prompt_stream(random.Random(f"mtjax-testbed-heldout-{config.seed}"), heldout_tasks)
    train_stream = _prompt_stream(random.Random(f"mtjax-testbed-train-{config.seed}"), train_tasks)
    seen: set[str] = set()
    splits = {HELDOUT: _fill(heldout_stream, sizes[HELDOUT], seen, HELDOUT)}
    for name, n in sizes.items():
        if name != HELDOUT:
            splits[name] = _fill(train_stream, n, seen, name)
    return splits


def build_prompt_splits(config: PromptGeneratorConfig | None = None) -> datasets.DatasetDict:
    """The generated splits as ``datasets.Dataset``s in IFEval's hub layout (unused kwargs keys None)."""
    config = config or PromptGeneratorConfig()
    rows = generate_prompt_rows(config)
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_list(
                [_to_hub_layout(r) for r in split_rows], features=PROMPT_FEATURES
            )
            for name, split_rows in rows.items()
        }
    )


def save_prompt_splits(
    splits: datasets.DatasetDict, out_dir: str | Path, config: PromptGeneratorConfig
) -> Path:
    """Record the splits: one ``NAME.jsonl`` per split plus ``manifest.json`` (config, counts, ids hash)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
        "splits": {},
    }
    for name, split in splits.items():
        path = out / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for row in split:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        ids = "\n".join(split["prompt_id"])
        manifest["splits"][name] = {
            "file": path.name,
            "num_prompts": len(split),
            "ids_sha256": hashlib.sha256(ids.encode()).hexdigest(),
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def load_prompt_splits(directory: str | Path) -> datasets.DatasetDict:
    """Load splits written by :func:`save_prompt_splits`, checking them against the manifest."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no manifest.json in prompt split folder {directory}")
    manifest = json.loads(manifest_path.read_text())
    splits = {}
    for name, info in manifest["splits"].items():
        path = directory / info["file"]
        with open(path, encoding="utf-8") as f:
            rows = [{"messages": [], **json.loads(line)} for line in f if line.strip()]  # older files: no turns
        split = datasets.Dataset.from_list(rows, features=PROMPT_FEATURES)
        ids_hash = hashlib.sha256("\n".join(split["prompt_id"]).encode()).hexdigest()
        if ids_hash != info["ids_sha256"]:
            raise ValueError(
                f"split {name!r} in {directory} does not match its manifest (prompt ids changed)"
            )
        splits[name] = split
    return datasets.DatasetDict(splits)
