"""Write ``predict`` outputs (image and text embeddings) to disk, one safetensors file per rank."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors.torch import save_file

from mmkit.run_folder import run_folder


class EmbeddingWriter(BasePredictionWriter):
    """Collects each rank's predicted embeddings and writes ``embeddings_rank{R}.safetensors``
    with ``image_features``, ``text_features``, ``index`` and ``image_id`` (rows sorted by index,
    so files from several ranks concatenate into the dataset's order).

    Args:
        out_dir: folder for the files (default: ``<log_dir>/embeddings``).
    """

    def __init__(self, out_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.out_dir = out_dir

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module, predictions, batch_indices) -> None:
        folder = Path(self.out_dir) if self.out_dir else run_folder(trainer) / "embeddings"  # every rank
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        merged = {k: torch.cat([b[k].detach().cpu() for b in batches]) for k in batches[0]}
        order = merged["index"].argsort()
        merged = {k: v[order].contiguous() for k, v in merged.items()}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"embeddings_rank{trainer.global_rank}.safetensors"
        save_file(merged, str(path))
        print(f"mmkit: wrote {len(order)} embeddings to {path}")
