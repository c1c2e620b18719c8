"""Mutual-Taught run configurations: `--config=configs/mt.py[:PRESET]` (ml_collections).

Presets: '' (default, the offline SmolLM2 testbed run), 'tiny' (random tiny models, for tests/CI).
The EM driver that consumes these lands with issue 6; until then `python -m mtjax.run` validates
and prints the config.
"""

from ml_collections import ConfigDict


def get_config(preset: str = "") -> ConfigDict:
    cfg = ConfigDict()
    cfg.preset = preset or "default"
    cfg.seed = 0
    cfg.iterations = 2

    cfg.policy = ConfigDict()
    cfg.policy.source = "smollm2"  # 'smollm2' (offline GGUF), an HF checkpoint dir, or 'tiny'
    cfg.policy.dtype = "float32"

    cfg.reward_model = ConfigDict()
    cfg.reward_model.source = "smollm2"  # backbone; a fresh seeded score head is added
    cfg.reward_model.dtype = "float32"

    if preset == "tiny":
        cfg.policy.source = "tiny"
        cfg.reward_model.source = "tiny"
    elif preset not in ("", "default"):
        raise ValueError(f"unknown preset {preset!r} for configs/mt.py; available: default, tiny")
    return cfg
