"""Entry point: `python -m mtjax.run --config=configs/mt.py[:PRESET] [--config.a.b=value ...]`.

The Mutual-Taught EM driver is not implemented yet (issue 6). For now this command parses and
validates the config and checks that the offline base policy loads, so the README's main command
already proves the installation works.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (used once the EM driver lands).")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # absl's INFO lines (e.g. "no TPU backend") are noise here
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config=configs/mt.py")
    print(f"mtjax: resolved config (preset {cfg.preset!r}):\n{cfg}")
    if cfg.policy.source == "smollm2":
        from mtjax.models import load_smollm2

        model, params, tokenizer = load_smollm2(dtype=cfg.policy.dtype)
        print(f"mtjax: loaded SmolLM2-135M-Instruct offline ({model.cfg.num_layers} layers, "
              f"vocab {model.cfg.vocab_size}, eos {tokenizer.eos_token!r})")
    print("mtjax: the Mutual-Taught EM driver is not implemented yet (issue 6); nothing was trained.")
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
