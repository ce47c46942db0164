"""Training throughput: global samples per second, seconds per training batch and, from the FLOPs
of one training step, achieved TFLOP/s and MFU."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from mmkit import distributed as D
from mmkit.config_checks import Range, check_settings
from mmkit.training.flops import training_flops_per_sample
from mmkit.training.log_cadence import logs_step_values
from mmkit.training.peak_flops import peak_tflops


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
    growth) and the gap across a validation loop are left out. The values are logged on the steps
    the loggers write (every ``log_every_n_steps``, and the last: ``mmkit.training.log_cadence``).

    With ``mfu`` (for mmkit's techniques), the FLOPs of one training step per sample are counted
    once per run, on the first batch (``mmkit.training.flops``: forward and backward of both
    towers and the loss). Then ``train/tflops`` is the achieved TFLOP/s per device
    (FLOPs per sample × samples/s ÷ world size) and ``train/mfu`` that over the device's peak:
    ``peak_tflops`` if given, else the table of GPUs or, on a CPU, a cached matmul probe
    (``mmkit.training.peak_flops``). ``train/mfu`` is not logged where no peak is known.

    Args:
        window: number of most recent batches averaged over.
        warmup: batches skipped at the start of each training epoch.
        prog_bar: also show samples/s in the progress bar.
        mfu: count the FLOPs of a training step and log ``train/tflops`` and ``train/mfu``.
        peak_tflops: peak TFLOP/s of one device for ``train/mfu`` (default: known or measured).
    """

    setting_ranges = {"window": Range(ge=1, integer=True), "warmup": Range(ge=0, integer=True),
                      "peak_tflops": Range(gt=0, none="the device's known or measured peak")}

    def __init__(self, window: int = 20, warmup: int = 3, prog_bar: bool = False, mfu: bool = True,
                 peak_tflops: float | None = None) -> None:
        check_settings(self, locals(), Throughput.setting_ranges)
        self.window = window
        self.warmup = warmup
        self.prog_bar = prog_bar
        self.mfu = mfu
        self.peak_tflops = peak_tflops
        # Counted on the run's first non-empty batch (e.g. for a report): FLOPs of a training
        # step per sample, one device's peak TFLOP/s (None: unknown) and where that comes from.
        self.flops_per_sample: float | None = None
        self.peak: float | None = None
        self.peak_source = ""
        self._warned_peak = False
        self._seen = 0
        # One more timestamp than intervals: window batches lie between window + 1 batch ends.
        self._ends: deque[float] = deque(maxlen=window + 1)
        self._samples: deque[int] = deque(maxlen=window)
        self._clock = time.perf_counter  # replaceable in tests
        self._validation_began = 0.0

    def _restart_window(self) -> None:
        self._ends.clear()
        self._samples.clear()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen = 0
        self._restart_window()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.mfu or self.flops_per_sample is not None or not hasattr(pl_module, "compute_loss") \
                or not hasattr(pl_module, "loss"):
            return
        # Every rank counts on the same step (the forward may be a collective): wait for a batch
        # with rows on every rank (all its samples may have been bad).
        empty = torch.tensor([0.0 if batch_size_of(batch) else 1.0], device=pl_module.device)
        if D.all_reduce_sum(empty).item() > 0:
            return
        self.flops_per_sample = training_flops_per_sample(pl_module, batch)
        self.peak, self.peak_source = (self.peak_tflops, "peak_tflops setting") if self.peak_tflops else \
            peak_tflops(pl_module.device, trainer.precision)
        if trainer.is_global_zero:
            shown = (f"{self.peak:.3g} TFLOP/s ({self.peak_source})" if self.peak
                     else f"unknown ({self.peak_source}; set throughput.peak_tflops)")
            print(f"mmkit: {self.flops_per_sample / 1e9:.4g} GFLOPs per training sample; peak per device {shown}")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_began = self._clock()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation time between two train batches is not training time: move the window's
        # timestamps past it, so the window stays full (a restart would log one-step rates).
        gap = self._clock() - self._validation_began
        self._ends = deque((t + gap for t in self._ends), maxlen=self._ends.maxlen)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = self._clock()
        self._seen += 1
        if self._seen <= self.warmup:
            return
        # The first end after warm-up only opens the window; it has no interval.
        if self._ends:
            self._samples.append(batch_size_of(batch))
        self._ends.append(now)
        if not self._samples:
            return
        elapsed = self._ends[-1] - self._ends[0]
        if elapsed <= 0:
            return
        if not logs_step_values(trainer):
            return  # the window keeps moving; only the steps the loggers write are logged
        steps = len(self._samples)
        samples_per_sec = sum(self._samples) * trainer.world_size / elapsed
        pl_module.log("train/samples_per_sec", samples_per_sec, on_step=True, on_epoch=False,
                      prog_bar=self.prog_bar, batch_size=1)
        pl_module.log("train/step_time", elapsed / steps, on_step=True, on_epoch=False, batch_size=1)
        if self.flops_per_sample is not None:
            tflops = self.flops_per_sample * samples_per_sec / trainer.world_size / 1e12  # per device
            pl_module.log("train/tflops", tflops, on_step=True, on_epoch=False, batch_size=1)
            if self.peak:
                pl_module.log("train/mfu", tflops / self.peak, on_step=True, on_epoch=False, batch_size=1)
                if tflops > self.peak and not self._warned_peak:
                    # A probe measured while the machine was busy (or a wrong setting) gives MFU > 1.
                    self._warned_peak = True
                    rank_zero_warn(
                        f"train/mfu is above 1: this run reaches {tflops:.3g} TFLOP/s per device but the peak used is "
                        f"{self.peak:.3g} ({self.peak_source}). Set throughput.peak_tflops, or delete the probe's cache "
                        "and run again on an idle machine.")
