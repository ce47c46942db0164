"""Sharded checkpoint folders: recognising both kinds (used by ``mmkit export`` and by
``--ckpt_path last``), and reading the FSDP2 kind. Lightning's ``ModelParallelStrategy`` saves a
``torch.distributed.checkpoint`` folder per checkpoint (one shard file per rank, a ``.metadata``
index and Lightning's ``meta.pt``); DeepSpeed a folder with a ``latest`` file naming a tag folder
of per-rank states, merged by ``mmkit.modules.deepspeed_support.consolidated_state_dict``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def is_distributed_checkpoint(path: str | Path) -> bool:
    """A finished ``torch.distributed.checkpoint`` folder (FSDP2): its ``.metadata`` index is there."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """A DeepSpeed checkpoint is a directory (Lightning's ``*.ckpt/`` with a ``latest`` file or a
    ``checkpoint/`` tag folder), not a file."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob("*/*model_states.pt")))


def distributed_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The module's full (unsharded) state dict from such a folder, on the CPU, in this one process:
    the shards of every rank are merged by ``torch.distributed.checkpoint``, no process group needed."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged.pt"
        dcp_to_torch_save(str(path), str(merged))
        state = torch.load(merged, map_location="cpu", weights_only=True)
    if "state_dict" not in state:
        raise ValueError(f"{path}: a torch.distributed.checkpoint folder without a 'state_dict' entry "
                         f"(found {sorted(state)[:5]}); not a Lightning ModelParallelStrategy checkpoint")
    return state["state_dict"]
