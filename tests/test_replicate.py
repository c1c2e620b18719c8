"""scripts/replicate.py on the `tiny` preset: two arms, one seed, shared base phases, aggregation, no-op rerun."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "replicate.py"


@pytest.fixture(scope="module")
def replicate():
    spec = importlib.util.spec_from_file_location("replicate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def phase_summary(run_dir: Path, name: str) -> dict:
    from mtjax.rundir import RunDir

    return RunDir.open_read_only(run_dir).summary(name)


def alpaca_eval_file(path: Path) -> Path:
    """AlpacaEval-2's file format (instruction, GPT-4-turbo's output, generator, dataset), three rows."""
    rows = [{"dataset": "helpful_base", "instruction": instruction, "output": output, "generator": "gpt4_1106_preview"}
            for instruction, output in [
                ("Name three colours of the rainbow.", "Red, orange and yellow are three colours of the rainbow."),
                ("What is the capital of France?", "The capital of France is Paris."),
                ("Give me a word that rhymes with cat.", "Hat rhymes with cat.")]]
    path.write_text(json.dumps(rows))
    return path


def test_replicate_tiny_two_arms(replicate, tmp_path, monkeypatch, xla_cache):
    workdir = tmp_path / "study"
    argv = ["--preset", "tiny", "--seeds", "0", "--arms", "mutual,offline", "--alpaca-prompts", "2",
            "--alpaca-data", str(alpaca_eval_file(tmp_path / "alpaca_eval.json")), "--workdir", str(workdir),
            "--compilation-cache", str(xla_cache)]
    replicate.main(argv)

    results = json.loads((workdir / "results.json").read_text())
    arms = results["arms"]
    assert set(arms) == {"mutual", "offline"}
    assert sorted(arms["mutual"]) == ["0", "1", "2"] and sorted(arms["offline"]) == ["0", "1"]
    for arm, by_t in arms.items():
        for t, stats in by_t.items():
            assert set(stats) == set(replicate.LABELS), (arm, t)
            for key in ("gold_reward", "prompt_level_strict", "length_mean_tokens", "alpaca_win_rate"):
                assert stats[key]["n"] == 1 and stats[key]["std"] is None, (arm, t, key)
    # r0 and the base evaluation were taken from mutual, not recomputed (same summary, wall time included).
    mutual, offline = workdir / "seed_0" / "mutual", workdir / "seed_0" / "offline"
    for phase in ("prompts", "base_rm", "iter_0/eval"):
        assert phase_summary(offline, phase) == phase_summary(mutual, phase)
    assert arms["offline"]["0"]["gold_reward"]["mean"] == arms["mutual"]["0"]["gold_reward"]["mean"]
    # The AlpacaEval evaluations: one file per iteration, judged by r0, with their settings.
    for arm_dir, its in ((mutual, 3), (offline, 2)):
        files = sorted((arm_dir / "alpaca_eval").glob("iter_*.json"))
        assert len(files) == its
        record = json.loads(files[-1].read_text())
        assert record["settings"]["num_prompts"] == 2 and len(record["responses"]) == 2
    # The references' r0 scores are computed once per seed and reused by every arm and iteration.
    assert len(json.loads((mutual / "alpaca_eval" / "reference_scores.json").read_text())["scores"]) == 2
    claims = {c["claim"]: c for c in results["claims"]}
    assert any(k.startswith("(1)") for k in claims) and any("mutual > offline" in k for k in claims)
    assert all("no noise estimate" in c["verdict"] for c in results["claims"] if c["n"] == 1)
    assert set(results["wall_seconds"]) == {"mutual", "offline"}
    for name in ("gold_reward.png", "rm_accuracy_current_policy.png", "final_iteration.png", "results.md"):
        assert (workdir / name).stat().st_size > 0
    assert "| mutual | 2 |" in (workdir / "results.md").read_text()

    # A rerun is a no-op: no model is built, no file changes (content or mtime).
    before = snapshot(workdir)
    from mtjax import em

    def refuse(*args, **kwargs):
        raise AssertionError("a finished replicate run must not build any run")

    monkeypatch.setattr(em, "MutualTaught", refuse)
    replicate.main(argv)
    assert snapshot(workdir) == before
    # --report-only works too (and changes nothing).
    replicate.main([*argv, "--report-only"])
    assert snapshot(workdir) == before


def test_overrides_and_bad_arguments(replicate):
    cfg = replicate.arm_config("tiny", ["sampling.max_new_tokens=10", "mt.drop_truncated=true"], "frozen", 3)
    assert cfg.sampling.max_new_tokens == 10 and cfg.mt.drop_truncated is True and cfg.arm == "frozen"
    assert cfg.seed == 3 and cfg.reward_model.head_seed == 3 and cfg.prompts.seed == 0
    assert (cfg.mt.rm_update, cfg.mt.policy_prompts) == ("frozen", "with_rm")
    filtered = replicate.arm_config("synthetic", [], "mutual_filtered", 0).mt
    assert (filtered.rm_update, filtered.contrastive_filter) == ("mutual", True)
    with pytest.raises(ValueError, match="mt.contrastive_filter: set by the script per arm/seed"):  # an arm sets it
        replicate.arm_config("tiny", ["mt.contrastive_filter=true"], "mutual", 0)
    for argv in (["--arms", "frozen"], ["--arms", "mutual,nope"], ["--override", "mt.rm_update=frozen"],
                 ["--override", "no.such=1"], ["--override", "sampling.max_new_tokens=abc"]):
        with pytest.raises(SystemExit):
            replicate.parse_args(argv)


def test_claim_verdicts_use_student_t_for_few_seeds(replicate):
    seeds = {0: 0.0, 1: 0.0, 2: 0.0}
    # mean 0.1, SE 0.029: 3.5 SE, beyond 2 SE but not beyond t(2 dof) = 4.3, so within the noise of 3 seeds
    noisy = replicate.compare("c", "m", {0: 0.10, 1: 0.15, 2: 0.05}, seeds, ">")
    assert noisy["verdict"] == "direction as claimed, within noise" and noisy["t"] == pytest.approx(4.303)
    clear = replicate.compare("c", "m", {0: 0.10, 1: 0.12, 2: 0.08}, seeds, ">")  # 8.7 SE
    assert clear["verdict"].startswith("supported") and clear["mean_diff"] == pytest.approx(0.1)
    against = replicate.compare("c", "m", seeds, {0: 0.10, 1: 0.12, 2: 0.08}, ">")
    assert against["verdict"].startswith("contradicted")
    assert replicate.t_critical(30) == 1.96


def test_paired_p_values_are_the_paired_t_test(replicate):
    from scipy import stats

    a, b = {0: 0.41, 1: 0.38, 2: 0.45, 3: 0.40, 4: 0.39}, {0: 0.36, 1: 0.37, 2: 0.40, 3: 0.41, 4: 0.35}
    row = replicate.compare("c", "m", a, b, ">")
    expected = stats.ttest_rel(list(a.values()), list(b.values()))
    assert row["p"] == pytest.approx(expected.pvalue) and row["z"] == pytest.approx(expected.statistic)
    assert row["t"] == pytest.approx(stats.t.ppf(0.975, 4), abs=1e-3)
    assert (row["p"] < 0.05) == row["verdict"].startswith("supported")


def test_the_synthetic_study_tests_its_controls_and_premise(replicate):
    """control_claims on made-up per-seed results: oracle and random over the run and against mutual, and r0's
    accuracy on the trained policies' samples against π0's (lower, as the premise says)."""
    def runs(gold0, gold_t, acc_t, r0_t):
        return {0: {"gold_reward": gold0, "rm_accuracy_current_policy": 0.65, "rm_r0_accuracy_current_policy": 0.65},
                1: {"gold_reward": gold_t, "rm_accuracy_current_policy": acc_t, "rm_r0_accuracy_current_policy": r0_t}}
    per_seed = {"mutual": {s: runs(0.35, 0.40 + 0.001 * s, 0.70, 0.60 - 0.002 * s) for s in range(5)},
                "oracle": {s: runs(0.35, 0.45 + 0.002 * s, 0.75, 0.60) for s in range(5)},
                "random": {s: runs(0.35, 0.35 + 0.003 * (s % 2), 0.50, 0.60) for s in range(5)},
                "frozen": {s: runs(0.35, 0.37, 0.60 - 0.001 * s, 0.60 - 0.001 * s) for s in range(5)}}

    def at(arm, t, key):
        return {s: r[t][key] for s, r in per_seed[arm].items()}

    claims = {c["claim"]: c for c in replicate.control_claims(per_seed, at, lambda arm, key: at(arm, 1, key))}
    assert claims["(control) policy improves over the run: oracle iter 1 vs 0"]["verdict"].startswith("supported")
    assert claims["(control) final iteration: oracle > mutual"]["mean_diff"] == pytest.approx(0.052)
    assert claims["(control) final iteration: mutual > random"]["verdict"].startswith("supported")
    premise = claims["(premise) r0 less accurate on mutual's π_1 than on π_0"]
    assert premise["mean_diff"] == pytest.approx(-0.054) and premise["verdict"].startswith("supported")
    assert claims["(premise) r0 less accurate on frozen's π_1 than on π_0"]["verdict"].startswith("supported")
