"""A synthetic gold-reward testbed (Gao et al., 2022 style) for Mutual-Taught at CPU scale.

A task with a known continuous gold reward and tempting spurious features (`task`), a word-level
tokenizer built in code (`tokenizer`), imperfect demonstrations for the supervised phase that makes π0
(`demonstrations`) and ~1M-parameter Llama models (`models`); gold-labelled pairs come from
`mtjax.gold_pairs`. The EM driver runs the task as the `synthetic` preset (`mtjax.tasks`, the `synthetic`
model source); `docs/synthetic.md` describes it and its calibration.
"""

from mtjax.gold_pairs import one_pair_per_prompt, pairwise_accuracy, untied_pairs
from mtjax.synthetic.demonstrations import DemonstratorConfig, demonstration, demonstrations, sft_completions
from mtjax.synthetic.models import init_policy, model_config, num_parameters, reward_model_from_policy
from mtjax.synthetic.task import (
    DECOY,
    ITEMS,
    WORDS,
    TaskConfig,
    best_gain,
    coverage,
    gold_reward,
    gold_rewards,
    make_prompts,
    prompt_items,
    prompt_stream,
    spurious_features,
)
from mtjax.synthetic.tokenizer import SyntheticTokenizer


def make_tokenizer() -> SyntheticTokenizer:
    """The tokenizer of the synthetic task's vocabulary."""
    return SyntheticTokenizer(WORDS)


__all__ = [
    "DECOY", "ITEMS", "WORDS", "DemonstratorConfig", "SyntheticTokenizer", "TaskConfig", "best_gain", "coverage",
    "demonstration", "demonstrations", "gold_reward", "gold_rewards", "init_policy", "make_prompts",
    "make_tokenizer", "model_config", "num_parameters", "one_pair_per_prompt", "pairwise_accuracy",
    "prompt_items", "prompt_stream", "reward_model_from_policy", "sft_completions", "spurious_features", "untied_pairs",
]
