"""The run directory's layout, in one place: phase names, the path of every artifact a phase writes, the
summary keys that are built here and read back elsewhere, and the names random seeds are drawn from.

Everything that names a file or folder of a run directory (the driver `mtjax.em`, the evaluations, the
report, the export, `scripts/replicate.py`) asks this module; renaming an artifact or adding a phase is an
edit here. Seeds do NOT follow the paths: each is drawn from a frozen seed name (`seed_name`), so renaming a
file changes no sample, and run directories written before this module existed resume bitwise.

    RUN/phases.json, config.json, metrics.jsonl        the run's record (`mtjax.rundir`)
    RUN/.lock                                           held while a run works on it (`mtjax.runlock`)
    RUN/prompts/                                        the prompt splits (`mtjax.testbed.prompts`)
    RUN/benchmarks/NAME.jsonl                           what the benchmarks judge against
    RUN/sft/{demonstrations.jsonl, policy/}             π0 trained on demonstrations (optional)
    RUN/base_rm/{samples.jsonl, pairs.jsonl, reward_model/}
    RUN/iter_t/e_step/{samples, judgments, meta_judgments, pairs, judge_pairs}.jsonl, RUN/iter_t/policy/
    RUN/iter_t/m_step/{new,old}_policy_samples.jsonl, {self,contrastive}_pairs.jsonl, round_R_pairs.jsonl,
                      round_R/reward_model/ (SER), RUN/iter_t/reward_model/
    RUN/iter_t/eval/{samples, NAME_answers}.jsonl, results.json; RUN/eval/iter_t.json, eval/iter_t/...
    RUN/PHASE/train_state/ (or round_R/train_state/)    mid-phase train state, removed when the phase ends
    RUN/reference_cache/, summary.json, report/, tensorboard/, wandb_run.json
"""

from __future__ import annotations

import dataclasses
import re
import zlib

# ----------------------------------------------------------------------------- phases

PROMPTS, SFT, BASE_RM = "prompts", "sft", "base_rm"
BASE_PHASES = (PROMPTS, SFT, BASE_RM)  # every later phase reads them, in this order
E_STEP, M_STEP, EVAL, GATE = "e_step", "m_step", "eval", "gate"
STEPS = (E_STEP, M_STEP, EVAL, GATE)  # an iteration's phases, in order
_ITERATION = "iter_"


def iteration_folder(t: int | str) -> str:
    """`iter_t`: the folder of iteration t's phases and models (`t` may be a glob pattern)."""
    return f"{_ITERATION}{t}"


def iteration_phase(t: int | str, step: str) -> str:
    """`iter_t/STEP`, the name of one of iteration t's phases (`STEPS`)."""
    return f"{iteration_folder(t)}/{step}"


def e_step(t: int | str) -> str:
    return iteration_phase(t, E_STEP)


def m_step(t: int | str) -> str:
    return iteration_phase(t, M_STEP)


def eval_phase(t: int | str) -> str:
    return iteration_phase(t, EVAL)


def gate(t: int | str) -> str:
    return iteration_phase(t, GATE)


def iteration_and_kind(phase: str) -> tuple[int, str]:
    """"iter_2/e_step" -> (2, "e_step"); "base_rm" -> (-1, "base_rm")."""
    if not phase.startswith(_ITERATION):
        return -1, phase
    iteration, kind = phase.split("/", 1)
    return int(iteration.removeprefix(_ITERATION)), kind


def iteration_of(phase: str) -> int:
    """The iteration a phase belongs to for metrics rows: t for `iter_t/...`, 0 for the base phases."""
    return max(iteration_and_kind(phase)[0], 0)


# ----------------------------------------------------------------------------- run-level files

PHASES_FILE, CONFIG_FILE, METRICS_FILE = "phases.json", "config.json", "metrics.jsonl"
LOCK_FILE = ".lock"
SUMMARY_FILE = "summary.json"  # written last: a run directory with it has finished
REFERENCE_CACHE = "reference_cache"  # DPO's precomputed reference log-probs (`train.ReferenceLogprobCache`)
REPORT_FOLDER = "report"  # `mtjax.report.write_report`'s default output
TENSORBOARD_FOLDER, WANDB_RUN_FILE = "tensorboard", "wandb_run.json"  # `mtjax.tracking`'s sinks
PROMPTS_FOLDER = PROMPTS  # the prompt splits: NAME.jsonl per split and manifest.json (`testbed.prompts`)
EVAL_FOLDER = "eval"  # eval/iter_t.json: the report's nested metrics per iteration
_BENCHMARKS_FOLDER = "benchmarks"
_TRAIN_STATE = "train_state"
_POLICY, _REWARD_MODEL = "policy", "reward_model"


def benchmark_records(name: str) -> str:
    """The rows a benchmark judges against (references, question ids, pairs), recorded by `prompts`."""
    return f"{_BENCHMARKS_FOLDER}/{name}.jsonl"


# ----------------------------------------------------------------------------- phase artifacts


@dataclasses.dataclass(frozen=True)
class SamplePass:
    """One sampling pass of a phase: stored as `PHASE/FILE.jsonl` (`PHASE/FILE.partial.jsonl` while it runs),
    its draws from the seed named by `seed_purpose` (frozen: see `seed_name`)."""

    file: str
    seed_purpose: str


SAMPLES = SamplePass("samples", "samples.jsonl")  # e_step (π_{t-1}), base_rm (π0), eval (π_t, held out)
NEW_POLICY_SAMPLES = SamplePass("new_policy_samples", "new_policy_samples.jsonl")  # m_step: π_t on D_R
OLD_POLICY_SAMPLES = SamplePass("old_policy_samples", "old_policy_samples.jsonl")  # m_step: π_{t-1} on D_R


def benchmark_answers(benchmark: str) -> SamplePass:
    """π_t's answers to a generation benchmark's prompts (eval phase)."""
    return SamplePass(f"{benchmark}_answers", f"{benchmark}_answers.jsonl")


def sample_pass(file: str) -> SamplePass:
    """The declared pass stored as `PHASE/FILE.jsonl`."""
    passes = {p.file: p for p in (SAMPLES, NEW_POLICY_SAMPLES, OLD_POLICY_SAMPLES)}
    if file in passes:
        return passes[file]
    if file.endswith("_answers"):
        return benchmark_answers(file.removesuffix("_answers"))
    raise ValueError(f"no sampling pass is stored as {file!r}; expected one of {sorted(passes)} or NAME_answers")


def samples_file(phase: str, sample_pass: SamplePass) -> str:
    return f"{phase}/{sample_pass.file}.jsonl"


def partial_samples_file(phase: str, sample_pass: SamplePass) -> str:
    """The finished pieces of a pass in flight (removed once the pass is stored whole)."""
    return f"{phase}/{sample_pass.file}.partial.jsonl"


def judgments_file(phase: str) -> str:
    """The LLM judge's verdicts on the phase's samples (`mt.policy_rewards` = judge...)."""
    return f"{phase}/judgments.jsonl"


def meta_judgments_file(phase: str) -> str:
    """The meta-judge's verdicts on pairs of the phase's judgments (`mt.meta_judge`, Meta-Rewarding)."""
    return f"{phase}/meta_judgments.jsonl"


def demonstrations_file() -> str:
    return f"{SFT}/demonstrations.jsonl"


# The kinds of pairs a phase stores (each file's rows carry their kind too).
POLICY_PAIRS, GOLD_PAIRS = "policy", "gold"  # e_step's, base_rm's
JUDGE_PAIRS = "judge"  # e_step's with `mt.meta_judge`: the meta-judge's preferred judgments
SELF_PAIRS, CONTRASTIVE_PAIRS = "self", "contrastive"  # m_step's
_PAIRS = "pairs"


def pairs_file(phase: str, kind: str | None = None) -> str:
    """`PHASE/pairs.jsonl` (the phase's one pair set) or `PHASE/KIND_pairs.jsonl` (m_step's several)."""
    return f"{phase}/{_PAIRS}.jsonl" if kind is None else f"{phase}/{kind}_{_PAIRS}.jsonl"


def ser_round_kind(r: int | str) -> str:
    """The pairs kind of SER round r (its file `m_step/round_R_pairs.jsonl`, its summary keys `ser_round_R_*`)."""
    return f"ser_round_{r}"


def ser_round_pairs_file(phase: str, r: int | str) -> str:
    return f"{phase}/round_{r}_{_PAIRS}.jsonl"


def ser_round_folder(phase: str, r: int | str) -> str:
    """SER round r's own folder: its reward model and train state."""
    return f"{phase}/round_{r}"


def ser_round_reward_model(phase: str, r: int | str) -> str:
    return f"{ser_round_folder(phase, r)}/{_REWARD_MODEL}"


def train_state_folder(phase: str, ser_round: int | str | None = None) -> str:
    """A training phase's mid-phase train-state saves (`mtjax.train_checkpoint`), relative to the run."""
    return f"{phase if ser_round is None else ser_round_folder(phase, ser_round)}/{_TRAIN_STATE}"


def policy_checkpoint(t: int | str) -> str:
    """π_t (Orbax); π0 is the policy source's weights, or `SFT_POLICY`."""
    return f"{iteration_folder(t)}/{_POLICY}"


def reward_model_checkpoint(t: int | str) -> str:
    """r_t (Orbax); r0 is `BASE_RM_MODEL`, or the reward model source's weights."""
    return f"{iteration_folder(t)}/{_REWARD_MODEL}"


SFT_POLICY = f"{SFT}/{_POLICY}"
BASE_RM_MODEL = f"{BASE_RM}/{_REWARD_MODEL}"


def eval_results(t: int | str) -> str:
    """The eval phase's flat results (`iter_t/eval/results.json`)."""
    return f"{eval_phase(t)}/results.json"


def eval_metrics(t: int | str) -> str:
    """The report's nested metrics of iteration t (`eval/iter_t.json`)."""
    return f"{EVAL_FOLDER}/{iteration_folder(t)}.json"


def benchmark_output(t: int | str, file: str) -> str:
    """A file for a benchmark's official judge (`eval/iter_t/FILE`)."""
    return f"{EVAL_FOLDER}/{iteration_folder(t)}/{file}"


ALPACA_EVAL_OUTPUTS, ARENA_HARD_ANSWERS, REWARDBENCH_RESULT = (
    "alpaca_eval_outputs.json", "arena_hard_answers.jsonl", "rewardbench.json")

# The phases a run can take from another run instead of computing them, with their files: the prompts, π0,
# r0 and the base policy's evaluation (`em.share_phases`). Arms of one study share all of them.
SHARED_PHASES: dict[str, tuple[str, ...]] = {
    PROMPTS: (PROMPTS_FOLDER,), SFT: (SFT,), BASE_RM: (BASE_RM,), eval_phase(0): (eval_phase(0), eval_metrics(0))}

# Files `scripts/replicate.py` adds to each arm's run directory.
REPLICATE_SECONDS_FILE = "replicate_seconds.json"  # what running the arm took (summed over resumes)
_ALPACA_EVAL_FOLDER = "alpaca_eval"


def replicate_alpaca_eval(t: int | str) -> str:
    """replicate.py's AlpacaEval of π_t judged by r0."""
    return f"{_ALPACA_EVAL_FOLDER}/{iteration_folder(t)}.json"


REPLICATE_REFERENCE_SCORES = f"{_ALPACA_EVAL_FOLDER}/reference_scores.json"


def study_run(seed: int | str, arm: str) -> str:
    """The run directory of one arm and seed inside a `scripts/replicate.py` study (`WORKDIR/seed_S/ARM`)."""
    return f"seed_{seed}/{arm}"


# ----------------------------------------------------------------------------- summary keys

# Pair counts in a phase's summary (`PairSet.counts`): m_step prefixes each with its pairs' kind.
PAIRS_BUILT, PAIRS_TRAINED, SKIPPED_PREFIX = "pairs", "trained_pairs", "skipped_"
SER_CANDIDATE_PAIRS = "ser_candidate_pairs"  # SER: every pair of distinct pairable samples


def kind_count(kind: str, count: str) -> str:
    """A per-kind count in the m_step summary: `kind_count("self", "pairs")` = `self_pairs`."""
    return f"{kind}_{count}"


def prompts_count(split: str) -> str:
    """The size of a prompt split in the `prompts` summary."""
    return f"prompts_{split}"


# Groups of the evaluation's metrics (`eval/iter_t.json`, metrics.jsonl): `GROUP/NAME` in the report.
POLICY_METRICS, RM_METRICS, PAIR_METRICS = "policy", "rm", "pairs"
# The pair counts each evaluation reports under PAIR_METRICS (from the summaries of its iteration's phases).
(PAIR_BASE_RM_GOLD, PAIR_BASE_RM_TRAINED, PAIR_POLICY, PAIR_POLICY_TRAINED, PAIR_POLICY_SKIPPED,
 PAIR_RM_CONTRASTIVE, PAIR_RM_SELF_TRAINING, PAIR_RM_TRAINED, PAIR_RM_SELF_LABELLED) = (
    "base_rm_gold", "base_rm_trained", "policy", "policy_trained", "policy_skipped", "rm_contrastive",
    "rm_self_training", "rm_trained", "rm_self_labelled")


def metric_name(group: str, name: str) -> str:
    """The report's flattened name of a metric: `metric_name("pairs", "policy")` = `pairs/policy`."""
    return f"{group}/{name}"


# ----------------------------------------------------------------------------- seeds

# The names random draws are seeded from. They are frozen strings, deliberately NOT built from the path
# constants above: the first runs hashed artifact paths, and these names keep those exact strings (every
# derived seed is bit-identical to theirs), while renaming a file, a folder or a phase leaves them alone.
_SEED_PHASE = {PROMPTS: "prompts", SFT: "sft", BASE_RM: "base_rm",
               E_STEP: "e_step", M_STEP: "m_step", EVAL: "eval", GATE: "gate"}
BASE_RM_LABELS_SEED = "labels"  # which untied pairs get a gold label (`base_rm.pairs_per_prompt`)
RANDOM_LABELS_SEED = "random_labels"  # the `random` M-step control's coin
JUDGE_SEED = "judgments.jsonl"  # the LLM judge's sampling
META_JUDGE_SEED = "meta_judgments"  # the meta-judge's sampling (Meta-Rewarding)


def ser_round_seed(r: int) -> str:
    """SER round r's training shuffle."""
    return f"round_{r}"


def seed_name(phase: str, purpose: str | None = None) -> str:
    """The frozen name of a phase's draw: the phase's identity (`iter_t/e_step`), then the purpose (a
    `SamplePass.seed_purpose`, `*_SEED`); without one, the phase's training shuffle."""
    t, kind = iteration_and_kind(phase)
    identity = _SEED_PHASE[kind] if t < 0 else f"iter_{t}/{_SEED_PHASE[kind]}"
    return identity if purpose is None else f"{identity}/{purpose}"


def derive_seed(run_seed: int, name: str) -> int:
    """The seed of the draw named `name` (`seed_name`) in a run seeded with `run_seed`, in [0, 2**31)."""
    return (run_seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


# ----------------------------------------------------------------------------- what a run may hold

# Folders whose contents belong to someone else (Orbax checkpoints, the prompt splits, TensorBoard, the
# report, the reference cache): a run directory holds them whole. Patterns: `*` stands for one path part.
_PHASE_PATTERNS = (*BASE_PHASES, *(iteration_phase("*", step) for step in STEPS))
_ANY_PASS = SamplePass("*", "")
_FOLDERS = (PROMPTS_FOLDER, REFERENCE_CACHE, REPORT_FOLDER, TENSORBOARD_FOLDER, SFT_POLICY, BASE_RM_MODEL,
            policy_checkpoint("*"), reward_model_checkpoint("*"), ser_round_reward_model(m_step("*"), "*"),
            *(train_state_folder(p) for p in _PHASE_PATTERNS), train_state_folder(m_step("*"), "*"))
_FILES = (PHASES_FILE, CONFIG_FILE, METRICS_FILE, LOCK_FILE, SUMMARY_FILE, WANDB_RUN_FILE, benchmark_records("*"),
          demonstrations_file(), judgments_file(e_step("*")), meta_judgments_file(e_step("*")),
          pairs_file(e_step("*"), JUDGE_PAIRS), pairs_file(m_step("*"), "*"),
          ser_round_pairs_file(m_step("*"), "*"), eval_results("*"), eval_metrics("*"), benchmark_output("*", "*"),
          REPLICATE_SECONDS_FILE, replicate_alpaca_eval("*"), REPLICATE_REFERENCE_SCORES,
          *(f(p, _ANY_PASS) for p in _PHASE_PATTERNS for f in (samples_file, partial_samples_file)),
          *(pairs_file(p) for p in _PHASE_PATTERNS))


def _pattern(glob: str) -> re.Pattern:
    return re.compile(re.escape(glob).replace(r"\*", "[^/]+"))


_FOLDER_RES, _FILE_RES = [_pattern(f) for f in _FOLDERS], [_pattern(f) for f in _FILES]


def declared(relpath: str) -> bool:
    """Whether a path relative to the run directory is declared here: one of its files, or inside one of
    the folders whose contents belong to their writer (a checkpoint, the prompt splits, ...)."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return (any(r.fullmatch(p) for r in _FOLDER_RES for p in prefixes)
            or any(r.fullmatch(relpath) for r in _FILE_RES))
