"""Pieces the crash-and-resume tests plug into real training runs (in process or in a `mmkit fit`
subprocess, via class_path): a per-step record of what was trained, a pause at a chosen step so
the test can signal or kill the process there, and a loss that draws from every global RNG."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from mmkit.losses import ClipLoss


class StepRecorder(L.Callback):
    """Appends one JSON line per trained step to ``path`` (flushed, so a SIGKILL loses nothing
    already written): process id, global step, epoch, the batch's sample indices and the loss.

    Args:
        path: The JSON-lines file.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        record = {"pid": os.getpid(), "rank": trainer.global_rank, "step": trainer.global_step,
                  "epoch": trainer.current_epoch, "index": batch["index"].tolist(), "loss": float(loss)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


class PauseAt(L.Callback):
    """At global step ``step`` (once per run folder: ``marker`` records it) global rank 0 writes
    ``marker`` and waits until it receives a stop signal (or ``timeout`` seconds pass); other ranks
    go on and wait for it in the next collective.

    ``phase`` says where: ``"train"`` at the end of training step ``step``; ``"validation"`` after
    the first batch of the validation run at that step (not in the sanity check); ``"checkpoint"``
    inside the write of a checkpoint at that step (``on_save_checkpoint``: the state is gathered,
    the file not yet written); ``"test"`` after the first test batch (``step`` is not checked).
    For ``"train"``: checkpoint callbacks run after this one, so a step checkpoint of this step is
    written after the pause: pause one step past a checkpoint step to kill after that checkpoint.

    Args:
        step: The global step to pause at.
        marker: File written when the pause starts.
        timeout: Longest pause in seconds.
        phase: ``"train"``, ``"validation"``, ``"checkpoint"`` or ``"test"``.
    """

    PHASES = ("train", "validation", "checkpoint", "test")

    def __init__(self, step: int, marker: str, timeout: float = 300.0, phase: str = "train") -> None:
        if phase not in self.PHASES:
            raise ValueError(f"PauseAt: phase must be one of {self.PHASES}, got {phase!r}")
        self.step, self.marker, self.timeout, self.phase = step, marker, timeout, phase

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.phase == "train":
            self._pause(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.phase == "validation" and not trainer.sanity_checking and batch_idx == 0:
            self._pause(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.phase == "checkpoint":
            self._pause(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.phase == "test" and batch_idx == 0:
            self._pause(trainer, any_step=True)

    def _pause(self, trainer, any_step: bool = False) -> None:
        if (not any_step and trainer.global_step != self.step) or trainer.global_rank != 0 or Path(self.marker).exists():
            return
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if trainer.received_sigterm or any(getattr(cb, "preemption_signal", None) for cb in trainer.callbacks):
                return
            time.sleep(0.05)


class NoisyClipLoss(ClipLoss):
    """InfoNCE scaled by (1 + noise x (u_torch + u_numpy + u_python)), uniform draws from the three
    global generators: a resumed run only reproduces the loss curve if all three were restored.

    Args:
        noise: Scale of the random factor.
    """

    def __init__(self, noise: float = 0.05) -> None:
        super().__init__()
        self.noise = noise

    def forward(self, **outputs):
        out = super().forward(**outputs)
        u = torch.rand(()).item() + np.random.rand() + random.random()
        out["contrastive_loss"] = out["contrastive_loss"] * (1 + self.noise * u)
        return out
