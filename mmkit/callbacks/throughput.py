"""Training throughput: global samples per second and seconds per training batch."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L
from torch import Tensor

from mmkit.config_checks import Range, check_settings


def batch_size_of(batch: Any) -> int:
    """Rows in a batch: ``batch["images"]`` for mmkit's dict batches, else the first tensor found."""
    if isinstance(batch, dict):
        batch = batch["images"] if "images" in batch else next(iter(batch.values()))
    while isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(f"cannot read a batch size from {type(batch).__name__}")
    return int(batch.shape[0])


class Throughput(L.Callback):
    """Logs ``train/samples_per_sec`` and ``train/step_time`` as a rolling mean over recent batches.

    Time is wall clock between consecutive train-batch ends, so it includes data loading, the
    optimizer and logging: what a user waits for. Samples per second are global, assuming every
    rank sees the same per-rank batch size (``per-rank batch × world size``). ``step_time`` is per
    training batch (a micro-batch under gradient accumulation).

    The first ``warmup`` batches of every epoch (dataloader start-up, compilation, allocator
    growth) and the gap across a validation loop are left out. The value is logged on every batch
    once measured, so it reaches the logger whatever ``log_every_n_steps`` is.

    Args:
        window: number of most recent batches averaged over.
        warmup: batches skipped at the start of each training epoch.
        prog_bar: also show samples/s in the progress bar.
    """

    setting_ranges = {"window": Range(ge=1, integer=True), "warmup": Range(ge=0, integer=True)}

    def __init__(self, window: int = 20, warmup: int = 3, prog_bar: bool = False) -> None:
        check_settings(self, locals(), Throughput.setting_ranges)
        self.window = window
        self.warmup = warmup
        self.prog_bar = prog_bar
        self._seen = 0
        # One more timestamp than intervals: window batches lie between window + 1 batch ends.
        self._ends: deque[float] = deque(maxlen=window + 1)
        self._samples: deque[int] = deque(maxlen=window)
        self._clock = time.perf_counter  # replaceable in tests

    def _restart_window(self) -> None:
        self._ends.clear()
        self._samples.clear()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen = 0
        self._restart_window()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation time between two train batches is not training time.
        self._restart_window()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = self._clock()
        self._seen += 1
        if self._seen <= self.warmup:
            return
        # The first end after warm-up (or validation) only opens the window; it has no interval.
        if self._ends:
            self._samples.append(batch_size_of(batch))
        self._ends.append(now)
        if not self._samples:
            return
        elapsed = self._ends[-1] - self._ends[0]
        if elapsed <= 0:
            return
        steps = len(self._samples)
        samples_per_sec = sum(self._samples) * trainer.world_size / elapsed
        pl_module.log("train/samples_per_sec", samples_per_sec, on_step=True, on_epoch=False,
                      prog_bar=self.prog_bar, batch_size=1)
        pl_module.log("train/step_time", elapsed / steps, on_step=True, on_epoch=False, batch_size=1)
