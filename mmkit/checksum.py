"""SHA-256 digests of checkpoint files, kept in a sidecar file next to each checkpoint.

A checkpoint whose bytes change after it was written (a flipped bit on disk, a damaged copy) can
still load: the zip index and the pickle are intact and only a tensor's values differ. The digest
recorded at write time catches that. The sidecar of ``epoch=0-step=5.ckpt`` is
``epoch=0-step=5.ckpt.digest`` in ``sha256sum`` format (``<hex>  <name>``), so
``sha256sum -c epoch=0-step=5.ckpt.digest`` checks it by hand too. Not ``.sha256``: Lightning
finds SLURM's ``hpc_ckpt_<N>.ckpt`` by the digits of every file name containing ``hpc_ckpt_``,
and would read ``hpc_ckpt_1.ckpt.sha256`` as checkpoint number 1256.

SHA-256 rather than BLAKE2b: hashlib's SHA-256 comes from OpenSSL and uses the CPU's SHA
instructions where they exist (about 1 GB/s on this project's machines against 0.45 GB/s for
BLAKE2b), and every system has a tool to check it. Files are hashed in 1-MiB blocks; the writer
hashes the bytes as ``torch.save`` produces them, so writing costs no second read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from mmkit.file_modes import give_usual_mode

ALGORITHM = "sha256"
SUFFIX = ".digest"  # no digits in it: see above
BLOCK = 1 << 20
TEMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<random>.tmp": never matched by "*.ckpt"


class ChecksumMismatch(Exception):
    """A file's bytes do not match any digest its sidecar records."""


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


class HashingWriter:
    """A write-only file object that hashes what passes through it on its way to ``file``."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.hash = hashlib.new(ALGORITHM)

    def write(self, data) -> int:
        self.hash.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


def file_digest(path: str | os.PathLike, algorithm: str = ALGORITHM) -> str:
    """The hex digest of a file's bytes, read in blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def read_sidecar(path: str | os.PathLike) -> list[str] | None:
    """The digests the sidecar of ``path`` accepts (normally one), or None without a sidecar."""
    try:
        text = sidecar_path(path).read_text()
    except FileNotFoundError:
        return None
    return [line.split()[0].lower() for line in text.splitlines() if line.strip()]


def write_sidecar(path: str | os.PathLike, digests: list[str]) -> None:
    """Write the sidecar of ``path`` atomically (temporary file, fsync, rename, folder fsync)."""
    path = Path(path)
    side = sidecar_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{side.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        give_usual_mode(fd)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{d}  {path.name}\n" for d in digests)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, side)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def replace_with_digest(tmp: str | os.PathLike, path: str | os.PathLike, digest: str) -> None:
    """``os.replace(tmp, path)`` for a checkpoint whose bytes hash to ``digest``, its sidecar
    written first, so a checkpoint never exists without its digest.

    Until the rename, the file under ``path`` may still be an older one (a checkpoint saved again
    under the same name: Lightning's ``last.ckpt``, a step trained again after a resume). The
    sidecar then accepts the old digest and the new one, and is cut down to the new one after the
    rename: a crash anywhere in between leaves a file that matches its sidecar."""
    path = Path(path)
    old = read_sidecar(path) if path.exists() else []
    if old is None:  # an older file written without a digest: hash it once, now
        old = [file_digest(path)]
    write_sidecar(path, [*(d for d in old if d != digest), digest])
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if [d for d in old if d != digest]:
        write_sidecar(path, [digest])
    _verified.pop(path.resolve(), None)


def remove_with_sidecar(path: str | os.PathLike) -> None:
    """Delete a checkpoint file, then its sidecar (never a checkpoint left without its digest)."""
    Path(path).unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)


def remove_orphan_sidecars(folder: str | os.PathLike) -> list[Path]:
    """Delete sidecars whose file is gone (a kill between removing a checkpoint and its sidecar)."""
    removed = []
    for side in Path(folder).glob(f"*{SUFFIX}"):
        if not side.with_name(side.name[: -len(SUFFIX)]).exists():
            side.unlink(missing_ok=True)
            removed.append(side)
    return removed


# Files already verified in this process, by (path, inode, size, mtime): the check when choosing
# `last` and the load that follows hash a multi-GB file once, not twice. Replacing or rewriting
# the file changes the key.
_verified: dict[Path, tuple[int, int, int]] = {}


def verify(path: str | os.PathLike) -> bool:
    """Check ``path`` (a link: the file it points at) against its sidecar. False when there is no
    sidecar (written before digests were recorded, or by another writer): nothing to check. Raises
    ``ChecksumMismatch`` naming both digests when the bytes differ."""
    real = Path(path).resolve()
    expected = read_sidecar(real)
    if expected is None:
        return False
    st = real.stat()
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    if _verified.get(real) == key:
        return True
    actual = file_digest(real)
    if actual not in expected:
        raise ChecksumMismatch(
            f"its {ALGORITHM} is {actual}, but {sidecar_path(real).name} records {' or '.join(expected)}: "
            "its bytes changed after it was written (disk or copy damage)"
        )
    _verified[real] = key
    return True


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames in ``folder`` survive a power loss."""
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
