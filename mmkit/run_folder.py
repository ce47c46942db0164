"""Where a run writes its outputs (report, export, embeddings, continual-learning tables)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def run_folder(trainer: L.Trainer) -> Path:
    """The first logger's folder, or ``default_root_dir`` without a logger.

    A collective under a multi-process strategy: Lightning broadcasts ``trainer.log_dir`` from
    rank 0 (so every rank agrees on a versioned folder). Call it on every rank, before any
    ``is_global_zero`` branch; a rank that skips it leaves the others waiting forever."""
    return Path(trainer.log_dir or trainer.default_root_dir)
