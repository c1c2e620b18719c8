"""Offline verifiable-instruction testbed: generated prompts, gold reward, evaluation data loaders.

The gold reward (code-checked IFEval-style constraints) is the ground truth that labels the base RM's
preference pairs and measures policy and RM quality per Mutual-Taught iteration. Evaluators built on
it live in :mod:`mtjax.evaluate`; the run report in :mod:`mtjax.report`.
"""

from mtjax.testbed.gold import GoldResult, InstructionResult, check_response, gold_reward
from mtjax.testbed.prompts import (
    PromptGeneratorConfig,
    PromptSplitSizes,
    build_prompt_splits,
    load_prompt_splits,
    save_prompt_splits,
)
from mtjax.testbed.tasks import BASE_TASKS

__all__ = [
    "BASE_TASKS",
    "GoldResult",
    "InstructionResult",
    "PromptGeneratorConfig",
    "PromptSplitSizes",
    "build_prompt_splits",
    "check_response",
    "gold_reward",
    "load_prompt_splits",
    "save_prompt_splits",
]
