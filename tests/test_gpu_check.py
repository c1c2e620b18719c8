"""scripts/gpu_check.py in its --smoke mode: the GPU check's code on CPU at tiny shapes, and its driver."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import gpu_check  # noqa: E402

# The e2e section is the EM driver (tests/test_em_run.py); here only its config is checked.
# The RM step differs from the DPO step only in bench_train's objective switch; it is left out for time.
SECTIONS = ["device", "torch_logits", "torch_generate", "torch_train", "train_dpo_xla", "parity", "sampler_4"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    gpu_check.main(["--smoke", "--out-dir", str(out), "--sections", *SECTIONS])
    return json.loads((out / "gpu_check_smoke.json").read_text()), (out / "gpu_check_smoke_table.md").read_text()


def test_smoke_run_measures_every_section(smoke):
    data, _ = smoke
    results = data["results"]
    assert set(results) == set(SECTIONS)
    assert not [name for name, r in results.items() if "error" in r], {n: r.get("error") for n, r in results.items()}
    assert results["device"]["copy_bandwidth_bytes_per_s"] > 0 and results["device"]["matmul_tflops"] > 0
    for name in ("train_dpo_xla",):
        row = results[name]
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and 0 < row["mfu"]
        assert row["xla_memory_gib"] > 0 and row["planner_gib"] > 0 and row["vs_torch_tokens_per_s"] > 0
    for impl in ("xla", "einsum"):  # bf16 logits as close to fp32 transformers as bf16 transformers is
        assert results["parity"][impl]["ok"], results["parity"][impl]
        assert results["parity"][impl]["vs_torch_fp32"]["top1_agreement"] > 0.9
    window = results["parity"]["sliding_window"]["float32"]["xla"]  # fused call with local_window_size
    assert window["max_abs"] <= 1e-4 * max(1.0, window["ref_std"]) and window["top1_agreement"] == 1.0
    sampler = results["sampler_4"]
    assert sampler["tokens_per_s"] > 0 and sampler["vs_hf"] > 0 and sampler["bound_step_s"] > 0
    assert set(results["torch_generate"]["generate"]) == {"4", "2"}


def test_smoke_table_names_each_figure_and_goal(smoke):
    _, table = smoke
    assert table.startswith("# GPU check (smoke run on CPU")
    assert "| section | what | mtjax | reference | goal | verdict |" in table
    for needle in ("| parity | xla:", "| dpo step | mtjax xla:", "| dpo step | torch sdpa:", "| rm step | torch sdpa:",
                   "| dpo memory | mtjax xla:", "| sampler | batch 4: tokens/s", "| sampler | batch 4: decode step ms"):
        assert needle in table


def test_a_failing_or_overlong_section_is_recorded_and_the_rest_run():
    """A section that raises (keeping what it measured before), and one that outlives the time left (here
    1.5 s), each leave an error and the next section still runs; the output is rewritten after every section."""
    ctx = gpu_check.Context(argparse.Namespace(budget_s=1.5, sections=None, smoke=True), gpu_check.SMOKE, results={})

    def boom(ctx):
        ctx.partial["measured"] = 1.0  # figures a section recorded before it failed are kept
        raise RuntimeError("no device")

    def overlong(_):
        time.sleep(5)
        return {}

    writes = []
    gpu_check.run_sections(ctx, [("boom", 1, boom), ("slow", 1, overlong), ("fine", 1, lambda _: {"x": 1})],
                           lambda: writes.append(1))
    assert ctx.results["boom"]["error"] == "RuntimeError: no device" and ctx.results["boom"]["measured"] == 1.0
    assert ctx.results["slow"]["error"].startswith("SectionTimeout")
    assert ctx.results["fine"]["x"] == 1 and len(writes) == 3


@pytest.mark.parametrize("smoke", [False, True], ids=["gpu", "smoke"])
def test_e2e_config_is_the_gpu_preset_cut_down_and_passes_start_up_checks(tmp_path, smoke):
    """The e2e section's run config, at the GPU's sizes and the smoke run's, passes every start-up check that
    needs no model files: the settings and the batches over the device's mesh (the GPU machine has one device)."""
    import dataclasses

    import jax

    from mtjax import settings
    from mtjax.em import check_batches_fit_mesh, validate_config
    from mtjax.sharding import make_mesh

    sizes = gpu_check.SMOKE if smoke else gpu_check.GPU
    cfg = gpu_check.e2e_config(gpu_check.Context(argparse.Namespace(smoke=smoke), sizes, results={}), tmp_path)
    validate_config(cfg)
    mesh = settings.build(settings.MeshConfig, cfg.mesh)
    check_batches_fit_mesh(cfg, make_mesh(**dataclasses.asdict(mesh), devices=jax.devices()[:1]))
    assert cfg.preset == "gpu" and cfg.policy.source == str(tmp_path) and cfg.policy.scan_layers
    assert cfg.prompts.policy == (sizes.e2e_prompts,) * cfg.iterations
