"""Permissions of the files mmkit writes: what the process's umask allows, as ``open()`` gives.

``tempfile.mkstemp`` (atomic checkpoint and log writes) and some writers (safetensors) create
files readable by their owner alone (0600). In a container whose runs volume is read by another
user (a serving pod, a colleague on a shared file system) those checkpoints and exports could not
be read, while ``report.md`` beside them could: every file mmkit writes gets the usual mode.
"""

from __future__ import annotations

import os
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def usual_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file now (0o666 less the umask)."""
    return 0o666 & ~_current_umask()


def give_usual_mode(target: int | str | os.PathLike) -> None:
    """Set an open file descriptor's or a path's mode to :func:`usual_mode`."""
    if isinstance(target, int):
        os.fchmod(target, usual_mode())
    else:
        os.chmod(target, usual_mode())


def give_folder_usual_modes(folder: str | os.PathLike) -> None:
    """:func:`give_usual_mode` for every file under ``folder`` (an export)."""
    mode = usual_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
