"""Run settings: every section of a run's config is the fields of library dataclasses, by name.

`configs/mt.py` builds each section with `section(...)` from the dataclasses' own fields and defaults, so
every library setting is reachable as `--config.SECTION.FIELD=value` without a hand-written bridge;
`build(cls, section)` turns a section back into the dataclass (whose `__post_init__` checks the values);
`validate_config` builds every section a run uses, before any model is loaded or any file is written,
and reports every problem at once with the setting's full name.

    section      dataclasses (fields)                          consumer
    policy       ModelSource, ModelConfig                      mtjax.sources / mtjax.models
    reward_model ModelSource, ModelConfig                      mtjax.sources / mtjax.models
    task         TaskChoice, synthetic.TaskConfig              mtjax.tasks (prompt splits, gold reward)
    prompts      PromptConfig                                  mtjax.prompt_sets
    sampling     SamplingConfig                                mtjax.sampling.generate / score
    sft          SFTPhase, DemonstratorConfig, SFTConfig,      mtjax.train (π0 from the task's demonstrations)
                 OptimizerConfig, TrainingRun
    dpo          DPOConfig, OptimizerConfig, TrainingRun       mtjax.train (E-step)
    rm, base_rm  RewardConfig, OptimizerConfig, TrainingRun    mtjax.train (M-step, r0); base_rm + BaseRMPhase
    mt           MTConfig                                      the EM loop's switches
    eval         EvalConfig                                    per-iteration evaluation
    mesh         MeshConfig                                    mtjax.sharding.make_mesh
    checkpoint   CheckpointConfig                              mid-phase saves
    logging      TrackingConfig                                metrics sinks (mtjax.tracking)

`ModelConfig`'s fields are all optional in a section (unset = the checkpoint's value, or the library's
default for execution settings such as `attention_impl`); `OptimizerConfig.total_steps` is derived from
the number of pairs and is not a setting.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from ml_collections import ConfigDict, config_dict

# ----------------------------------------------------------------------------- the driver's own settings


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _raise(cls: type, problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(f"{cls.__name__}.{p}" for p in problems))


def finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """How a training phase feeds its step: pairs per optimizer step, the cut length of a pair, epochs."""

    batch_size: int = 8
    max_length: int = 256
    epochs: int = 1

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _check(p, self.max_length >= 2, f"max_length={self.max_length} must be >= 2 (a prompt and a response token)")
        _check(p, self.epochs >= 1, f"epochs={self.epochs} must be >= 1")
        _raise(type(self), p)


@dataclasses.dataclass(frozen=True)
class BaseRMPhase:
    """r0: train the reward model on gold-labelled pairs of π0's samples first (off when the reward-model
    source is already a trained RM, as the paper's FsfairX).

    pairs_per_prompt: the "human" budget per label prompt: at most this many random untied pairs among its
      samples (1 = one comparison per prompt), 0 = every untied pair.
    """

    enabled: bool = True
    pairs_per_prompt: int = 0

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, isinstance(self.pairs_per_prompt, int) and self.pairs_per_prompt >= 0,
               f"pairs_per_prompt={self.pairs_per_prompt!r} must be an int >= 0 (0 = every untied pair)")
        _raise(type(self), p)


@dataclasses.dataclass(frozen=True)
class SFTPhase:
    """π0 from a supervised phase: the policy source's weights trained with next-token cross-entropy on the
    task's demonstrations of the `prompts.sft` split (a source with random weights, `tiny` or `synthetic`,
    is drawn from `seed` first). Off by default: π0 is the policy source.

    demonstrations_per_prompt: demonstrations drawn per SFT prompt.
    seed: the demonstrations, the random initial weights and the batch order; not the run's seed, so every
      seed of a study shares π0 as it would share a pretrained model.
    reward_model_from_policy: the reward model then starts from π0's backbone with a fresh score head
      (`reward_model.head_seed`), as InstructGPT's RM starts from the SFT model (same architecture needed).
    """

    enabled: bool = False
    demonstrations_per_prompt: int = 2
    seed: int = 0
    reward_model_from_policy: bool = True

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, isinstance(self.demonstrations_per_prompt, int) and self.demonstrations_per_prompt >= 1,
               f"demonstrations_per_prompt={self.demonstrations_per_prompt!r} must be an int >= 1")
        _raise(type(self), p)


# mutual: the paper's M-step; frozen: no M-step (iterative DPO); self_only / contrastive_only: one kind of pair;
# oracle / random: mutual's pairs with gold labels (a positive control) / with seeded coin-flip labels (negative);
# ser: Self-Evolved Reward learning, the RM labels pairs of the new policy's samples itself and retrains on the
# confident ones, `ser_rounds` times.
RM_UPDATES = ("mutual", "frozen", "self_only", "contrastive_only", "oracle", "random", "ser")
# Which prompts the E-step of iteration t uses: D_t ("own"), D_t plus the t-th of T equal chunks of D_R
# ("with_rm": the paper's baselines get the RM's prompts too, so every arm sees as many), or the t-th of the
# T + 1 portions D_1 .. D_T, D_R ("all_portions": the paper's iterative DPO, one more iteration than T).
POLICY_PROMPTS = ("own", "with_rm", "all_portions")
# "iterative": T rounds; "offline": one DPO round from π0 on every training prompt (D_1..D_T and D_R)
# scored by r0, RM untouched: single-round offline DPO, the baseline with no iteration at all.
SCHEDULES = ("iterative", "offline")
# What scores the E-step's samples: the reward model r_{t-1}, or an LLM judge with the Self-Rewarding rubric
# (`mtjax.judge`): the current policy π_{t-1} ("judge_policy", Self-Rewarding), the fixed π0 ("judge_base"), or
# a fixed model of its own, `mt.judge_model` ("judge_model": a source as `policy.source` takes them).
POLICY_REWARDS = ("reward_model", "judge_policy", "judge_base", "judge_model")
# The E-step's pair per prompt: the paper's length-controlled rule (`data.select_length_controlled_pair`), or
# the highest- and lowest-reward responses ("best_worst", SPPO's and Self-Rewarding's rule).
POLICY_PAIRS = ("length_controlled", "best_worst")


@dataclasses.dataclass(frozen=True)
class MTConfig:
    """The EM loop's switches.

    rm_update: mutual | frozen (= iterative DPO) | self_only | contrastive_only | oracle | random | ser.
      `oracle` and `random` train r_t on exactly the pairs `mutual` would use (same counts), each oriented by
      the task's gold reward (gold ties dropped, counted) or by a seeded coin: the controls of a study.
      `ser` (Huang et al. 2024): r_{t-1} labels every pair of distinct samples of π_t on D_R with its own
      Bradley-Terry confidence, keeps those at or above `ser_threshold`, trains on them (continuing from the
      RM that labelled them) and repeats `ser_rounds` times.
    drop_truncated: leave responses that hit max_new_tokens out of pairs (always counted).
    contrastive_filter: drop contrastive pairs whose reward gap is below −std (the paper's revision).
    gate_win_rate τ (None = no gate): keep π_t only if r_t prefers its held-out responses to the kept
      policy's at a rate ≥ τ; otherwise the next iteration starts from the kept one.
    policy_prompts: own (D_t) | with_rm (D_t plus a 1/T share of D_R, for the RM-frozen baselines) |
      all_portions (D_1 .. D_T then D_R: T + 1 iterations, the paper's iterative DPO).
    schedule: iterative | offline (one DPO round from π0 on all training prompts, scored by r0).
    policy_rewards: reward_model | judge_policy | judge_base | judge_model (LLM-as-a-judge, see POLICY_REWARDS).
    judge_model: the judge's source with policy_rewards='judge_model' (smollm2, tiny, a local folder or a hub id,
      as `policy.source`); it runs with the policy section's dtype and execution settings.
    policy_pairs: length_controlled | best_worst (see POLICY_PAIRS).
    judge_samples: judgments sampled per response (their parsed scores are averaged; Self-Rewarding: 3).
    judge_max_new_tokens: the length of a judgment (the rubric asks for ≤ 100 words and a score), and of a
      meta-judgment.
    meta_judge: Meta-Rewarding (Wu et al. 2024): the judge also judges its own judgments (`mtjax.judge`), and
      the E-step's DPO trains on the judge pairs it prefers besides the response pairs. Needs
      policy_rewards='judge_policy' (the policy is actor, judge and meta-judge).
    ser_threshold, ser_rounds: SER's confidence threshold in [0.5, 1) and rounds per M-step.
    """

    rm_update: str = "mutual"
    drop_truncated: bool = False
    contrastive_filter: bool = False
    gate_win_rate: float | None = None
    policy_prompts: str = "own"
    schedule: str = "iterative"
    policy_rewards: str = "reward_model"
    policy_pairs: str = "length_controlled"
    judge_samples: int = 3
    judge_max_new_tokens: int = 192
    judge_model: str | None = None
    meta_judge: bool = False
    ser_threshold: float = 0.9
    ser_rounds: int = 2

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.rm_update in RM_UPDATES, f"rm_update={self.rm_update!r} must be one of {RM_UPDATES}")
        _check(p, self.policy_prompts in POLICY_PROMPTS,
               f"policy_prompts={self.policy_prompts!r} must be one of {POLICY_PROMPTS}")
        _check(p, self.schedule in SCHEDULES, f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        _check(p, self.policy_rewards in POLICY_REWARDS,
               f"policy_rewards={self.policy_rewards!r} must be one of {POLICY_REWARDS}")
        _check(p, self.policy_pairs in POLICY_PAIRS,
               f"policy_pairs={self.policy_pairs!r} must be one of {POLICY_PAIRS}")
        _check(p, self.gate_win_rate is None or 0.0 <= self.gate_win_rate <= 1.0,
               f"gate_win_rate={self.gate_win_rate} must be in [0, 1] (or unset: no gate)")
        _check(p, isinstance(self.judge_samples, int) and self.judge_samples >= 1,
               f"judge_samples={self.judge_samples!r} must be an int >= 1")
        _check(p, isinstance(self.judge_max_new_tokens, int) and self.judge_max_new_tokens >= 1,
               f"judge_max_new_tokens={self.judge_max_new_tokens!r} must be an int >= 1")
        _check(p, (self.policy_rewards == "judge_model") == bool(self.judge_model),
               f"judge_model={self.judge_model!r} goes with policy_rewards='judge_model' (now "
               f"{self.policy_rewards!r}): set both or neither")
        _check(p, isinstance(self.meta_judge, bool), f"meta_judge={self.meta_judge!r} must be True or False")
        _check(p, not self.meta_judge or self.policy_rewards == "judge_policy",
               "meta_judge=True needs the policy as its own judge: policy_rewards='judge_policy' (the judge pairs "
               f"train the judge), now {self.policy_rewards!r}")
        _check(p, isinstance(self.ser_threshold, (int, float)) and 0.5 <= self.ser_threshold < 1.0,
               f"ser_threshold={self.ser_threshold!r} must be in [0.5, 1)")
        _check(p, isinstance(self.ser_rounds, int) and self.ser_rounds >= 1,
               f"ser_rounds={self.ser_rounds!r} must be an int >= 1")
        _raise(type(self), p)

    @property
    def trains_rm(self) -> bool:
        return self.rm_update != "frozen" and self.schedule == "iterative"

    def iterations(self, num_iterations: int) -> range:
        """The iterations a run with `iterations = T` makes: 1 (offline), T + 1 (`policy_prompts="all_portions"`:
        D_R is the last portion) or T."""
        if self.schedule == "offline":
            return range(1, 2)
        return range(1, num_iterations + (2 if self.policy_prompts == "all_portions" else 1))

    @property
    def judges(self) -> bool:
        """Whether an LLM judge, not the reward model, scores the E-step's samples."""
        return self.policy_rewards != "reward_model"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Saves inside a phase, so a crash or Ctrl-C loses at most this much work: a training phase's state
    (params + optimizer) every `train_every_steps` steps and/or `train_every_seconds` seconds (0 = off);
    sampling passes in pieces of `sample_every_prompts` prompts. Changing them never blocks resuming a
    run directory."""

    train_every_steps: int = 0
    train_every_seconds: float = 600.0
    sample_every_prompts: int = 2048

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.train_every_steps >= 0, f"train_every_steps={self.train_every_steps} must be >= 0 (0 = off)")
        _check(p, math.isfinite(self.train_every_seconds) and self.train_every_seconds >= 0,
               f"train_every_seconds={self.train_every_seconds} must be >= 0 (0 = off)")
        _check(p, self.sample_every_prompts >= 1, f"sample_every_prompts={self.sample_every_prompts} must be >= 1")
        _raise(type(self), p)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh `(data, fsdp, tensor)`; one axis may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        p: list[str] = []
        _check(p, all(s == -1 or s >= 1 for s in sizes) and sizes.count(-1) <= 1,
               f"(data, fsdp, tensor)={sizes}: each must be >= 1, and at most one may be -1 (fill)")
        _raise(type(self), p)


# ----------------------------------------------------------------------------- sections


def _sections() -> dict[str, tuple[type, ...]]:
    """Config section -> the dataclasses whose fields it holds (imported lazily: jax-heavy modules)."""
    from mtjax.iteration_eval import EvalConfig
    from mtjax.models.config import ModelConfig
    from mtjax.prompt_sets import PromptConfig
    from mtjax.sampling import SamplingConfig
    from mtjax.sources import ModelSource
    from mtjax.synthetic import DemonstratorConfig, TaskConfig
    from mtjax.tasks import TaskChoice
    from mtjax.tracking import TrackingConfig
    from mtjax.train import DPOConfig, OptimizerConfig, RewardConfig, SFTConfig

    return {
        "policy": (ModelSource, ModelConfig),
        "reward_model": (ModelSource, ModelConfig),
        "task": (TaskChoice, TaskConfig),
        "prompts": (PromptConfig,),
        "sampling": (SamplingConfig,),
        "sft": (SFTPhase, DemonstratorConfig, SFTConfig, OptimizerConfig, TrainingRun),
        "dpo": (DPOConfig, OptimizerConfig, TrainingRun),
        "rm": (RewardConfig, OptimizerConfig, TrainingRun),
        "base_rm": (BaseRMPhase, RewardConfig, OptimizerConfig, TrainingRun),
        "mt": (MTConfig,),
        "eval": (EvalConfig,),
        "mesh": (MeshConfig,),
        "checkpoint": (CheckpointConfig,),
        "logging": (TrackingConfig,),
    }


def derived_fields(cls: type) -> tuple[str, ...]:
    """Fields a run computes rather than reads from the config."""
    return ("total_steps",) if cls.__name__ == "OptimizerConfig" else ()


def optional_fields(cls: type) -> bool:
    """Dataclasses whose every field is optional in a section: unset = the checkpoint's value."""
    return cls.__name__ == "ModelConfig"


def settings_of(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name not in derived_fields(cls)]


def _placeholder_type(annotation: Any) -> type:
    """The Python type ml_collections parses a command-line override into, from a field's annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _placeholder_type(args[0])
    if origin is not None:
        return origin  # tuple[int, ...] -> tuple
    return annotation


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def library_default(key: str) -> Any:
    """The default a run gets for the dotted setting `key` ("mt.ser_rounds") when its config does not name it,
    as JSON would store it; `dataclasses.MISSING` if the setting has none (or is not a setting). A run
    directory written before a setting existed ran with this value (`rundir.config_diff`)."""
    import json

    name, _, field = key.partition(".")
    for cls in _sections().get(name, ()):
        for f in settings_of(cls):
            if f.name == field and not optional_fields(cls):
                default = _default(f)
                return default if default is dataclasses.MISSING else json.loads(json.dumps(default))
    return dataclasses.MISSING


def section(*classes: type, **values: Any) -> ConfigDict:
    """A config section holding every setting of `classes`, at the dataclasses' defaults unless `values`
    says otherwise. A field with no default (or any field of an `optional_fields` dataclass) starts unset
    (a typed placeholder, so `--config.a.b=3` still parses as its type)."""
    fields: dict[str, Any] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in settings_of(cls):
            if f.name in fields:
                continue  # the same setting in two dataclasses (none today) is one key
            default = _default(f)
            if optional_fields(cls) or default is dataclasses.MISSING or default is None:
                fields[f.name] = config_dict.placeholder(_placeholder_type(hints[f.name]))
            else:
                fields[f.name] = default
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{unknown} are not settings of {[c.__name__ for c in classes]}; "
                         f"valid: {sorted(fields)}")
    out = ConfigDict(fields)
    for key, value in values.items():
        out[key] = value
    return out


def _as_mapping(values: ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    return values.to_dict() if isinstance(values, ConfigDict) else dict(values)


def _coerce(value: Any, annotation: Any) -> Any:
    """Lists from JSON or the command line become tuples where the field is a tuple."""
    if isinstance(value, list) and _placeholder_type(annotation) is tuple:
        return tuple(value)
    return value


def set_values(cls: type, values: ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `cls` that `values` sets (unset placeholders left out), as keyword arguments."""
    values = _as_mapping(values)
    hints = typing.get_type_hints(cls)
    return {f.name: _coerce(values[f.name], hints[f.name]) for f in settings_of(cls)
            if f.name in values and values[f.name] is not None}


def build(cls: type, values: ConfigDict | Mapping[str, Any], **fixed: Any) -> Any:
    """`cls` from the fields of a config section (other keys ignored), with `fixed` fields on top."""
    return cls(**{**set_values(cls, values), **fixed})


def unknown_keys(name: str, values: ConfigDict | Mapping[str, Any], classes: Iterable[type]) -> list[str]:
    valid = {f.name for cls in classes for f in settings_of(cls)}
    return [f"{name}.{key} is not a setting; {name} holds {', '.join(sorted(valid))}"
            for key in sorted(set(_as_mapping(values)) - valid)]


# ----------------------------------------------------------------------------- validation


# The sections that train a model (their batch sizes are checked against the mesh at start-up).
TRAINING_SECTIONS = ("sft", "base_rm", "dpo", "rm")


def used_sections(cfg: ConfigDict) -> list[str]:
    """The sections a run reads: `sft` and `base_rm` only when enabled, `rm` only when the loop retrains the RM."""
    names = ["policy", "reward_model", "task", "prompts", "sampling", "dpo", "mt", "eval", "mesh", "checkpoint",
             "logging"]
    if cfg.sft.get("enabled", False):
        names.append("sft")
    if cfg.base_rm.get("enabled", True):
        names.append("base_rm")
    if cfg.mt.get("rm_update") != "frozen" and cfg.mt.get("schedule") == "iterative":
        names.append("rm")
    return names


def _build_checked(name: str, cls: type, values: Any, problems: list[str], **fixed: Any) -> Any:
    try:
        return build(cls, values, **fixed)
    except (ValueError, TypeError) as e:  # the dataclass names its field as `Class.field`: say `section.field`
        problems += [p.strip().replace(f"{cls.__name__}.", f"{name}.") for p in str(e).split("; ")]
        return None


def validate_config(cfg: ConfigDict) -> None:
    """Every impossible value of the sections the run uses, in one error, before any compute.

    Model-dependent checks (the checkpoint's context length against the prompt cap and the response
    budget) need the model's config and run at start-up, in `mtjax.sources`."""
    from mtjax.arms import ARMS
    from mtjax.models.config import ModelConfig

    problems: list[str] = []
    if cfg.get("arm", "mutual") not in ARMS:
        problems.append(f"arm={cfg.get('arm')!r} must be one of {', '.join(ARMS)} (`configs/mt.py:PRESET,ARM`)")
    if not isinstance(cfg.get("iterations"), int) or cfg.iterations < 1:
        problems.append(f"iterations={cfg.get('iterations')} must be an int >= 1")
    sections = _sections()
    built: dict[str, dict[str, Any]] = {}
    for name in used_sections(cfg):
        values = cfg[name]
        problems += unknown_keys(name, values, sections[name])
        built[name] = {}
        for cls in sections[name]:
            if cls is ModelConfig:
                problems += [p.replace("ModelConfig.", f"{name}.") if "ModelConfig." in p else f"{name}.{p}"
                             for p in check_model_overrides(set_values(ModelConfig, values))]
                continue
            fixed = {"total_steps": 1} if derived_fields(cls) else {}
            built[name][cls.__name__] = _build_checked(name, cls, values, problems, **fixed)
    sampling = built["sampling"].get("SamplingConfig")
    prompts = built["prompts"].get("PromptConfig")
    if sampling is not None and sampling.num_samples < 2:
        problems.append(f"sampling.num_samples={sampling.num_samples} must be >= 2 to form pairs")
    if prompts is not None and isinstance(cfg.get("iterations"), int) and len(prompts.policy) != cfg.iterations:
        problems.append(f"prompts.policy has {len(prompts.policy)} sizes but iterations={cfg.iterations}")
    for name in ("sft", "dpo", "rm", "base_rm"):
        run = built.get(name, {}).get("TrainingRun")
        if run is not None and prompts is not None and run.max_length <= prompts.max_prompt_tokens:
            problems.append(f"{name}.max_length={run.max_length} must exceed prompts.max_prompt_tokens="
                            f"{prompts.max_prompt_tokens} (a prompt that long leaves no room for its response)")
    mt, ev = built["mt"].get("MTConfig"), built["eval"].get("EvalConfig")
    if mt is not None and ev is not None and mt.gate_win_rate is not None and "testbed" not in ev.benchmarks:
        problems.append("mt.gate_win_rate needs 'testbed' in eval.benchmarks (the gate compares the policies' "
                        "held-out testbed responses)")
    dpo = built.get("dpo", {}).get("DPOConfig")
    if mt is not None and dpo is not None and mt.meta_judge and dpo.loss_type == "sppo":
        problems.append("mt.meta_judge=True with dpo.loss_type='sppo': the meta-judge's judge pairs carry no win "
                        "probabilities (use a pairwise loss: dpo, ipo, hinge, simpo)")
    if "base_rm" in built and prompts is not None and prompts.base_rm_labels < 1:
        problems.append(f"prompts.base_rm_labels={prompts.base_rm_labels} must be >= 1 when base_rm.enabled "
                        "(r0 is trained on them)")
    problems += _task_problems(built, prompts, ev)
    if problems:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))


def _task_problems(built: Mapping[str, dict[str, Any]], prompts: Any, ev: Any) -> list[str]:
    """What the task and the sft phase need from the other sections."""
    choice = built["task"].get("TaskChoice")
    if choice is None:
        return []
    problems = []
    synthetic = choice.name == "synthetic"
    if "sft" in built:
        if not synthetic:
            problems.append(f"sft.enabled needs a task with demonstrations (task.name='synthetic'), not "
                            f"{choice.name!r}")
        if prompts is not None and prompts.sft < 1:
            problems.append(f"prompts.sft={prompts.sft} must be >= 1 when sft.enabled (π0 is trained on its "
                            "demonstrations)")
    if synthetic and prompts is not None and prompts.source != "testbed":
        problems.append(f"prompts.source={prompts.source!r}: the synthetic task draws every split itself (leave "
                        "prompts.source='testbed', the generated prompts)")
    mt = built["mt"].get("MTConfig")
    if synthetic and mt is not None and mt.judges:
        problems.append(f"mt.policy_rewards={mt.policy_rewards!r}: an LLM judge reads the English rubric, which the "
                        "synthetic task's 27-word tokenizer cannot encode (use a reward model)")
    if synthetic and ev is not None and set(ev.benchmarks) != {"testbed"}:
        problems.append(f"eval.benchmarks={ev.benchmarks!r}: the synthetic task is evaluated on its own held-out "
                        "split only (('testbed',)); the paper's benchmarks are English")
    return problems


def check_model_overrides(values: Mapping[str, Any]) -> list[str]:
    """The model settings a section sets, checked without the checkpoint (a whole `ModelConfig` needs its
    architecture): execution settings by the config's own validation, sizes as positive numbers."""
    from mtjax.models.config import ModelConfig

    problems = []
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
             "head_dim", "max_position_embeddings")
    for key in sizes:
        if key in values and (not isinstance(values[key], int) or values[key] < 1):
            problems.append(f"{key}={values[key]!r} must be a positive int")
    execution = {k: v for k, v in values.items() if k not in sizes}
    try:  # a minimal valid architecture carries the other settings through the config's own checks
        ModelConfig(**{"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_layers": 1, "num_heads": 1,
                       "num_kv_heads": 1, "head_dim": 8, **execution})
    except (ValueError, TypeError) as e:
        problems.append(str(e))
    return problems
