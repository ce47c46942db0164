"""The terminal progress bar mmkit uses: the global step of ``max_steps`` and a readable learning rate."""

from __future__ import annotations

import importlib.util
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar



class StepMetrics:
    """Progress-bar metrics led by ``step <global step>/<max_steps>``, learning rates in scientific
    notation (Lightning's ``.3f`` shows a 5e-4 learning rate as ``0.001``, then ``0.000``)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        total = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        out: dict[str, Any] = {"step": f"{trainer.global_step}{total}"}
        for name, value in items.items():
            is_lr = name.rsplit("/", 1)[-1].startswith("lr") and isinstance(value, (int, float))
            out[name] = f"{value:.2e}" if is_lr else value
        return out


class StepRichProgressBar(StepMetrics, RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning writes "Epoch 0/-2" for a step-limited run (max_epochs -1).
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


class StepTQDMProgressBar(StepMetrics, TQDMProgressBar):
    pass


def step_progress_bar() -> ProgressBar:
    """The bar Lightning would pick (rich when installed, else tqdm), with mmkit's metrics."""
    return StepRichProgressBar() if importlib.util.find_spec("rich") else StepTQDMProgressBar()
