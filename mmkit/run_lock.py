"""One training run per run folder: an exclusive lock on ``<default_root_dir>/.mmkit.lock``.

Two fits started in one folder (a job submitted twice, a restart while the old job still runs)
would delete each other's temporary files, prune each other's checkpoints and re-point
``last.ckpt``, and a restart would then resume the other run's state. Global rank 0 of a fit holds
the lock for the life of the fit; a second fit in the folder stops at once with a message naming
the holder (its pid, host, start time and command are written into the lock file).

``fcntl.flock``: the kernel drops the lock when the process dies however it dies (SIGKILL, OOM),
so there is never a stale lock to delete by hand. The lock file itself stays (deleting it would
let two processes lock two different files of the same name). Forked children (DataLoader
workers) close their inherited copy of the descriptor, so a killed trainer's orphaned workers do
not keep the folder locked. Over NFS the lock is a POSIX lock of the server's; on a filesystem
without locks (Lustre mounted without ``-o flock``) the run goes on unlocked, with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

LOCK_NAME = ".mmkit.lock"


class RunFolderLocked(RuntimeError):
    """Another process holds the run folder's lock; the message names it."""


class _Held:
    def __init__(self, fd: int | None) -> None:
        self.fd, self.count = fd, 1


# Locks this process holds, by folder: the CLI and StepCheckpoint both ask for the folder's lock
# in one fit; the second request only counts (two flocks of one file in one process would block).
_held: dict[Path, _Held] = {}


def acquire(folder: str | os.PathLike) -> Path:
    """Lock ``folder`` (created if missing) for this process or raise ``RunFolderLocked`` naming
    the holder. Re-entrant in one process: each ``acquire`` needs a ``release``."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder].count += 1
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not O_TRUNC: the holder's details are in it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _describe(path)
            os.close(fd)
            raise RunFolderLocked(
                f"mmkit: {folder} is in use by another run ({holder}); two runs in one folder would "
                "overwrite each other's checkpoints. Wait for it to finish or stop it, or give this "
                f"run another trainer.default_root_dir. (lock: {path})"
            ) from None
        os.close(fd)
        warnings.warn(f"mmkit: cannot lock {path} ({e.strerror}); this filesystem has no file locks, "
                      "so nothing stops a second run in the same folder", stacklevel=2)
        _held[folder] = _Held(None)
        return folder
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_owner()) + "\n").encode(), 0)
    _held[folder] = _Held(fd)
    return folder


def release(folder: str | os.PathLike) -> None:
    folder = Path(folder).resolve()
    held = _held.get(folder)
    if held is None:
        return
    held.count -= 1
    if held.count == 0:
        del _held[folder]
        if held.fd is not None:
            os.close(held.fd)  # closing drops the flock


def holds(folder: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``folder`` (also when locks are unsupported there)."""
    return Path(folder).resolve() in _held


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}


def _describe(path: Path) -> str:
    try:
        owner = json.loads(path.read_text())
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}: {owner['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


def _close_in_child() -> None:
    # A forked child shares the parent's open file description; as long as the child keeps it, the
    # lock outlives the parent. Closing the child's copy leaves the parent's lock in place.
    for held in _held.values():
        if held.fd is not None:
            try:
                os.close(held.fd)
            except OSError:
                pass
            held.fd = None


os.register_at_fork(after_in_child=_close_in_child)
