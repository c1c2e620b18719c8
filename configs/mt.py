"""Mutual-Taught run configurations: `--config=configs/mt.py[:PRESET[,ARM]]` with `--config.a.b=value` overrides.

Every section holds the fields of the library's dataclasses by name (`mtjax.settings` lists which), at the
library's defaults unless set here: any setting of the model, the DPO/IPO/SimPO objective, AdamW, the
sampler or the loop can be changed from the command line, e.g. `--config.dpo.label_smoothing=0.1`,
`--config.policy.attention_impl=cudnn`, `--config.rm.b2=0.95`. Model fields left unset come from the
checkpoint.

Presets:
  default  the offline testbed: SmolLM2-135M-Instruct policy, an RM grown from SmolLM2's backbone and
           trained on the gold-labelled "human" split, generated verifiable-instruction prompts, T = 2;
           sized for a 2-core CPU (uses a GPU automatically when JAX sees one).
  tiny     random tiny models on SmolLM2's tokenizer, a handful of prompts: seconds per phase (tests, CI).
  gpu      the testbed at a scale that shows the effect on one GPU (thousands of prompts).
  paper    the paper's setting: Llama-3-8B-Instruct + FsfairX-LLaMA3-RM-v0.1 from the hub (or local folders),
           UltraFeedback prompts, K=5, β=0.01, lr 7e-7 / 2e-6, batch 128 / 512, length 2048, remat, FSDP over
           all devices; evaluated on AlpacaEval 2, Arena-Hard and RewardBench.
  synthetic the controlled co-adaptation testbed (docs/synthetic.md): the synthetic keyword-coverage task with a
           known gold reward, ~1M-parameter Llama models, π0 from a supervised phase on imperfect
           demonstrations, r0 from a budget of 2048 gold-labelled pairs, T = 3; a few minutes per run on a CPU.

Arms (`mtjax.arms`; default mutual): the method the run is, applied on top of the preset, e.g.
`configs/mt.py:paper,iterative_dpo` or `configs/mt.py:synthetic,sppo`: mutual, iterative_dpo, frozen, offline,
offline_ipo, offline_simpo, sppo, self_rewarding, meta_rewarding, ser, and the ablations and controls of a study.
"""

from ml_collections import ConfigDict

from mtjax import settings
from mtjax.arms import DEFAULT_ARM, apply_arm
from mtjax.iteration_eval import EvalConfig
from mtjax.models.config import ModelConfig
from mtjax.prompt_sets import PromptConfig
from mtjax.sampling import SamplingConfig
from mtjax.sources import ModelSource
from mtjax.synthetic import DemonstratorConfig, TaskConfig
from mtjax.tasks import TaskChoice
from mtjax.tracking import TrackingConfig
from mtjax.train import DPOConfig, OptimizerConfig, RewardConfig, SFTConfig

PRESETS = ("default", "tiny", "gpu", "paper", "synthetic")
TRAINING = (OptimizerConfig, settings.TrainingRun)


def get_config(spec: str = "") -> ConfigDict:
    """`spec`: "PRESET" or "PRESET,ARM" (either may be empty: the default preset, Mutual-Taught)."""
    preset, _, arm = spec.partition(",")
    cfg = preset_config(preset.strip() or "default")
    return apply_arm(cfg, arm.strip() or DEFAULT_ARM)


def preset_config(preset: str) -> ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/mt.py; available: {', '.join(PRESETS)}")
    section = settings.section
    cfg = ConfigDict()
    cfg.preset = preset
    cfg.arm = DEFAULT_ARM  # set by `get_config` (mtjax.arms)
    cfg.seed = 0
    cfg.iterations = 2
    # dtype: compute dtype; param_dtype: master weights (keep float32 when training in bfloat16).
    model = dict(dtype="float32", param_dtype="float32", remat=False)
    cfg.policy = section(ModelSource, ModelConfig, source="smollm2", **model)
    cfg.reward_model = section(ModelSource, ModelConfig, source="smollm2", **model)
    # The task: its prompt splits and the gold reward of r0's labels and the evaluations (mtjax.tasks); the
    # synthetic task's difficulty and gold reward are its `TaskConfig` fields here.
    cfg.task = section(TaskChoice, TaskConfig)
    cfg.prompts = section(PromptConfig, max_prompt_tokens=192)
    # The default is sized for a 2-core CPU (about 10 minutes): few prompts, short responses, one epoch.
    cfg.sampling = section(SamplingConfig, num_samples=4, temperature=0.8, top_p=0.95, max_new_tokens=48,
                           batch_size=32, max_batch_tokens=16384)
    # π0 from a supervised phase on the task's demonstrations (off: π0 is the policy source).
    cfg.sft = section(settings.SFTPhase, DemonstratorConfig, SFTConfig, *TRAINING)
    # So few steps cannot afford a warm-up from lr 0 (it would waste half of them): cosine from the peak.
    # The reference log-probs of π_{t-1} are computed once per E-step and cached ("precomputed").
    cfg.dpo = section(DPOConfig, *TRAINING, loss_type="dpo", beta=0.1, reference="precomputed", learning_rate=1e-5,
                      batch_size=8, max_length=256, warmup_ratio=0.0)
    cfg.rm = section(RewardConfig, *TRAINING, learning_rate=5e-5, batch_size=8, max_length=256, weight_decay=0.001,
                     warmup_ratio=0.0)
    # r0: trained on gold-labelled pairs of the base policy's samples (the "human" split); disabled when the
    # reward-model source is already a trained RM (the paper's FsfairX).
    cfg.base_rm = section(settings.BaseRMPhase, RewardConfig, *TRAINING, learning_rate=5e-5, batch_size=8,
                          max_length=256, epochs=2, weight_decay=0.001, warmup_ratio=0.0)
    # The loop's switches (settings.MTConfig): rm_update, drop_truncated (off in the CPU default, whose
    # 48-token budget truncates most of SmolLM2's answers; truncated responses are always counted), the
    # contrastive filter, the checkpoint gate, the baselines' prompt share and schedule.
    cfg.mt = section(settings.MTConfig)
    # Held-out evaluation: num_samples responses per testbed prompt (gold reward, IFEval accuracies, and RM
    # accuracy on the gold-labelled pairs among them); the paper preset evaluates on its benchmarks.
    cfg.eval = section(EvalConfig, num_samples=4, temperature=0.8)
    cfg.mesh = section(settings.MeshConfig)
    # Saves inside a phase (settings.CheckpointConfig); changing them never blocks resuming a run directory.
    cfg.checkpoint = section(settings.CheckpointConfig)
    # Where metrics go besides metrics.jsonl (tracking.TrackingConfig): TensorBoard event files in RUN/tensorboard
    # (on), Weights & Biases (off); changing this section never blocks resuming a run directory.
    cfg.logging = section(TrackingConfig)

    if preset == "tiny":
        cfg.policy.source = cfg.reward_model.source = "tiny"
        cfg.prompts.update(policy=(6, 6), reward_model=6, base_rm_labels=8, heldout_eval=6, max_prompt_tokens=176)
        cfg.sampling.update(num_samples=3, max_new_tokens=12, batch_size=16, max_batch_tokens=8192)
        cfg.eval.num_samples = 2
        for name in ("dpo", "rm", "base_rm"):
            cfg[name].update(batch_size=4, max_length=192, epochs=1, learning_rate=1e-3)
        cfg.mesh.data = 1
    elif preset == "gpu":
        cfg.policy.dtype = cfg.reward_model.dtype = "bfloat16"
        cfg.policy.scan_layers = cfg.reward_model.scan_layers = True
        cfg.prompts.update(policy=(2000, 2000), reward_model=2000, base_rm_labels=2000, heldout_eval=300,
                           max_prompt_tokens=512)
        cfg.sampling.update(num_samples=5, max_new_tokens=384, batch_size=256, max_batch_tokens=262144)
        cfg.mt.drop_truncated = True
        # 4 micro-batches of 16 pairs: 64 pairs at once need ~160 GiB (python -m mtjax.plan --config=configs/mt.py:gpu)
        cfg.dpo.update(batch_size=64, max_length=1024, epochs=1, learning_rate=2e-6, warmup_ratio=0.1,
                       num_micro_batches=4)
        cfg.rm.update(batch_size=64, max_length=1024, epochs=1, learning_rate=1e-5, warmup_ratio=0.1,
                      num_micro_batches=4)
        cfg.base_rm.update(batch_size=64, max_length=1024, epochs=1, learning_rate=1e-5, warmup_ratio=0.1,
                           num_micro_batches=4)
        cfg.eval.num_samples = 4
    elif preset == "paper":
        paper_config(cfg)
    elif preset == "synthetic":
        synthetic_config(cfg)
    return cfg


def synthetic_config(cfg: ConfigDict) -> None:
    """The controlled co-adaptation testbed (issue 18; docs/synthetic.md has the calibration): ordered keyword
    coverage with a known gold reward; Llama models of ~1M parameters on a 27-word vocabulary; π0 = 8 epochs
    of SFT on 2 imperfect demonstrations of each of 2000 prompts; r0 = the RM from π0's backbone trained on
    one gold-labelled pair of π0's samples for each of 2048 "human" prompts; 256 prompts per split, K = 4 at
    temperature 1, responses of at most 12 tokens; DPO β 0.1 at lr 3e-4, Bradley-Terry at lr 1e-3, batches
    of 32 pairs; every iteration evaluated on 256 held-out prompts x 4 samples (about 1500 gold pairs)."""
    cfg.iterations = 3
    cfg.policy.source = cfg.reward_model.source = "synthetic"
    cfg.task.name = "synthetic"
    # Prompts are at most 8 ids (<s> <user> 5 items <assistant>); 8 + 12 new tokens fit every training length.
    cfg.prompts.update(policy=(256, 256, 256), reward_model=256, base_rm_labels=2048, heldout_eval=256, sft=2000,
                       max_prompt_tokens=8)
    cfg.sampling.update(num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=12, batch_size=256,
                        max_batch_tokens=256 * 32)
    length = dict(max_length=20, warmup_ratio=0.05)
    cfg.sft.update(enabled=True, demonstrations_per_prompt=2, learning_rate=3e-3, batch_size=64, epochs=8, **length)
    cfg.base_rm.update(pairs_per_prompt=1, learning_rate=1e-3, batch_size=32, epochs=4, weight_decay=0.001, **length)
    cfg.dpo.update(loss_type="dpo", beta=0.1, reference="precomputed", learning_rate=3e-4, batch_size=32, epochs=2,
                   **length)
    cfg.rm.update(learning_rate=1e-3, batch_size=32, epochs=2, weight_decay=0.001, **length)
    cfg.eval.update(num_samples=4, temperature=1.0)
    cfg.mesh.data = 1


def paper_config(cfg: ConfigDict) -> None:
    """Shi et al. (2025): Llama-3-8B-Instruct policy, FsfairX-LLaMA3-RM-v0.1 (already a trained RM: no r0
    phase), UltraFeedback prompts split in three, K = 5 at temperature 0.8 / top-p 0.95, DPO β = 0.01 at
    lr 7e-7 with global batch 128, Bradley-Terry at lr 2e-6 with global batch 512 and weight decay 0.001,
    length 2048, one epoch, cosine with 10 % warm-up; prompts capped at 1024 tokens (SimPO's recipe caps at
    1800 of 2048; here 1024 prompt + 1024 response tokens fit the 2048 of training)."""
    bf16 = dict(dtype="bfloat16", param_dtype="float32", remat=True, scan_layers=True)
    cfg.policy.update(source="meta-llama/Meta-Llama-3-8B-Instruct", **bf16)
    cfg.reward_model.update(source="sfairXC/FsfairX-LLaMA3-RM-v0.1", **bf16)
    cfg.prompts.update(source="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", column="prompt",
                       policy=(20000, 20000), reward_model=20000, max_prompt_tokens=1024)
    cfg.sampling.update(num_samples=5, temperature=0.8, top_p=0.95, max_new_tokens=1024, batch_size=512,
                        max_batch_tokens=512 * 2048)
    cfg.mt.drop_truncated = True
    # Global batches as in the paper, accumulated exactly over micro-batches of 1 pair per device on 8 devices
    # (`python -m mtjax.plan --config=configs/mt.py:paper` shows the memory).
    cfg.dpo.update(loss_type="dpo", beta=0.01, learning_rate=7e-7, batch_size=128, num_micro_batches=16,
                   max_length=2048, warmup_ratio=0.1, weight_decay=0.0)
    cfg.rm.update(learning_rate=2e-6, batch_size=512, num_micro_batches=64, max_length=2048, warmup_ratio=0.1,
                  weight_decay=0.001)
    cfg.base_rm.enabled = False
    cfg.eval.update(benchmarks=("alpaca_eval", "arena_hard", "rewardbench"), answer_temperature=0.0)
    cfg.mesh.update(data=1, fsdp=-1)
