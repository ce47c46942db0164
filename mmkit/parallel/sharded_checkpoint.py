"""Sharded checkpoint folders: recognising both kinds (used by ``mmkit export`` and by
``--ckpt_path last``), checking every pickle in them before anything reads them, and reading the
FSDP2 kind. Lightning's ``ModelParallelStrategy`` saves a ``torch.distributed.checkpoint`` folder
per checkpoint (one shard file per rank, a ``.metadata`` index and Lightning's ``meta.pt``);
DeepSpeed a folder with a ``latest`` file naming a tag folder of per-rank states, merged by
``mmkit.parallel.deepspeed_support.consolidated_state_dict``.

torch reads ``.metadata`` with plain ``pickle.load`` and the shards' non-tensor items with
``torch.load(weights_only=False)``; DeepSpeed reads all its files with ``weights_only=False``.
``verify_sharded_checkpoint`` loads each of those pickles with a loader that runs no code
(``mmkit.safe_unpickle``) and refuses the folder, naming the file, if one needs more.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from mmkit.safe_unpickle import (
    CheckpointLoadError,
    can_mmap,
    deepspeed_globals,
    load_dcp_metadata,
    torch_load,
    weights_only_everywhere,
)


def is_distributed_checkpoint(path: str | Path) -> bool:
    """A finished ``torch.distributed.checkpoint`` folder (FSDP2): its ``.metadata`` index is there."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """A DeepSpeed checkpoint is a directory (Lightning's ``*.ckpt/`` with a ``latest`` file or a
    ``checkpoint/`` tag folder), not a file."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob("*/*model_states.pt")))


def verify_sharded_checkpoint(path: str | Path) -> None:
    """Load every pickle of a sharded checkpoint folder as its library would, but without running
    code: ``CheckpointLoadError`` (naming the file and what it references) if one needs a class
    a checkpoint of that kind never holds, is damaged, or lies outside the folder."""
    path = Path(path)
    if is_distributed_checkpoint(path):
        verify_distributed_checkpoint(path)
    elif is_deepspeed_checkpoint(path):
        verify_deepspeed_checkpoint(path)
    else:
        raise CheckpointLoadError(f"checkpoint {path} is a folder but not a sharded checkpoint "
                                  "(no torch.distributed.checkpoint .metadata, no DeepSpeed 'latest')")


def verify_distributed_checkpoint(path: str | Path) -> Metadata:
    """Check a torch.distributed.checkpoint folder: its ``.metadata`` index (and any per-rank
    ``__N.metadata``) with the restricted unpickler, every non-tensor item in its shards with
    ``weights_only``, every ``*.pt`` (Lightning's ``meta.pt``) too. Tensors need no check: torch
    reads them with ``weights_only=True``. Returns the index."""
    path = Path(path)
    for extra in sorted(path.glob("__*.metadata")):
        load_dcp_metadata(extra)
    metadata = load_dcp_metadata(path / ".metadata")
    storage = metadata.storage_data
    if not isinstance(storage, dict) or not all(isinstance(s, _StorageInfo) for s in storage.values()):
        raise CheckpointLoadError(f"checkpoint file {path / '.metadata'} is corrupt (its storage index is a {type(storage).__name__})")
    for info in storage.values():
        # A shard is read from path / relative_path: a name elsewhere would read another folder's file.
        if not isinstance(info.relative_path, str) or info.relative_path in ("", ".", "..") \
                or Path(info.relative_path).name != info.relative_path:
            raise CheckpointLoadError(f"checkpoint file {path / '.metadata'} points outside its folder "
                                      f"({info.relative_path!r}); refused")
    _read(path, {}, _NonTensorItemsCheck(path))
    for file in sorted(path.glob("*.pt")):
        torch_load(file, mmap=can_mmap(file))
    return metadata


def verify_deepspeed_checkpoint(path: str | Path) -> None:
    """Check a DeepSpeed folder: ``latest`` names a tag folder inside it, and every ``*.pt`` in
    the folder loads with ``weights_only`` and DeepSpeed's few classes (``DEEPSPEED_GLOBALS``)."""
    path = Path(path)
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        # DeepSpeed reads os.path.join(folder, tag): an absolute or ../ tag is another folder's files.
        if tag in ("", ".", "..") or Path(tag).name != tag:
            raise CheckpointLoadError(f"checkpoint file {latest} names {tag!r}, which is not a folder inside {path}; refused")
    try:
        allow = deepspeed_globals()
    except ImportError as e:
        raise CheckpointLoadError(f"checkpoint {path} is a DeepSpeed checkpoint and DeepSpeed is not installed ({e})") from e
    for file in sorted(path.rglob("*.pt")):
        torch_load(file, allow=allow, mmap=can_mmap(file))


def distributed_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The module's full (unsharded) state dict from such a folder, on the CPU, in this one process:
    the shards of every rank are merged by ``torch.distributed.checkpoint``, no process group needed.
    Checked first (``verify_distributed_checkpoint``), then read with the index through the
    restricted unpickler and the non-tensor items with ``weights_only``."""
    verify_distributed_checkpoint(path)
    state: dict[str, Any] = {}
    with weights_only_everywhere():  # the planner's torch.load(weights_only=False) of non-tensor items
        _read(path, state, _EmptyStateDictLoadPlanner())
    if "state_dict" not in state:
        raise ValueError(f"{path}: a torch.distributed.checkpoint folder without a 'state_dict' entry "
                         f"(found {sorted(state)[:5]}); not a Lightning ModelParallelStrategy checkpoint")
    return state["state_dict"]


def _read(path: Path, state: dict, planner: Any) -> None:
    """torch.distributed.checkpoint's loading in this one process, as ``dcp_to_torch_save`` does it
    (its private loader: no warning about the missing process group), with the index read by
    ``_SafeReader``. A failure comes out as the ``CheckpointLoadError`` it is, or as one naming the
    folder: torch wraps it in a ``CheckpointException``, a ``BaseException`` that would pass
    through every ``except Exception``."""
    try:
        _load_state_dict(state, storage_reader=_SafeReader(path), planner=planner, no_dist=True)
    except CheckpointException as e:
        errors = [failure[0] for failure in e.failures.values()]
        error = next((x for x in errors if isinstance(x, CheckpointLoadError)), errors[0] if errors else e)
        if isinstance(error, CheckpointLoadError):
            raise error from None
        raise CheckpointLoadError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from error


class _SafeReader(FileSystemReader):
    """torch's reader with the index read by ``load_dcp_metadata`` instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = load_dcp_metadata(Path(os.fspath(self.path)) / (".metadata" if rank is None else f"__{rank}.metadata"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
        return metadata


class _NonTensorItemsCheck(DefaultLoadPlanner):
    """Reads only the non-tensor items of a torch.distributed.checkpoint (each a ``torch.save``
    blob inside a shard file) and loads each with ``weights_only``."""

    def __init__(self, folder: Path) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.folder = folder

    def set_up_planner(self, state_dict: dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        items = {fqn: None for fqn, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)}
        super().set_up_planner(items, metadata, is_coordinator)

    def load_bytes(self, read_item: Any, value: Any) -> None:
        info = self.metadata.storage_data[read_item.storage_index]
        torch_load(value, name=f"{self.folder / info.relative_path} (its item {read_item.storage_index.fqn})")
