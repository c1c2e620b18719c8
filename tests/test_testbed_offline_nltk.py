"""The IFEval/IFBench checkers must run with no NLTK data installed and no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Runs in a fresh interpreter whose NLTK search path holds nothing and whose sockets refuse to connect,
# so any download attempt or lookup of real NLTK data would fail loudly.
_CHILD = textwrap.dedent(
    """
    import json, socket, sys

    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted")

    socket.socket.connect = refuse
    socket.create_connection = refuse
    import nltk

    nltk.data.path[:] = [p for p in nltk.data.path if p.startswith(sys.argv[1])]
    try:
        nltk.sent_tokenize("No model yet. So this fails.")
        raise SystemExit("punkt_tab was found before mtjax installed it")
    except LookupError:
        pass

    from mtjax.testbed.gold import check_response, instruction_registry
    from mtjax.testbed.offline_nltk import ensure_offline_punkt, nltk_downloads_blocked

    root = ensure_offline_punkt()
    text = "Dr. Smith went home at 5 p.m. yesterday. He was tired! Was he hungry? Mr. J. Doe said no."
    import punkt  # the packaged model, used directly, as the reference splitter

    real_download_calls = []
    nltk.download = lambda *args, **kwargs: real_download_calls.append(args) or True
    instruction_registry("ifbench")  # its module asks NLTK for downloads at import time
    with nltk_downloads_blocked() as refused:
        answer = nltk.download("stopwords", quiet=True)
    try:
        nltk.data.find("corpora/stopwords")
        stopwords_installed = True
    except LookupError:
        stopwords_installed = False
    result = check_response(
        ["length_constraints:number_sentences", "change_case:capital_word_frequency"],
        [
            {"relation": "at least", "num_sentences": 4},
            {"capital_relation": "at least", "capital_frequency": 1},
        ],
        "prompt",
        text.replace("Dr. Smith", "Dr. SMITH"),
    )
    print(json.dumps({
        "root": str(root),
        "found": str(nltk.data.find("tokenizers/punkt_tab/english/")),
        "nltk_sentences": nltk.sent_tokenize(text),
        "punkt_sentences": punkt.sent_tokenize(text),
        "pickle_path_sentences": nltk.data.load("nltk:tokenizers/punkt/english.pickle").tokenize(text),
        "words": nltk.word_tokenize("It's fine, isn't it?"),
        "verdicts": [item.strict for item in result.instructions],
        "refused_downloads": refused,
        "answer": answer,
        "real_download_calls": len(real_download_calls),
        "stopwords_installed": stopwords_installed,
    }))
    """
)


def test_checkers_work_offline_without_nltk_data(tmp_path: Path) -> None:
    empty = tmp_path / "empty_nltk_data"
    empty.mkdir()
    cache = tmp_path / "mtjax_cache"
    env = {
        **os.environ,
        "NLTK_DATA": str(empty),
        "HOME": str(tmp_path / "home"),
        "MTJAX_NLTK_DATA": str(cache),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    repo = Path(__file__).resolve().parents[1]
    completed = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = json.loads(completed.stdout.strip().splitlines()[-1])
    assert out["root"].startswith(str(cache)) and out["found"].startswith(str(cache))
    expected = [
        "Dr. Smith went home at 5 p.m. yesterday.",
        "He was tired!",
        "Was he hungry?",
        "Mr. J. Doe said no.",
    ]
    assert out["nltk_sentences"] == expected
    assert out["punkt_sentences"] == expected
    assert out["pickle_path_sentences"] == expected
    assert out["words"] == ["It", "'s", "fine", ",", "is", "n't", "it", "?"]
    assert out["verdicts"] == [True, True]
    # IFBench's import-time download requests never reached NLTK's downloader.
    assert out["real_download_calls"] == 0 and not out["stopwords_installed"]
    assert out["refused_downloads"] == ["stopwords"] and out["answer"] is False


def test_materialized_model_is_reused(tmp_path: Path) -> None:
    from mtjax.testbed.offline_nltk import materialize_punkt_tab

    first = materialize_punkt_tab(tmp_path)
    model_file = first / "tokenizers" / "punkt_tab" / "english" / "abbrev_types.txt"
    stamp = model_file.stat().st_mtime_ns
    assert materialize_punkt_tab(tmp_path) == first
    assert model_file.stat().st_mtime_ns == stamp
    assert "dr" in model_file.read_text().splitlines()
