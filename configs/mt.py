"""Mutual-Taught run configurations: `--config=configs/mt.py[:PRESET]` with `--config.a.b=value` overrides.

Presets:
  default  the offline testbed: SmolLM2-135M-Instruct policy, an RM grown from SmolLM2's backbone and
           trained on the gold-labelled "human" split, generated verifiable-instruction prompts, T = 2;
           sized for a 2-core CPU (uses a GPU automatically when JAX sees one).
  tiny     random tiny models on SmolLM2's tokenizer, a handful of prompts: seconds per phase (tests, CI).
  gpu      the testbed at a scale that shows the effect on one GPU (thousands of prompts).
  paper    the paper's hyper-parameters (Llama-3-8B-Instruct + FsfairX RM, UltraFeedback prompts, K=5,
           β=0.01, lr 7e-7 / 2e-6, batch 128 / 512, length 2048, remat, FSDP over all devices); give
           hub access or local paths (--config.policy.source=DIR ... --config.prompts.source=FILE).
"""

from ml_collections import ConfigDict, config_dict

PRESETS = ("default", "tiny", "gpu", "paper")


def _train(lr: float, batch: int, max_length: int, epochs: int = 1, weight_decay: float = 0.0,
           warmup_ratio: float = 0.1) -> ConfigDict:
    return ConfigDict(dict(learning_rate=lr, batch_size=batch, num_micro_batches=1, max_length=max_length,
                           warmup_ratio=warmup_ratio, weight_decay=weight_decay, epochs=epochs))


def get_config(preset: str = "") -> ConfigDict:
    preset = preset or "default"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/mt.py; available: {', '.join(PRESETS)}")
    cfg = ConfigDict()
    cfg.preset = preset
    cfg.seed = 0
    cfg.iterations = 2
    # dtype: compute dtype; param_dtype: master weights (keep float32 when training in bfloat16).
    # attention_impl: auto (cuDNN on a GPU in bf16/fp16, else einsum) | einsum | xla | cudnn;
    # scan_layers: decoder layers as one nn.scan (compile time flat in depth; needed for remat to save memory).
    model = dict(dtype="float32", param_dtype="float32", remat=False, attention_impl="auto", scan_layers=False)
    cfg.policy = ConfigDict(dict(source="smollm2", **model))
    cfg.reward_model = ConfigDict(dict(source="smollm2", **model, head_seed=0))
    # source: 'testbed' (generated verifiable-instruction prompts) or a prompt set for D_1..D_T and D_R
    # (local .jsonl/.parquet, a save_to_disk folder, or a hub id read with `split` / `column`); the
    # held-out evaluation and the base-RM label split always come from the testbed.
    cfg.prompts = ConfigDict(dict(source="testbed", split="train", column="prompt", seed=0, policy=(8, 8),
                                  reward_model=8, base_rm_labels=8, heldout_eval=8))
    # The default is sized for a 2-core CPU (about 10 minutes): few prompts, short responses, one epoch.
    cfg.sampling = ConfigDict(dict(num_samples=4, temperature=0.8, top_p=0.95, max_new_tokens=48, batch_size=32))
    # So few steps cannot afford a warm-up from lr 0 (it would waste half of them): cosine from the peak.
    cfg.dpo = _train(lr=1e-5, batch=8, max_length=256, warmup_ratio=0.0)
    cfg.dpo.loss_type = "dpo"  # dpo | ipo | hinge | simpo
    cfg.dpo.beta = 0.1
    cfg.rm = _train(lr=5e-5, batch=8, max_length=256, weight_decay=0.001, warmup_ratio=0.0)
    # r0: trained on gold-labelled pairs of the base policy's samples (the "human" split); disable when
    # the reward-model source is already a trained RM (the paper's FsfairX).
    cfg.base_rm = _train(lr=5e-5, batch=8, max_length=256, epochs=2, weight_decay=0.001, warmup_ratio=0.0)
    cfg.base_rm.enabled = True
    # rm_update: mutual | frozen (= iterative DPO) | self_only | contrastive_only.
    # drop_truncated: leave responses that hit max_new_tokens out of pairs (off in the CPU default, whose
    # 48-token budget truncates most of SmolLM2's answers; every truncated response is still counted).
    # gate_win_rate τ (unset = no gate): after iteration t, keep π_t only if r_t prefers its held-out
    # responses to the kept policy's at a rate ≥ τ; otherwise the next iteration starts from the kept one.
    # policy_prompts: own (D_t) | with_rm (D_t plus a 1/T share of D_R, for the RM-frozen baselines).
    # schedule: iterative | offline (one DPO round from π0 on all training prompts, scored by r0).
    cfg.mt = ConfigDict(dict(rm_update="mutual", drop_truncated=False, contrastive_filter=False,
                             gate_win_rate=config_dict.placeholder(float), policy_prompts="own",
                             schedule="iterative"))
    # Held-out evaluation: num_samples responses per prompt (gold reward, IFEval accuracies, and RM
    # accuracy on the gold-labelled pairs among them).
    cfg.eval = ConfigDict(dict(num_samples=4, temperature=0.8))
    cfg.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Saves inside a phase, so a crash or Ctrl-C loses at most this much work: a training phase's state
    # (params + optimizer) every `train_every_steps` steps and/or `train_every_seconds` seconds (0 = off);
    # sampling passes in pieces of `sample_every_prompts` prompts. Changing them never blocks resuming a
    # run directory (a different piece size batches prompts differently, which can move a draw that float
    # rounding decides).
    cfg.checkpoint = ConfigDict(dict(train_every_steps=0, train_every_seconds=600.0, sample_every_prompts=2048))

    if preset == "tiny":
        cfg.policy.source = cfg.reward_model.source = "tiny"
        cfg.prompts.update(policy=(6, 6), reward_model=6, base_rm_labels=8, heldout_eval=6)
        cfg.sampling.update(num_samples=3, max_new_tokens=12, batch_size=16)
        cfg.eval.num_samples = 2
        for section in (cfg.dpo, cfg.rm, cfg.base_rm):
            section.update(batch_size=4, max_length=128, epochs=1, learning_rate=1e-3)
        cfg.mesh.data = 1
    elif preset == "gpu":
        cfg.policy.dtype = cfg.reward_model.dtype = "bfloat16"
        cfg.policy.scan_layers = cfg.reward_model.scan_layers = True
        cfg.prompts.update(policy=(2000, 2000), reward_model=2000, base_rm_labels=2000, heldout_eval=300)
        cfg.sampling.update(num_samples=5, max_new_tokens=384, batch_size=256)
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
        cfg.policy.update(source="meta-llama/Meta-Llama-3-8B-Instruct", dtype="bfloat16")
        cfg.reward_model.update(source="sfairXC/FsfairX-LLaMA3-RM-v0.1", dtype="bfloat16")
        cfg.prompts.update(source="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", column="prompt",
                           policy=(20000, 20000), reward_model=20000)
        cfg.sampling.update(num_samples=5, temperature=0.8, top_p=0.95, max_new_tokens=1024, batch_size=512)
        cfg.mt.drop_truncated = True
        cfg.policy.remat = cfg.reward_model.remat = True
        cfg.policy.scan_layers = cfg.reward_model.scan_layers = True
        # Global batches as in the paper, accumulated exactly over micro-batches of 1 pair per device
        # on 8 devices (`python -m mtjax.plan --config=configs/mt.py:paper` shows the memory).
        cfg.dpo = _train(lr=7e-7, batch=128, max_length=2048)
        cfg.dpo.update(loss_type="dpo", beta=0.01, num_micro_batches=16)
        cfg.rm = _train(lr=2e-6, batch=512, max_length=2048, weight_decay=0.001)
        cfg.rm.num_micro_batches = 64
        cfg.base_rm.enabled = False
        cfg.mesh.update(data=1, fsdp=-1)
    return cfg
