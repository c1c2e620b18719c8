"""Evaluators end to end with real (if tiny) policies and judges: rule-based generators, and reward
functions that count words, keywords or constraints actually satisfied."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mtjax import evaluate
from mtjax.testbed.benchmarks import (
    AlpacaEvalExample,
    PreferenceExample,
    instruction_prompts_from_rows,
    load_alpaca_eval,
    load_instruction_prompts,
)
from mtjax.testbed.gold import check_response, gold_reward
from mtjax.testbed.prompts import PromptGeneratorConfig, PromptSplitSizes, generate_prompt_rows

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rule_based_policy(prompts: list[str]) -> list[str]:
    """A policy that follows a few constraints it can read in the prompt, and ignores the rest."""
    responses = []
    for prompt in prompts:
        text = "here is a careful answer, step by step. first we look at the facts. then we decide."
        if "comma" in prompt:
            text = text.replace(",", "")
        if "capital letters" in prompt and "lowercase" not in prompt:
            text = text.upper()
        if "title" in prompt:
            text = "<<an answer>>\n" + text
        responses.append(text)
    return responses


def terse_policy(prompts: list[str]) -> list[str]:
    return ["ok" for _ in prompts]


def word_count_judge(prompts: list[str], responses: list[str]) -> np.ndarray:
    return np.array([len(r.split()) for r in responses], dtype=np.float64)


def keyword_judge(prompts: list[str], responses: list[str]) -> np.ndarray:
    return np.array([r.lower().count("good") - r.lower().count("bad") for r in responses], dtype=np.float64)


@pytest.fixture(scope="module")
def heldout_prompts():
    sizes = PromptSplitSizes(policy=(0,), reward_model=0, base_rm_labels=0, heldout_eval=60)
    rows = generate_prompt_rows(PromptGeneratorConfig(seed=0, sizes=sizes))["heldout_eval"]
    return instruction_prompts_from_rows(rows)


def test_instruction_following_on_generated_heldout_split(heldout_prompts) -> None:
    result = evaluate.evaluate_instruction_following(
        heldout_prompts, generate_fn=rule_based_policy, progress=False
    )
    responses = rule_based_policy([p.prompt for p in heldout_prompts])
    rewards = [
        gold_reward(p.instruction_id_list, p.kwargs, p.prompt, r)
        for p, r in zip(heldout_prompts, responses, strict=True)
    ]
    assert result["gold_reward_strict"] == pytest.approx(np.mean(rewards))
    assert result["prompt_level_strict"] == pytest.approx(np.mean([r == 1.0 for r in rewards]))
    verdicts = [
        v
        for p, r in zip(heldout_prompts, responses, strict=True)
        for v in check_response(p.instruction_id_list, p.kwargs, p.prompt, r).verdicts("strict")
    ]
    assert result["instruction_level_strict"] == pytest.approx(np.mean(verdicts))
    assert result["prompt_level_loose"] >= result["prompt_level_strict"]
    assert 0 < result["gold_reward_strict"] < 1
    assert result["num_prompts"] == 60 and result["num_prompts_unscorable"] == 0
    assert result["length_mean_words"] == pytest.approx(np.mean([len(r.split()) for r in responses]))
    assert "generation_seconds" in result and "scoring_seconds" in result
    # A policy that ignores every instruction scores lower.
    terse = evaluate.evaluate_instruction_following(
        heldout_prompts, responses=terse_policy([p.prompt for p in heldout_prompts]), progress=False
    )
    assert terse["gold_reward_strict"] < result["gold_reward_strict"]


def test_ifeval_cli_scores_a_responses_file(tmp_path, capsys) -> None:
    data = SHARED_DATA / "ifeval_input_data.jsonl"
    if not data.is_file():
        pytest.skip(f"{data} not present (shared evaluation data lives beside the repository)")
    prompts = load_instruction_prompts(data)[:40]
    responses = rule_based_policy([p.prompt for p in prompts])
    responses_file = tmp_path / "responses.jsonl"
    responses_file.write_text(
        "".join(
            json.dumps({"prompt": p.prompt, "response": r}) + "\n"
            for p, r in zip(prompts, responses, strict=True)
        )
    )
    out = tmp_path / "scores.json"
    evaluate.main(
        [
            "ifeval",
            "--data",
            str(data),
            "--responses",
            str(responses_file),
            "--allow-missing",
            "--out",
            str(out),
        ]
    )
    written = json.loads(out.read_text())
    expected, _ = evaluate.score_instruction_following(prompts, responses, progress=False)
    for key in (
        "prompt_level_strict",
        "prompt_level_loose",
        "instruction_level_strict",
        "instruction_level_loose",
    ):
        assert written[key] == pytest.approx(getattr(expected, key))
    assert written["num_prompts_scored"] == 40
    assert json.loads(capsys.readouterr().out)["num_prompts"] == 40
    with pytest.raises(ValueError, match="have no response"):
        evaluate.main(["ifeval", "--data", str(data), "--responses", str(responses_file)])


def test_rm_judged_win_rate_and_length_control() -> None:
    rng = np.random.default_rng(0)
    prompts = [f"instruction {i}" for i in range(200)]
    references = [" ".join(["ref"] * int(n)) for n in rng.integers(20, 200, 200)]
    # The "model" pads every answer: a word-count judge prefers it although it says nothing new.
    responses = [r + " filler" * int(k) for r, k in zip(references, rng.integers(-10, 60, 200), strict=True)]
    result = evaluate.reward_model_win_rate(word_count_judge, prompts, responses, references, progress=False)
    longer = np.array([len(m.split()) > len(b.split()) for m, b in zip(responses, references, strict=True)])
    ties = np.array([len(m.split()) == len(b.split()) for m, b in zip(responses, references, strict=True)])
    assert result["win_rate"] == pytest.approx(100 * (longer.mean() + 0.5 * ties.mean()))
    assert result["num_ties"] == ties.sum()
    assert result["win_rate"] > 70
    assert abs(result["length_controlled_win_rate"] - 50) < abs(result["win_rate"] - 50)
    assert result["length_coefficient"] > 0

    examples = [
        AlpacaEvalExample(p, r, "gpt4_1106_preview", "test") for p, r in zip(prompts, references, strict=True)
    ]
    by_prompt = dict(zip(prompts, responses, strict=True))
    via_generator = evaluate.evaluate_alpaca_eval_win_rate(
        word_count_judge, examples, generate_fn=lambda ps: [by_prompt[p] for p in ps], progress=False
    )
    assert via_generator["win_rate"] == pytest.approx(result["win_rate"])


def test_rewardbench_format_accuracy_per_subset_and_section(tmp_path) -> None:
    rows = [
        {"prompt": "q", "chosen": "good good", "rejected": "bad", "subset": "alpacaeval-easy"},
        {"prompt": "q", "chosen": "good", "rejected": "fine", "subset": "alpacaeval-easy"},
        {"prompt": "q", "chosen": "fine", "rejected": "good", "subset": "alpacaeval-easy"},
        {"prompt": "q", "chosen": "okay", "rejected": "fine", "subset": "alpacaeval-easy"},  # tie: wrong
        {"prompt": "q", "chosen": "good", "rejected": "bad bad", "subset": "hep-python"},
        {"prompt": "q", "chosen": "bad", "rejected": "good", "subset": "hep-python"},
        {"prompt": "q", "chosen": "good", "rejected": "", "subset": "my-own-subset"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate.evaluate_rewardbench(keyword_judge, path, progress=False)
    assert result["accuracy"] == pytest.approx(4 / 7)
    assert result["num_ties"] == 1
    assert result["subsets"] == {"alpacaeval-easy": 0.5, "hep-python": 0.5, "my-own-subset": 1.0}
    assert result["sections"] == {"Chat": 0.5, "Reasoning": 0.5}
    assert result["score"] == pytest.approx(0.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match="missing field"):
        evaluate.evaluate_rewardbench(keyword_judge, bad, progress=False)


def test_gold_pairwise_accuracy_on_policy_samples(heldout_prompts) -> None:
    texts = [p.prompt for p in heldout_prompts]
    samples = [
        list(s)
        for s in zip(
            rule_based_policy(texts),
            terse_policy(texts),
            [t.replace(",", "") + " and more words here" for t in rule_based_policy(texts)],
            strict=True,
        )
    ]
    by_prompt = {p.prompt: p for p in heldout_prompts}

    def gold_judge(prompts: list[str], responses: list[str]) -> np.ndarray:
        rows = [by_prompt[p] for p in prompts]
        return np.array(
            [
                gold_reward(r.instruction_id_list, r.kwargs, r.prompt, y)
                for r, y in zip(rows, responses, strict=True)
            ]
        )

    perfect = evaluate.gold_pairwise_accuracy(gold_judge, heldout_prompts, samples, progress=False)
    assert perfect["accuracy"] == 1.0 and perfect["num_pairs"] > 20
    assert perfect["num_prompts"] == 60
    built = evaluate.gold_preference_pairs(heldout_prompts, samples, progress=False)
    length = evaluate.gold_pairwise_accuracy(word_count_judge, heldout_prompts, samples, progress=False)
    expected = np.mean([len(p.chosen.split()) > len(p.rejected.split()) for p in built.pairs])
    assert length["accuracy"] == pytest.approx(expected)
    prompts_with_pairs = len({pair.prompt for pair in built.pairs})
    assert prompts_with_pairs + built.num_prompts_without_pair == 60
    assert len(built.pairs) + built.num_tied_pairs_skipped == 60 * 3  # 3 samples -> 3 candidate pairs each


def test_alpaca_eval_export_round_trip(tmp_path) -> None:
    data = SHARED_DATA / "alpaca_eval_gpt4_baseline.json"
    if not data.is_file():
        pytest.skip(f"{data} not present (shared evaluation data lives beside the repository)")
    examples = load_alpaca_eval(data)
    assert len(examples) == 805 and examples[0].reference_generator == "gpt4_1106_preview"
    responses = tmp_path / "outputs.jsonl"
    responses.write_text(
        "".join(
            json.dumps({"instruction": e.instruction, "response": "answer " + str(i)}) + "\n"
            for i, e in enumerate(examples)
        )
    )
    out = tmp_path / "model_outputs.json"
    evaluate.main(
        [
            "export-alpaca-eval",
            "--responses",
            str(responses),
            "--generator",
            "policy-iter-1",
            "--data",
            str(data),
            "--out",
            str(out),
        ]
    )
    exported = json.loads(out.read_text())
    assert len(exported) == 805
    assert exported[3] == {
        "instruction": examples[3].instruction,
        "output": "answer 3",
        "generator": "policy-iter-1",
        "dataset": examples[3].dataset,
    }


def test_length_stats_and_score_checks() -> None:
    stats = evaluate.length_stats(["a b", "a b c d"], count_tokens=lambda r: len(r))
    assert stats["length_mean_words"] == 3 and stats["length_mean_chars"] == 5
    assert stats["length_p95_words"] == pytest.approx(3.9)
    assert stats["length_mean_tokens"] == 5
    with pytest.raises(ValueError, match="shape"):
        evaluate.score_in_batches(lambda p, r: np.zeros(len(p) + 1), ["x"], ["y"], progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        evaluate.score_in_batches(lambda p, r: np.full(len(p), np.nan), ["x"], ["y"], progress=False)
    with pytest.raises(ValueError, match="at least one pair"):
        evaluate.pairwise_accuracy(keyword_judge, [])
    assert (
        evaluate.pairwise_accuracy(keyword_judge, [PreferenceExample("q", "good", "bad")], progress=False)[
            "accuracy"
        ]
        == 1.0
    )


def test_make_prompts_cli(tmp_path, capsys) -> None:
    evaluate.main(
        [
            "make-prompts",
            "--out",
            str(tmp_path),
            "--policy",
            "5",
            "5",
            "--reward-model",
            "4",
            "--base-rm-labels",
            "3",
            "--heldout-eval",
            "2",
        ]
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    capsys.readouterr()
    # The recorded held-out split is scored by the same CLI, matching responses by prompt_id.
    heldout = load_instruction_prompts(tmp_path / "heldout_eval.jsonl")
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"prompt_id": p.key, "response": "ok"}) + "\n" for p in heldout))
    evaluate.main(["ifeval", "--data", str(tmp_path / "heldout_eval.jsonl"), "--responses", str(responses)])
    assert json.loads(capsys.readouterr().out)["num_prompts_scored"] == 2
    assert {k: v["num_prompts"] for k, v in manifest["splits"].items()} == {
        "heldout_eval": 2,
        "base_rm_labels": 3,
        "reward_model": 4,
        "policy_1": 5,
        "policy_2": 5,
    }
