"""A pause the test ends by creating a file, for runs that must go on normally afterwards
(``resume_helpers.PauseAt`` ends only on a stop signal, which makes the run exit)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L


class HoldAt(L.Callback):
    """At the end of global step ``step`` (once per run folder: ``marker`` records it) global rank 0
    writes ``marker`` (its pid) and waits until ``release`` exists (at most ``timeout`` seconds),
    then training goes on.

    Args:
        step: The global step to hold after.
        marker: File written when the hold starts.
        release: File whose existence ends the hold.
        timeout: Longest hold in seconds.
    """

    def __init__(self, step: int, marker: str, release: str, timeout: float = 300.0) -> None:
        self.step, self.marker, self.release, self.timeout = step, marker, release, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != 0 or Path(self.marker).exists():
            return
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while not Path(self.release).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
