"""Checkpoint files that survive a crash: atomic writes, ``weights_only`` loading with errors that
name the file, and finding the newest checkpoint that is complete, loads without running code
(sharded folders: every pickle checked, see ``mmkit.parallel.sharded_checkpoint``) and that the run's
strategy can load.

Lightning's own writer serialises to memory and then moves a temporary file from the system's
temp folder into place; when that folder is on another filesystem (a node-local /tmp, checkpoints
on NFS or Lustre) the move is a copy, and a job killed during it leaves a truncated checkpoint
under the final name. Here the temporary file lives next to the target, is fsynced, and replaces
it with one ``os.replace``: a reader sees the old file or the new one, never a part. Its SHA-256
digest goes into a sidecar file first (``mmkit.checksum``), so damage to the bytes after the write
is caught when the checkpoint is chosen or loaded.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from mmkit import checksum
from mmkit.checksum import TEMP_SUFFIX
from mmkit.checksum import fsync_dir as _fsync_dir
from mmkit.file_modes import give_usual_mode
from mmkit.safe_unpickle import CheckpointLoadError, load_error, torch_load  # noqa: F401  (CheckpointLoadError: re-exported)
from mmkit.parallel.sharded_checkpoint import is_deepspeed_checkpoint, is_distributed_checkpoint, verify_sharded_checkpoint

# The kinds of sharded checkpoint folder, and what they are called in messages.
FOLDER_KINDS = {"distributed": "an FSDP2 (torch.distributed.checkpoint) folder", "deepspeed": "a DeepSpeed folder"}


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``: write a temporary
    file in the same folder, fsync it, record its SHA-256 in ``<path>.digest``, ``os.replace`` it
    onto ``path``, fsync the folder (see ``checksum.replace_with_digest`` for the order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        give_usual_mode(fd)  # mkstemp's 0600 would hide checkpoints from other readers of the volume
        with os.fdopen(fd, "wb") as f:
            writer = checksum.HashingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        checksum.replace_with_digest(tmp, path, writer.hexdigest())  # fsyncs the folder
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_symlink(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Point ``link`` at ``target`` (relative to the link's folder) in one ``os.replace``."""
    link = Path(link)
    tmp = link.parent / f".{link.name}.{os.getpid()}{TEMP_SUFFIX}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def remove_write_debris(folder: str | os.PathLike) -> list[Path]:
    """Delete what a process killed while writing checkpoints into ``folder`` left: temporary
    files (``.<name>.ckpt.<random>.tmp``, also of links and digests) and digests whose checkpoint
    is gone. Only for the holder of the run folder's lock (``mmkit.run_lock``): another run's write
    in progress looks the same. Lightning reads the digits of every name containing ``hpc_ckpt_``
    in ``default_root_dir`` to find SLURM's checkpoint, so such leftovers there break a requeue."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = list(folder.glob(f".*.ckpt*{TEMP_SUFFIX}"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed + checksum.remove_orphan_sidecars(folder)


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = True, mmap: bool = False
) -> dict[str, Any]:
    """``torch.load`` that turns every failure into a ``CheckpointLoadError`` naming the file.

    ``weights_only`` (the default) refuses pickled code: an mmkit checkpoint holds only tensors,
    numbers, strings and containers of them, so anything else is a bug, not a format to support.
    A file that references anything else is refused as one that carries code, not called corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if weights_only:
        ckpt = torch_load(path, map_location=map_location, mmap=mmap)
    else:  # asked for explicitly (Lightning's ``fit(weights_only=False)``)
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        except Exception as e:
            raise load_error(path, e) from e
    if not isinstance(ckpt, dict):
        raise CheckpointLoadError(
            f"checkpoint {path} is not a training checkpoint (a {type(ckpt).__name__}, not a dict)"
        )
    return ckpt


def check_resumable(path: str | os.PathLike, folder_kinds: Collection[str] = tuple(FOLDER_KINDS)) -> dict[str, Any]:
    """Load ``path`` as training would (weights_only) and check it is a Lightning training
    checkpoint; raise ``CheckpointLoadError`` naming the file otherwise. Memory-maps the tensors,
    so checking a large checkpoint reads little more than its index. A folder must be a finished
    sharded checkpoint of one of ``folder_kinds`` (those the run's strategy loads, see
    ``loadable_folder_kinds``) whose every pickle loads without running code (see ``_check_sharded``)."""
    if Path(path).is_dir():
        kind = _sharded_kind(Path(path))
        if kind is not None and kind not in folder_kinds:
            can = " or ".join(FOLDER_KINDS[k] for k in folder_kinds) or "single checkpoint files only"
            raise CheckpointLoadError(f"checkpoint {path} is {FOLDER_KINDS[kind]}, which this run's strategy "
                                      f"cannot load (it loads {can})")
        return _check_sharded(Path(path))
    ckpt = load_checkpoint(path, weights_only=True, mmap=True)
    missing = [k for k in ("state_dict", "global_step", "loops") if k not in ckpt]
    if missing:
        raise CheckpointLoadError(f"checkpoint {path} is not a Lightning training checkpoint (no {', '.join(missing)})")
    return ckpt


def _sharded_kind(folder: Path) -> str | None:
    """"distributed" (FSDP2's torch.distributed.checkpoint, finished or not), "deepspeed", or None."""
    if is_distributed_checkpoint(folder) or any(folder.glob("*.distcp")):  # shards but no index: unfinished
        return "distributed"
    if is_deepspeed_checkpoint(folder):
        return "deepspeed"
    return None


def _sharded_marker(folder: Path) -> Path | None:
    """The file a sharded checkpoint folder gets last, once every rank's part is on disk: Lightning's
    ``meta.pt`` after the ``torch.distributed.checkpoint`` shards (FSDP2), DeepSpeed's ``latest``
    after its tag folder. None for a folder that is neither kind."""
    kind = _sharded_kind(folder)
    return None if kind is None else folder / ("meta.pt" if kind == "distributed" else "latest")


def loadable_folder_kinds(strategy: Any) -> tuple[str, ...]:
    """The sharded folder kinds a Lightning strategy resumes from: FSDP2 folders under
    ``ModelParallelStrategy`` (mmkit's ``fsdp2``) and FSDP, DeepSpeed folders under DeepSpeed,
    none under the others (one device, DDP), which load single files only."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return ("deepspeed",)
    if isinstance(strategy, (ModelParallelStrategy, FSDPStrategy)):
        return ("distributed",)
    return ()


def _check_sharded(folder: Path) -> dict[str, Any]:
    marker = _sharded_marker(folder)
    if marker is None:
        raise CheckpointLoadError(f"checkpoint {folder} is a folder but not a sharded checkpoint "
                                  "(no torch.distributed.checkpoint .metadata, no DeepSpeed 'latest')")
    if not marker.is_file():
        raise CheckpointLoadError(f"checkpoint folder {folder} is incomplete: no {marker.name} (the save did not finish)")
    if marker.name == "latest":
        tag = marker.read_text().strip()
        if not any((folder / tag).glob("*model_states.pt")):
            raise CheckpointLoadError(f"checkpoint folder {folder} is incomplete: 'latest' names {tag!r}, "
                                      "which holds no model states")
        verify_sharded_checkpoint(folder)  # DeepSpeed's engine loads every file with weights_only=False
        return {}
    if not is_distributed_checkpoint(folder):
        raise CheckpointLoadError(f"checkpoint folder {folder} is incomplete: no .metadata")
    verify_sharded_checkpoint(folder)  # torch unpickles .metadata with plain pickle
    meta = load_checkpoint(marker, weights_only=True)
    missing = [k for k in ("global_step", "loops") if k not in meta]
    if missing:
        raise CheckpointLoadError(f"checkpoint folder {folder}: {marker.name} is not Lightning's (no {', '.join(missing)})")
    return meta


def find_resumable_checkpoint(
    folders: Iterable[str | os.PathLike], recursive: bool = True, folder_kinds: Collection[str] = tuple(FOLDER_KINDS)
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The ``*.ckpt`` under ``folders`` that is furthest into training (``training_progress``;
    modification time only breaks ties) and loads with ``weights_only=True`` and matches its
    recorded digest, and the ones skipped with the reason: every file that does not load (its
    step cannot be known), and those further into training whose digest does not match.
    ``(None, skipped)`` when none is usable. Links (``last.ckpt``) count once, as the file they
    point at. A ``*.ckpt`` folder (FSDP2 or DeepSpeed shards) counts by the time of the file
    written last into it; a DeepSpeed folder records no step here, so it ranks below any file that
    does (a run writes one kind or the other). A folder is usable only if it is one of
    ``folder_kinds`` and every pickle in it loads without running code."""
    seen: dict[Path, float] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in folder.rglob("*.ckpt") if recursive else folder.glob("*.ckpt"):
            with contextlib.suppress(OSError):
                real = path.resolve()
                if real.is_file():
                    seen[real] = real.stat().st_mtime_ns
                elif real.is_dir() and (marker := _sharded_marker(real)) is not None:
                    seen[real] = (marker if marker.is_file() else real).stat().st_mtime_ns
    # Modification times say little: `cp -r`, rsync or a restore from backup rewrite them. What a
    # checkpoint records about its own position in training does not change with the copy.
    skipped: list[tuple[Path, str]] = []
    ranked = []
    for path in sorted(seen, key=lambda p: (seen[p], p.name), reverse=True):
        try:
            ranked.append((training_progress(check_resumable(path, folder_kinds)), seen[path], path.name, path))
        except (CheckpointLoadError, OSError) as e:
            skipped.append((path, str(e)))
    # Hashing reads the whole file: only the best candidates are hashed, until one matches.
    for *_, path in sorted(ranked, reverse=True):
        try:
            verify_checksum(path)
        except (CheckpointLoadError, OSError) as e:
            skipped.append((path, str(e)))
            continue
        return path, skipped
    return None, skipped


def training_progress(ckpt: dict[str, Any]) -> tuple[int, ...]:
    """Where in training a Lightning checkpoint was written, for ordering: global step, epoch, then
    the fit loop's batch and epoch counters (they tell apart checkpoints of one global step: the
    end of a batch and the end of its epoch, micro-batches of gradient accumulation). -1 for what
    the checkpoint does not record."""
    fit_loop = (ckpt.get("loops") or {}).get("fit_loop") or {}
    batches = (fit_loop.get("epoch_loop.batch_progress") or {}).get("total") or {}
    epochs = (fit_loop.get("epoch_progress") or {}).get("total") or {}
    values = (ckpt.get("global_step"), ckpt.get("epoch"), batches.get("completed"), batches.get("processed"),
              epochs.get("processed"), epochs.get("completed"))
    return tuple(int(v) if isinstance(v, (int, float)) else -1 for v in values)


def verify_checksum(path: str | os.PathLike) -> bool:
    """Check a checkpoint file against the digest recorded when it was written (``<path>.digest``,
    see ``mmkit.checksum``); raise ``CheckpointLoadError`` naming the file when its bytes changed.
    A file without a sidecar (written before mmkit recorded digests, or not by ``atomic_save``:
    Lightning's own writer, a remote store) passes unchecked: returns False. A folder (sharded
    checkpoint) has no digest either."""
    if Path(path).is_dir():
        return False
    try:
        return checksum.verify(path)
    except checksum.ChecksumMismatch as e:
        raise CheckpointLoadError(f"checkpoint {path} is corrupt: {e}") from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` writing local checkpoints with ``atomic_save`` (with a digest
    sidecar) and loading them with ``weights_only=True`` unless told otherwise, after checking the
    digest (skipped for files without one, see ``verify_checksum``). Remote paths (s3://, gs://,
    ...) go through Lightning's writer: an object store replaces an object whole anyway."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None):
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location, weights_only)
        checkpoint = load_checkpoint(path, map_location=map_location, weights_only=weights_only is not False)
        verify_checksum(path)  # after the load: a truncated file is named as such, not as a mismatch
        return checkpoint

    def remove_checkpoint(self, path) -> None:
        if not _is_local_file_protocol(path) or Path(path).is_dir():
            return super().remove_checkpoint(path)
        checksum.remove_with_sidecar(path)  # ModelCheckpoint's top-k removals


def checkpoint_folders(trainer: Any) -> list[Path]:
    """Where a run's checkpoints can be: ``trainer.default_root_dir`` (SLURM's hpc_ckpt_*), its
    ``checkpoints/`` (StepCheckpoint), every checkpoint callback's ``dirpath``, and the folders
    ModelCheckpoint derives from a logger (``<save_dir>/<name>/<any version>/checkpoints``)."""
    root = Path(trainer.default_root_dir)
    folders = [root, root / "checkpoints"]
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "dirpath", None):
            folders.append(Path(cb.dirpath))
    for logger in trainer.loggers:
        base = Path(getattr(logger, "save_dir", None) or root) / (getattr(logger, "name", None) or "")
        folders += [base / "checkpoints", *base.glob("*/checkpoints")]
    return list(dict.fromkeys(folders))


def resolve_ckpt_path(ckpt_path: str | None, trainer: Any) -> str | None:
    """What ``fit(ckpt_path=...)`` should load. ``"last"``: the checkpoint of this run furthest into
    training that loads and matches its digest (``find_resumable_checkpoint`` over
    ``checkpoint_folders``), reporting the broken ones it skipped; None when the run has none yet
    (a first start and a restart use the same command). A file path is checked first (it loads,
    its digest matches), so a broken file fails with its name before training starts. Other values
    (None, "best", "hpc", remote URLs) are left to Lightning. Sharded folders count only where the
    trainer's strategy loads their kind, and only once every pickle in them is checked."""
    kinds = loadable_folder_kinds(getattr(trainer, "strategy", None))
    if ckpt_path == "last":
        path, skipped = find_resumable_checkpoint(checkpoint_folders(trainer), recursive=False, folder_kinds=kinds)
        for bad, reason in skipped:
            _say(f"mmkit: --ckpt_path last: skipped {bad}: {reason}")
        if path is None:
            if skipped:
                raise CheckpointLoadError(
                    f"--ckpt_path last: no usable checkpoint, {len(skipped)} broken ones skipped (listed above); "
                    "delete them to start from scratch, or pass --ckpt_path with a good file"
                )
            _say(f"mmkit: --ckpt_path last: no checkpoint under {trainer.default_root_dir} yet; starting from scratch")
            return None
        _say(f"mmkit: --ckpt_path last: resuming from {path}")
        return str(path)
    if ckpt_path and ckpt_path not in ("best", "hpc") and _is_local_file_protocol(ckpt_path):
        check_resumable(ckpt_path, kinds)  # a folder: a finished sharded checkpoint of the strategy's kind
        verify_checksum(ckpt_path)
    return ckpt_path


def _say(message: str) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(message, flush=True)
