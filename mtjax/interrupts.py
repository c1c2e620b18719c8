"""Stopping a run on request: Ctrl-C (SIGINT), SIGTERM (what SLURM and preemptible clouds send) and, in
multi-process runs, a preemption notice on any host all end the run the same way: the training phase in
flight saves its train state (`mtjax.train_checkpoint`), then the run stops with one line and a rerun
resumes.

    handle_signals()       SIGINT and SIGTERM raise `Interrupted` in the main thread, at any moment: an
                           interrupt Python would drop (one that lands inside a garbage-collection callback,
                           which jax registers, is printed as "Exception ignored in ..." and lost) is
                           delivered again
    preemption_reached()   multi-process: whether all processes have reached the preemption sync point;
                           jax's coordination service picks one step for all of them after any host got
                           SIGTERM (jax's preemption notifier owns SIGTERM in multi-process runs)
    stop_if_preempted()    raises `Interrupted` there, on every process at once
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
from collections.abc import Iterator

# Seconds before an interrupt that Python dropped is delivered again (the garbage-collection callback it
# landed in has returned by then).
_REDELIVERY_DELAY_S = 0.05


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop (`signal_name`: SIGINT, SIGTERM or "preemption"). `saved` says what the
    interrupted phase saved on its way out, if anything; `announced`: the save was announced on a line
    that the stop message completes (see `announce_save`)."""

    def __init__(self, signal_name: str = "SIGINT", saved: str | None = None, announced: bool = False):
        super().__init__(signal_name)
        self.signal_name, self.saved, self.announced = signal_name, saved, announced

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + int(signal.SIGINT if self.signal_name == "SIGINT" else signal.SIGTERM)


def signal_name(error: KeyboardInterrupt) -> str:
    return error.signal_name if isinstance(error, Interrupted) else "SIGINT"  # a plain KeyboardInterrupt: Ctrl-C


def announce_save(error: KeyboardInterrupt, what: str) -> None:
    """Starts the stop line before a save that may take a while; `stop_message` ends it."""
    print(f"mtjax: stopping ({signal_name(error)}): saving {what} (Ctrl-C again abandons it) ...", end="",
          file=sys.stderr, flush=True)


def stop_message(error: KeyboardInterrupt, workdir: str) -> str:
    """The one line a stopped run ends with (the end of the line `announce_save` began, if it did)."""
    keep = f"Finished phases are kept in {workdir}: rerun the same command to resume."
    if isinstance(error, Interrupted) and error.announced:
        return f" saved. {keep}"
    saved = f"; {error.saved} is saved" if isinstance(error, Interrupted) and error.saved else ""
    return f"mtjax: stopped ({signal_name(error)}){saved}. {keep}"


def _raise_interrupted(signum: int, frame) -> None:
    del frame
    raise Interrupted(signal.Signals(signum).name)


def _redeliver_dropped_interrupts(previous_hook):
    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            name = getattr(unraisable.exc_value, "signal_name", "SIGINT")
            signum = signal.SIGTERM if name == "SIGTERM" else signal.SIGINT
            timer = threading.Timer(_REDELIVERY_DELAY_S, os.kill, (os.getpid(), signum))
            timer.daemon = True
            timer.start()
            return
        previous_hook(unraisable)
    return hook


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` while inside (main thread only). In a multi-process run jax's
    preemption notifier takes SIGTERM over when jax.distributed initialises: SIGTERM on any host then
    leads to a coordinated stop at `stop_if_preempted`."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_hook = sys.unraisablehook
    for s in previous:
        signal.signal(s, _raise_interrupted)
    sys.unraisablehook = _redeliver_dropped_interrupts(previous_hook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for s, handler in previous.items():
            signal.signal(s, handler)


# Every process calls the sync point at the same places in the same order (training steps, sampling
# pieces, phase starts), so one call counter numbers the calls identically on every host.
_sync_calls = itertools.count(1)


def preemption_reached() -> bool:
    import jax

    if jax.process_count() == 1:
        return False  # a single process gets SIGTERM as `Interrupted` straight away
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(next(_sync_calls)))
    except RuntimeError:  # jax_enable_preemption_service is off
        return False


def stop_if_preempted() -> None:
    if preemption_reached():
        raise Interrupted("preemption")
