"""Signals: SIGINT and SIGTERM raise `Interrupted`, including an interrupt Python would drop inside a
garbage-collection callback; the stop message is one line."""

import gc
import os
import signal
import time

import pytest

from mtjax.interrupts import Interrupted, handle_signals, stop_message


def _wait_for_interrupt(seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


def test_sigterm_stops_like_ctrl_c():
    with handle_signals(), pytest.raises(Interrupted) as caught:
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for_interrupt()
    assert caught.value.signal_name == "SIGTERM" and caught.value.exit_code == 143
    assert isinstance(caught.value, KeyboardInterrupt)  # every Ctrl-C path handles it
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored on the way out


def test_an_interrupt_dropped_in_a_gc_callback_is_delivered_again():
    """jax registers a gc callback; a Ctrl-C that lands in one is printed as 'Exception ignored' and lost,
    and the run went on. The callback here raises the signal itself, so the interrupt lands inside it."""
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGINT)
            for _ in range(1000):  # bytecodes: the handler runs here, inside the callback
                pass

    gc.callbacks.append(callback)
    try:
        with handle_signals(), pytest.raises(Interrupted) as caught:
            gc.collect()
            assert fired  # the callback ran and swallowed the first delivery
            _wait_for_interrupt()
    finally:
        gc.callbacks.remove(callback)
    assert caught.value.signal_name == "SIGINT"


def test_the_stop_message_is_one_line():
    plain = stop_message(KeyboardInterrupt(), "runs/x")
    assert plain == ("mtjax: stopped (SIGINT). Finished phases are kept in runs/x: rerun the same command to "
                     "resume.")
    saved = stop_message(Interrupted("SIGTERM", saved="the train state at step 3 in D"), "runs/x")
    assert saved.startswith("mtjax: stopped (SIGTERM); the train state at step 3 in D is saved. ")
    # After `announce_save` began the line ("mtjax: stopping (SIGINT): saving ... ..."), the message ends it.
    assert stop_message(Interrupted("SIGINT", saved="x", announced=True), "runs/x").startswith(" saved. ")
    assert all("\n" not in m for m in (plain, saved))
