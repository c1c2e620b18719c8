"""The run directory's layout (`mtjax.layout`): every file a run writes is declared there, and seeds come from
frozen names, so renaming an artifact changes no sample and old run directories resume bitwise."""

import dataclasses
import zlib

from conftest import tiny_config

from mtjax import layout
from mtjax.em import MutualTaught


def test_every_file_of_a_tiny_run_is_declared_by_the_layout(tiny_run):
    run, _ = tiny_run
    root = run.rd.path
    written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert len(written) > 20
    assert [p for p in written if not layout.declared(p)] == []
    # the check is not vacuous: stray files, other names and other depths are not declared
    for stray in ("notes.txt", "iter_1/e_step/notes.txt", "iter_1/e_step/samples.json", "iter_1/x/samples.jsonl",
                  "base_rm/policy/d", "eval/iter_1/x/y.json"):
        assert not layout.declared(stray), stray


def _historical_seed(run_seed: int, path: str) -> int:
    """How seeds were derived before `mtjax.layout`: from the artifact path (`MutualTaught._seed(path)`)."""
    return (run_seed * 1_000_003 + zlib.crc32(path.encode())) % (2**31)


def test_seed_names_keep_the_seeds_runs_were_written_with():
    """Every draw's seed equals the one derived from the path it was named by before, so a run directory
    written then resumes with the same samples, shuffles and labels."""
    e1, m2, ev3 = layout.e_step(1), layout.m_step(2), layout.eval_phase(3)
    then_and_now = {
        "base_rm/samples.jsonl": (layout.BASE_RM, layout.SAMPLES.seed_purpose),
        "base_rm/labels": (layout.BASE_RM, layout.BASE_RM_LABELS_SEED),
        "base_rm": (layout.BASE_RM, None),
        "sft": (layout.SFT, None),
        "iter_1/e_step/samples.jsonl": (e1, layout.SAMPLES.seed_purpose),
        "iter_1/e_step/judgments.jsonl": (e1, layout.JUDGE_SEED),
        "iter_1/e_step": (e1, None),
        "iter_2/m_step/new_policy_samples.jsonl": (m2, layout.NEW_POLICY_SAMPLES.seed_purpose),
        "iter_2/m_step/old_policy_samples.jsonl": (m2, layout.OLD_POLICY_SAMPLES.seed_purpose),
        "iter_2/m_step/random_labels": (m2, layout.RANDOM_LABELS_SEED),
        "iter_2/m_step/round_3": (m2, layout.ser_round_seed(3)),
        "iter_2/m_step": (m2, None),
        "iter_3/eval/samples.jsonl": (ev3, layout.SAMPLES.seed_purpose),
        "iter_3/eval/alpaca_eval_answers.jsonl": (ev3, layout.benchmark_answers("alpaca_eval").seed_purpose),
    }
    for run_seed in (0, 7, 123456):
        for path, (phase, purpose) in then_and_now.items():
            assert layout.derive_seed(run_seed, layout.seed_name(phase, purpose)) == _historical_seed(run_seed, path)


def test_renaming_a_samples_file_changes_no_sample(tiny_run, tmp_path, monkeypatch):
    """The E-step's samples stored under another file name are the same draws (the seed follows the pass's
    frozen name, not its path)."""
    reference, _ = tiny_run
    phase, split = layout.e_step(1), "policy_1"
    stored = reference.sample_rows(layout.samples_file(phase, layout.SAMPLES), split)
    monkeypatch.setattr(layout, "SAMPLES", dataclasses.replace(layout.SAMPLES, file="renamed_samples"))
    run = MutualTaught(tiny_config(), str(tmp_path / "run"))
    samples, _ = run.samples(phase, layout.SAMPLES, run.models.policy_params, split, reference.sampling.num_samples)
    assert run.rd.file(f"{phase}/renamed_samples.jsonl").is_file()
    assert not run.rd.file(f"{phase}/samples.jsonl").exists()
    assert [[s.ids for s in group] for group in samples] == [[tuple(r["response_ids"]) for r in g] for g in stored]
