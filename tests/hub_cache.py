"""Fills a temporary `HF_HOME` the way a machine with hub access would have, so hub ids resolve offline
(`HF_HUB_OFFLINE=1`): model repos and dataset-repo files in the hub cache (`HF_HOME/hub`), datasets in the
`datasets` cache (`HF_HOME/datasets`) under their hub ids."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the snapshot's (fake) commit hash


def _snapshot(hf_home: Path, kind: str, repo_id: str) -> Path:
    repo = Path(hf_home) / "hub" / f"{kind}--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def add_model(hf_home: Path, repo_id: str, folder: Path) -> Path:
    """The files of a local model folder as the hub cache's snapshot of `repo_id`."""
    snapshot = _snapshot(hf_home, "models", repo_id)
    for f in Path(folder).iterdir():
        shutil.copy(f, snapshot / f.name)
    return snapshot


def add_dataset_file(hf_home: Path, repo_id: str, path_in_repo: str, content: str) -> Path:
    """One file of a dataset repo (what `hf_hub_download(repo_type="dataset")` fetches)."""
    target = _snapshot(hf_home, "datasets", repo_id) / path_in_repo
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content, encoding="utf-8")
    return target


def add_dataset(hf_home: Path, repo_id: str, splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> Path:
    """`repo_id`'s splits in the `datasets` cache, where `datasets.load_dataset(repo_id, split=...)` finds them
    offline ("Using the latest cached version of the dataset")."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, name = repo_id.split("/")
    work = Path(hf_home) / "build" / repo_id
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        files[split] = str(work / f"{split}.parquet")
        datasets.Dataset.from_list(list(rows)).to_parquet(files[split])
    builder = Parquet(cache_dir=str(work / "prepared"), dataset_name=name, data_files=files, hash=COMMIT[:16])
    builder.download_and_prepare()
    prepared = Path(builder.cache_dir)
    target = Path(hf_home) / "datasets" / f"{namespace}___{name}" / "default" / "0.0.0" / COMMIT[:16]
    target.mkdir(parents=True, exist_ok=True)
    for f in prepared.iterdir():
        if f.suffix == ".arrow":
            split = f.stem.rsplit("-", 1)[-1]
            shutil.copy(f, target / f"{name}-{split}.arrow")
    info = json.loads((prepared / "dataset_info.json").read_text())
    info.update(config_name="default", dataset_name=name)
    (target / "dataset_info.json").write_text(json.dumps(info))
    shutil.rmtree(work)
    return target
