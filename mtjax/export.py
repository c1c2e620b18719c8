"""Export a run's models as Hugging Face directories:
`python -m mtjax.export RUN_DIR --iteration N --out DIR`.

Writes `DIR/policy` (`*ForCausalLM`) and `DIR/reward_model` (`*ForSequenceClassification`), each with
config, safetensors and tokenizer, loadable by transformers (and vLLM for the policy). Iteration 0 is
the base policy π0 and the base reward model r0. The run directory is only read (it may be read-only or
in use by a running run); models the run has not produced yet (an untrained r0, a policy whose E-step has
not finished) and checkpoints that differ from their recorded checksums are refused.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def export_iteration(run_dir: str | Path, iteration: int, out: str | Path) -> dict[str, Path]:
    from ml_collections import ConfigDict

    from mtjax.em import MutualTaught
    from mtjax.models import save_hf
    from mtjax.rundir import RunDir

    config = RunDir.open_read_only(run_dir).config
    run = MutualTaught(ConfigDict(config), str(run_dir), read_only=True)
    policy, reward = run.params_at(iteration)
    out = Path(out)
    paths = {"policy": out / "policy", "reward_model": out / "reward_model"}
    save_hf(run.models.policy, policy, paths["policy"], tokenizer=run.models.tokenizer)
    save_hf(run.models.reward, reward, paths["reward_model"], tokenizer=run.models.reward_tokenizer)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mtjax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory written by python -m mtjax.run")
    parser.add_argument("--iteration", type=int, required=True, help="0 = base models, t = after iteration t")
    parser.add_argument("--out", required=True, help="output folder (gets policy/ and reward_model/)")
    args = parser.parse_args(argv)
    from mtjax.rundir import RunDirError

    try:
        paths = export_iteration(args.run_dir, args.iteration, args.out)
    except (FileNotFoundError, ValueError, RunDirError) as e:
        sys.exit(f"mtjax.export: {e}")
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
