"""The random number generators' states in every checkpoint, so a resumed run draws the same
random numbers (dropout, noise, random masking) as one that was never interrupted."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every initialised CUDA device), numpy and Python ``random`` states, as
    tensors and plain numbers only, so a checkpoint holding them loads with ``weights_only=True``."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))


class ResumeState(L.Callback):
    """Saves the global RNG states in checkpoints and restores them right before the first
    training step after a resume.

    Training keeps one stream of random numbers from step to step: the state at the end of a step
    is put back at the start of the next, so whatever ran in between (validation, the next epoch's
    DataLoader drawing its workers' seed, a checkpoint) consumes nothing from it. That is what
    makes the stream reproducible: a resumed run does not repeat what ran between the saved step
    and the next one, nor does it start its DataLoader at the same point. Per-batch data
    randomness (augmentation, in workers or not) is seeded separately by the sampler.

    Under DDP the checkpoint holds rank 0's states, which every rank restores (with
    ``seed_everything`` they are the same on every rank anyway).
    """

    def __init__(self) -> None:
        super().__init__()
        self._state: dict[str, Any] | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._state is not None:
            restore_rng_state(self._state)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._state = capture_rng_state()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._state if self._state is not None else capture_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = state_dict.get("rng")  # put back at the start of the first step trained
