"""Can a model judge? Its answers to a few prompts, then its Self-Rewarding verdicts on them (`mtjax.judge`):
how many parse, and the scores; with `--meta`, its Meta-Rewarding verdicts on its own judgments too (every two
judgments of each prompt's most disputed response, both positions). Run it before a `self_rewarding` or
`meta_rewarding` arm: a judge whose verdicts do not parse gives the E-step no pairs.

    python scripts/judge_check.py --prompts runs/default/prompts/policy_1.jsonl             # SmolLM2-135M
    python scripts/judge_check.py --model /path/to/hf_folder --prompts FILE --num-prompts 8 --judgments 3 --meta
"""

from __future__ import annotations

import argparse
import json
import time

from mtjax import judge as rubric
from mtjax.evaluate import mtjax_generate_fn
from mtjax.prompt_sets import PromptConfig, prompt_text, read_prompts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (offline) or a local HF folder")
    parser.add_argument("--prompts", required=True, help="a prompt set as `prompts.source` takes it")
    parser.add_argument("--column", default="prompt", help="its prompt column (`prompts.column`)")
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--judgments", type=int, default=3, help="verdicts per response (Self-Rewarding: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the answers' length")
    parser.add_argument("--judge-max-new-tokens", type=int, default=192)
    parser.add_argument("--meta", action="store_true", help="meta-judge the judgments too (Meta-Rewarding)")
    args = parser.parse_args(argv)
    prompts = [prompt_text(p) for p in read_prompts(PromptConfig(source=args.prompts, column=args.column))[0]]
    prompts = prompts[: args.num_prompts]
    sample = dict(temperature=0.8, top_p=0.95, progress=False)
    responses = mtjax_generate_fn(args.model, max_new_tokens=args.max_new_tokens, seed=0, **sample)(prompts)
    judge = mtjax_generate_fn(args.model, max_new_tokens=args.judge_max_new_tokens, seed=1, **sample)
    verdicts: list[str] = []

    def judged(queries: list[str]) -> list[str]:
        verdicts.extend(judge(queries))
        return verdicts

    start = time.perf_counter()
    result = rubric.judge_rewards(judged, prompts, responses, args.judgments)
    out = {"model": args.model, "prompts": len(prompts), **result.summary(), "rewards": result.rewards,
           "seconds": time.perf_counter() - start, "first_verdict_tail": verdicts[0][-300:] if verdicts else ""}
    if args.meta:  # one response per prompt here, so it is the examined one when its judgments differ
        per_response = [verdicts[i * args.judgments:(i + 1) * args.judgments] for i in range(len(prompts))]
        queries = [rubric.meta_judge_prompt(p, r, texts[a], texts[b])
                   for p, r, texts in zip(prompts, responses, per_response, strict=True)
                   if rubric.most_disputed([texts]) is not None for a, b in rubric.battles(len(texts))]
        start = time.perf_counter()
        meta = judge(queries) if queries else []
        winners = [rubric.parse_winner(v) for v in meta]
        out["meta"] = {"meta_judgments": len(meta), "meta_judgments_unparsed": sum(w is None for w in winners),
                       "position_a_wins": winners.count(0), "position_b_wins": winners.count(1),
                       "seconds": time.perf_counter() - start,
                       "first_meta_verdict_tail": meta[0][-300:] if meta else ""}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
