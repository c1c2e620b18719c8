"""Out-of-memory errors that say what to change: the work in flight records its batch shape and the settings
that size it (`working_on`), and a device OOM inside a phase becomes one `OutOfDeviceMemory` message naming the
phase, that shape and those settings, instead of XLA's traceback. The settings named are operational
(`OPERATIONAL_KEYS`): changing them never blocks resuming the run directory, so the phase resumes after the
change."""

from __future__ import annotations

import dataclasses

# Settings that change how work is batched or executed, not what is computed (results agree up to float
# rounding): a run directory may be resumed with other values.
OPERATIONAL_KEYS = (
    "sampling.batch_size", "sampling.max_batch_tokens",
    "dpo.num_micro_batches", "rm.num_micro_batches", "base_rm.num_micro_batches",
    "dpo.logits_chunk", "policy.remat", "reward_model.remat", "policy.attention_impl", "reward_model.attention_impl",
)


@dataclasses.dataclass(frozen=True)
class Work:
    what: str  # e.g. "sampling", "reward scoring", "DPO step"
    shape: tuple[int, ...]  # the batch's (rows, tokens) as dispatched
    settings: tuple[str, ...]  # the settings that size it


_current: Work | None = None


def working_on(what: str, shape: tuple[int, ...], settings: tuple[str, ...]) -> None:
    """Records the batch about to be dispatched (host-side bookkeeping: no device sync)."""
    global _current
    _current = Work(what, tuple(int(x) for x in shape), settings)


class OutOfDeviceMemory(RuntimeError):
    pass


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def explain(phase: str, error: BaseException) -> OutOfDeviceMemory:
    """One message for a device OOM inside `phase`."""
    detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    if _current is None:
        return OutOfDeviceMemory(f"out of device memory in phase {phase} ({detail}); lower sampling.max_batch_tokens "
                                 "or the training sections' num_micro_batches, or turn on policy.remat, then rerun: "
                                 "the phase resumes")
    work = _current
    shape = " x ".join(map(str, work.shape))
    return OutOfDeviceMemory(
        f"out of device memory in phase {phase}, {work.what} of a [{shape}] batch ({detail}); lower "
        f"{' or '.join(work.settings)} and rerun the same command: the phase resumes")
