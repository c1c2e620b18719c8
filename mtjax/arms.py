"""Named arms: the methods a run can be, each a set of settings on top of a preset.

`--config=configs/mt.py:PRESET,ARM` (e.g. `configs/mt.py:paper,iterative_dpo`) builds the preset and then
applies the arm; `scripts/replicate.py --arms=...` runs several arms side by side on the same data, models and
evaluation. The arm's name is kept in the config (`arm`), so a run directory says what it ran.

    mutual             the paper's method, Mutual-Taught (the default: no change)
    iterative_dpo      the paper's iterative DPO baseline: RM frozen, the policy trained on all T + 1 prompt
                       portions (D_1 .. D_T, D_R) over T + 1 iterations, its learning rate × 5/7 (7e-7 → 5e-7)
    frozen             the ablation "RM frozen": as mutual_taught's iterations, each on D_t + a 1/T share of D_R
    offline / offline_ipo / offline_simpo
                       one round from π0 on all training prompts scored by r0 (the paper's offline baselines)
    sppo               SPPO: the highest- and lowest-reward of the K samples, each regressed onto its estimated
                       win probability (`losses.sppo_loss`), RM frozen, all portions as iterative DPO
    self_rewarding     Self-Rewarding: the current policy judges its own samples with the 5-point rubric
                       (`mtjax.judge`), best vs worst judged, iterative DPO, no reward model
    meta_rewarding     Meta-Rewarding: Self-Rewarding, and the policy as meta-judge compares its own judgments;
                       DPO on the response pairs and the preferred-judgment pairs together
    ser                Self-Evolved Reward learning in the M-step: the RM labels pairs of π_t's samples itself,
                       keeps the confident ones and retrains, `mt.ser_rounds` times
    self_only / contrastive_only / mutual_filtered / oracle / random
                       the paper's ablations, its revision's filter, and the controls of a study
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

# The paper lowered iterative DPO's learning rate from Mutual-Taught's 7e-7 to 5e-7; other presets scale theirs
# by the same ratio.
ITERATIVE_DPO_LR_SCALE = 5 / 7


@dataclasses.dataclass(frozen=True)
class Arm:
    """`settings`: "section.key" -> value; `adjust`: a change that depends on the preset (e.g. a scaled rate)."""

    summary: str
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    adjust: Callable[[Any], None] | None = None


def _iterative_dpo_learning_rate(cfg) -> None:
    cfg.dpo.learning_rate = cfg.dpo.learning_rate * ITERATIVE_DPO_LR_SCALE


_ALL_PORTIONS_FROZEN = {"mt.rm_update": "frozen", "mt.policy_prompts": "all_portions"}
_OFFLINE = {"mt.rm_update": "frozen", "mt.schedule": "offline"}

ARMS: dict[str, Arm] = {
    "mutual": Arm("Mutual-Taught (Shi et al. 2025): E-step DPO on r_{t-1}'s pairs, M-step r_t from r0"),
    "iterative_dpo": Arm("iterative DPO as the paper ran it: RM frozen, T + 1 iterations over all prompt portions, "
                         "lr × 5/7", _ALL_PORTIONS_FROZEN, _iterative_dpo_learning_rate),
    "frozen": Arm("RM frozen (ablation): T iterations, each on D_t plus a 1/T share of D_R",
                  {"mt.rm_update": "frozen", "mt.policy_prompts": "with_rm"}),
    "offline": Arm("offline DPO: one round from π0 on every training prompt, scored by r0", _OFFLINE),
    "offline_ipo": Arm("offline IPO", {**_OFFLINE, "dpo.loss_type": "ipo"}),
    "offline_simpo": Arm("offline SimPO", {**_OFFLINE, "dpo.loss_type": "simpo"}),
    "sppo": Arm("SPPO (Wu et al. 2024): best and worst of K regressed onto their win probabilities, RM frozen, "
                "all portions", {**_ALL_PORTIONS_FROZEN, "dpo.loss_type": "sppo", "mt.policy_pairs": "best_worst"}),
    "self_rewarding": Arm("Self-Rewarding (Yuan et al. 2024): π_{t-1} judges its samples with the 5-point rubric, "
                          "best vs worst, iterative DPO, no RM",
                          {**_ALL_PORTIONS_FROZEN, "mt.policy_rewards": "judge_policy",
                           "mt.policy_pairs": "best_worst"}),
    "meta_rewarding": Arm("Meta-Rewarding (Wu et al. 2024): Self-Rewarding, plus the policy as meta-judge of its "
                          "own judgments; DPO on response and judge pairs",
                          {**_ALL_PORTIONS_FROZEN, "mt.policy_rewards": "judge_policy",
                           "mt.policy_pairs": "best_worst", "mt.meta_judge": True}),
    "ser": Arm("Self-Evolved Reward learning (Huang et al. 2024) as the M-step: self-labelled confident pairs, "
               "rounds", {"mt.rm_update": "ser"}),
    "self_only": Arm("ablation: M-step on self-training pairs D(PM) only", {"mt.rm_update": "self_only"}),
    "contrastive_only": Arm("ablation: M-step on contrastive pairs D(PM_new, PM_old) only",
                            {"mt.rm_update": "contrastive_only"}),
    "mutual_filtered": Arm("Mutual-Taught with the revision's contrastive filter (Δr < −std dropped)",
                           {"mt.contrastive_filter": True}),
    "oracle": Arm("positive control: mutual's pairs labelled by the gold reward", {"mt.rm_update": "oracle"}),
    "random": Arm("negative control: mutual's pairs labelled by a seeded coin", {"mt.rm_update": "random"}),
}
DEFAULT_ARM = "mutual"


def arm_keys() -> set[str]:
    """Every "section.key" some arm sets (a study may not override them: they are what the arms differ in; a
    scaled setting such as iterative DPO's learning rate is scaled from the overridden value)."""
    return {key for arm in ARMS.values() for key in arm.settings}


def apply_arm(cfg, name: str):
    """`cfg` (a preset's ConfigDict) turned into arm `name`, in place; returns it."""
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; available: {', '.join(ARMS)}")
    arm = ARMS[name]
    for key, value in arm.settings.items():
        section, field = key.split(".")
        cfg[section][field] = value
    if arm.adjust is not None:
        arm.adjust(cfg)
    cfg.arm = name
    return cfg
