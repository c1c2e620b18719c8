"""Multi-host runs on JAX's multi-controller runtime: every host runs the same command.

    initialize(...)      joins the run (explicit coordinator/process flags, JAX_* variables, or the
                         cluster auto-detection jax provides for SLURM, TPU pods, Open MPI, Kubernetes)
    is_primary()         process 0: the only one that writes shared files and prints
    barrier(name)        all processes wait here (a no-op in a single-process run)
    fail_fast()          an exception on one host ends that host at once, so the others fail in their
                         next collective or on the missed heartbeat instead of waiting forever

Every process computes the same host-side values (prompts, pairs, shuffles come from seeds), places
only its own shards on its devices, and reads back replicated results. The run directory must be on
storage all hosts see (NFS, Lustre, a GCS/S3 mount): process 0 writes, the others read after a barrier,
and Orbax writes each process's shards of a checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import sys
import traceback
from collections.abc import Iterator

import jax

# Seconds without a heartbeat after which the coordinator declares a process dead and ends the others.
HEARTBEAT_TIMEOUT_S = 60


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
    """Joins a multi-process run; returns whether one was joined. Call before anything touches devices.

    With `num_processes > 1` the three arguments name the run explicitly; with `auto` jax reads them from
    the environment (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or SLURM, TPU pod,
    Open MPI and Kubernetes variables). Otherwise this is a single-process run and nothing happens.
    """
    explicit = num_processes is not None and num_processes > 1
    if not explicit and not auto:
        if coordinator_address or process_id:
            raise ValueError("a multi-process run needs num_processes > 1 together with the coordinator address "
                             f"and process id (got num_processes={num_processes})")
        return False
    if explicit and (coordinator_address is None or process_id is None):
        raise ValueError(f"num_processes={num_processes} needs coordinator_address (host:port of process 0) "
                         "and process_id (0 .. num_processes-1)")
    if explicit and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in 0 .. {num_processes - 1}")
    # CPU devices talk over gloo (the default CPU backend has no cross-process collectives); GPUs and
    # TPUs ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        kwargs["heartbeat_timeout_seconds"] = HEARTBEAT_TIMEOUT_S
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)
    return True


def is_primary() -> bool:
    return jax.process_index() == 0


def primary_print(*args, **kwargs) -> None:
    """`print` on process 0 only: the other processes of a multi-host run say nothing (their lines would
    repeat process 0's)."""
    if is_primary():
        print(*args, **{"flush": True, **kwargs})


def barrier(name: str) -> None:
    """Blocks until every process reaches the barrier of the same name."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """In a multi-process run, an exception (or Ctrl-C) prints its traceback with the process id and exits
    the process immediately, skipping jax's shutdown barrier (which would wait for the other processes
    while they wait for this one). The others then fail: at once when their collectives lose the peer, at
    the latest after `HEARTBEAT_TIMEOUT_S`. Single-process runs raise as usual.

    Ctrl-C (SIGINT) in a multi-process run exits from the signal handler itself: a KeyboardInterrupt
    raised while Python runs a garbage-collection callback (jax registers one) is printed and dropped,
    which would leave this host running and the Ctrl-C lost."""
    previous = signal.getsignal(signal.SIGINT)
    if jax.process_count() > 1:
        signal.signal(signal.SIGINT, lambda signum, frame: _exit_failed("interrupted (SIGINT)", with_traceback=False))
    try:
        yield
    except BaseException as e:
        if jax.process_count() == 1 or (isinstance(e, SystemExit) and not e.code):
            raise
        if isinstance(e, SystemExit):  # a stop with its one-line message already printed (or as its code)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            _exit_failed("stopped", with_traceback=False, code=e.code if isinstance(e.code, int) else 1)
        _exit_failed("failed", with_traceback=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_failed(what: str, with_traceback: bool, code: int = 1) -> None:
    print(f"mtjax: process {jax.process_index()} of {jax.process_count()} {what}; ending the run", file=sys.stderr)
    if with_traceback:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
