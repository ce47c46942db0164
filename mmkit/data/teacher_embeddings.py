"""Pre-computed teacher embeddings: run the teacher once, train students from the stored rows.

The store is a folder of safetensors files (one per rank or shard, any number), each with an
``index`` column (the dataset index of each row), ``image_features`` and ``text_features``
(normalised) and optionally ``logit_scale`` (the teacher's inverse temperature, repeated per
row). ``mmkit predict`` with ``KDStudent(predict_with="teacher")`` writes exactly this through
``mmkit.callbacks.EmbeddingWriter``; so does ``mmkit predict`` of any mmkit module (without
``logit_scale``). Rows are looked up by ``batch["index"]``, so the store must have been written
over the same dataset (same source, same order of indices) as the one training reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor


class MissingTeacherEmbeddingsError(LookupError):
    """A batch asked for dataset indices that the store does not hold."""


class TeacherEmbeddings:
    """All rows of a store, sorted by dataset index, held in (CPU) memory.

    Args:
        path: a folder of ``*.safetensors`` files, or one file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors")) if self.path.is_dir() else [self.path]
        if not files or not files[0].is_file():
            raise FileNotFoundError(f"no teacher embeddings (*.safetensors) at {str(self.path)!r}")
        parts = [load_file(str(f)) for f in files]
        for f, part in zip(files, parts):
            missing = {"index", "image_features", "text_features"} - part.keys()
            if missing:
                raise ValueError(f"{f}: not a teacher-embeddings file, missing {sorted(missing)} (has {sorted(part)})")
        index = torch.cat([p["index"].long() for p in parts])
        order = index.argsort()
        index = index[order]
        # The same row written twice (e.g. by two overlapping prediction runs) is kept once.
        keep = torch.ones_like(index, dtype=torch.bool)
        keep[1:] = index[1:] != index[:-1]
        order, self.index = order[keep], index[keep]
        self.image_features = torch.cat([p["image_features"] for p in parts])[order].float()
        self.text_features = torch.cat([p["text_features"] for p in parts])[order].float()
        scales = [p["logit_scale"].float() for p in parts if "logit_scale" in p]
        self.logit_scale: Tensor | None = torch.cat(scales)[0] if scales else None

    def __len__(self) -> int:
        return int(self.index.numel())

    @property
    def embed_dim(self) -> int:
        return int(self.image_features.shape[1])

    def lookup(self, index: Tensor, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """The teacher's outputs for these dataset indices (``image_features``,
        ``text_features`` and, when stored, ``logit_scale``), on ``device``."""
        wanted = index.detach().long().cpu()
        pos = torch.searchsorted(self.index, wanted).clamp(max=max(len(self) - 1, 0))
        found = self.index[pos] == wanted if len(self) else torch.zeros_like(wanted, dtype=torch.bool)
        if not bool(found.all()):
            missing = wanted[~found].tolist()
            raise MissingTeacherEmbeddingsError(
                f"teacher embeddings {str(self.path)!r} have no row for dataset index "
                f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''} "
                f"({len(missing)} of this batch's {len(wanted)} missing; the store holds {len(self)} rows, "
                f"indices {int(self.index[0]) if len(self) else '-'}..{int(self.index[-1]) if len(self) else '-'}). "
                "Write the store over the same dataset the student trains on."
            )
        out = {"image_features": self.image_features[pos].to(device), "text_features": self.text_features[pos].to(device)}
        if self.logit_scale is not None:
            out["logit_scale"] = self.logit_scale.to(device)
        return out
