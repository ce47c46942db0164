"""Plain progress lines for runs nobody watches in a terminal (SLURM, nohup, CI logs)."""

from __future__ import annotations

import fnmatch
import math
import time
from typing import Any, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from mmkit.config_checks import Range, check_settings

DEFAULT_VAL_METRICS = ("loss", "*_R@1", "*_R@5", "rsum", "zeroshot_top1")


class ProgressLog(L.Callback):
    """Prints one line every ``every_n_steps`` optimizer steps and one per validation, on rank 0::

        step 120/2000 (6%) | epoch 0 | loss 3.21 (contrastive_loss 3.21) | lr 4.9e-04 | 85.3 samples/s | ETA 00:12:31
        val step 200 | val/i2t_R@1 0.412 | val/loss 2.87 | ...

    The values are those the module already logs (``train/loss``, its ``train/*_loss`` terms,
    ``train/lr``, ``Throughput``'s ``train/samples_per_sec``), read from
    ``trainer.callback_metrics`` on the printing steps only: other steps cost nothing. The ETA is
    the mean wall time per step since the first step this callback saw (validation included:
    it is time the user waits too) times the steps left.

    Args:
        every_n_steps: optimizer steps between lines; default: the trainer's ``log_every_n_steps``.
        enabled: ``None`` (default): print only when the trainer has no progress bar (``mmkit``
            turns the bar off when stdout is not a terminal); ``True``/``False`` force it.
        val_metrics: which ``val/<name>`` values the validation line shows (shell-style patterns
            on ``<name>``), sorted by name.
    """

    setting_ranges = {"every_n_steps": Range(ge=1, integer=True)}

    def __init__(self, every_n_steps: Optional[int] = None, enabled: Optional[bool] = None,
                 val_metrics: list[str] = list(DEFAULT_VAL_METRICS)) -> None:
        if every_n_steps is not None:
            check_settings(self, {"every_n_steps": every_n_steps}, ProgressLog.setting_ranges)
        self.every_n_steps = every_n_steps
        self.enabled = enabled
        self.val_metrics = list(val_metrics)
        self._active = False
        self._start: tuple[int, float] | None = None  # (global step, time) of the first step seen
        self._last_printed = -1
        self._total: int | None = None
        self._clock = time.monotonic  # replaceable in tests

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._active = self.enabled if self.enabled is not None else trainer.progress_bar_callback is None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = None
        self._last_printed = trainer.global_step  # a resumed run does not repeat its last line
        self._total = _max_steps(trainer)

    def train_values_every(self, trainer: L.Trainer) -> int | None:
        """The steps this callback prints the module's training values on (see log_cadence)."""
        return (self.every_n_steps or trainer.log_every_n_steps) if self._active else None

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._active:
            return
        step, now = trainer.global_step, self._clock()
        if self._start is None:
            self._start = (step, now)
        every = self.every_n_steps or trainer.log_every_n_steps
        total = self._total
        if step == self._last_printed or not (step % every == 0 or step == total):
            return  # not a printing step (or a gradient-accumulation micro-batch of a printed one)
        self._last_printed = step
        print(self.train_line(trainer, step, total, now), flush=True)

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active and not trainer.sanity_checking:
            print(self.val_line(trainer), flush=True)

    def train_line(self, trainer: L.Trainer, step: int, total: int | None, now: float) -> str:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}",
                 f"epoch {trainer.current_epoch}"]
        if "train/loss" in metrics:
            terms = sorted(k for k in metrics if k.endswith("_loss") and k != "train/loss")
            detail = ", ".join(f"{k[len('train/'):]} {metrics[k]:.3g}" for k in terms)
            parts.append(f"loss {metrics['train/loss']:.3g}" + (f" ({detail})" if detail else ""))
        if "train/lr" in metrics:
            parts.append(f"lr {metrics['train/lr']:.1e}")
        if "train/samples_per_sec" in metrics:
            parts.append(f"{metrics['train/samples_per_sec']:.1f} samples/s")
        start_step, start_time = self._start or (step, now)
        if total and step > start_step:
            parts.append(f"ETA {_hms((now - start_time) / (step - start_step) * (total - step))}")
        return " | ".join(parts)

    def val_line(self, trainer: L.Trainer) -> str:
        shown = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")
                 and any(fnmatch.fnmatchcase(k[len("val/"):], p) for p in self.val_metrics)}
        return " | ".join([f"val step {trainer.global_step}"] + [f"{k} {float(shown[k]):.3g}" for k in sorted(shown)])


def _max_steps(trainer: L.Trainer) -> int | None:
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return trainer.max_steps
    estimated = trainer.estimated_stepping_batches
    return int(estimated) if math.isfinite(estimated) else None


def _hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
