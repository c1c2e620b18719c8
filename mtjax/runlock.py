"""One run per run directory: `python -m mtjax.run` holds an exclusive lock on `RUN/.lock` for as long as it
runs (process 0 of a multi-process run holds it for all of them).

The lock is an advisory `flock`: the kernel (or the NFS server) releases it when its process ends, however
it ends, so a lock left by a dead process is simply taken over. The file names its holder (host, pid,
start time) for the message a second run gets; a holder that exits normally empties it, so a non-empty
file found unlocked was left by a process that died, and the takeover says so.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from mtjax.layout import LOCK_FILE


class RunDirLocked(RuntimeError):
    pass


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that did not say which"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, running since {holder.get('since')}"


@contextlib.contextmanager
def exclusive_run_lock(run_dir: str | os.PathLike, say=print) -> Iterator[None]:
    """Holds `RUN/.lock` while inside; raises `RunDirLocked` (naming the holder) if another process has it."""
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLocked(f"{run_dir} is in use by another run ({_describe(_holder(fd))}; lock file {path}). "
                               "Wait for it to finish or stop it, or use another --workdir.") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"mtjax: cannot lock {path} ({e.strerror}): this file system has no locks; make sure no other "
                  "run uses this directory", file=sys.stderr)
        stale = _holder(fd)
        if stale:
            say(f"mtjax: {run_dir} was last used by {_describe(stale)}, which ended without releasing it; taking over")
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves an empty file: the next run sees no stale holder
    finally:
        os.close(fd)  # closing releases the flock
