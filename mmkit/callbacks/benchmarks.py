"""Standard benchmarks during training: zero-shot classification and retrieval every N epochs
or steps (open_clip's ``--imagenet-val``, for any number of benchmarks at once)."""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from mmkit.benchmarks.encoding import BenchmarkEncoder
from mmkit.benchmarks.suite import flat_metrics, load_benchmarks, run_benchmarks
from mmkit.parallel.ops import parallel_ops


class Benchmarks(Callback):
    """Scores the model being trained on a list of benchmarks and logs each metric under its
    benchmark's name: ``zeroshot/<name>/top1``, ``zeroshot/<name>/top5``,
    ``zeroshot/<name>/mean_per_class_recall``, ``retrieval/<name>/i2t_R@1``, ... (see
    ``mmkit.benchmarks``). The numbers are those of ``mmkit benchmark`` on the same weights, on any
    number of ranks: each rank encodes its share of every benchmark, the features are gathered
    once, and every rank scores all of them. The model runs as validation runs it (eval mode, the
    trainer's precision, ZeRO-3 parameters gathered), through the module's forward (a technique's
    ``project`` included).

    Args:
        benchmarks: a benchmarks YAML file (as ``mmkit benchmark --benchmarks`` reads), or the same
            list inline: ``[{task: zeroshot_classification, name: ..., images: ...}, ...]``.
        every_n_epochs: evaluate at the end of every N-th training epoch (None: never).
        every_n_steps: evaluate after every N-th optimizer step (None: never).
    """

    def __init__(self, benchmarks: str | list[dict[str, Any]], every_n_epochs: int | None = 1,
                 every_n_steps: int | None = None) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Benchmarks: {name} must be a positive integer or null, got {value!r}")
        if every_n_epochs is None and every_n_steps is None:
            raise ValueError("Benchmarks: set every_n_epochs or every_n_steps (both are null: it would never run)")
        self.benchmarks = load_benchmarks(benchmarks)  # a missing file or a bad entry fails before training
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.last_results: dict[str, dict[str, Any]] | None = None
        self._evaluated_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._evaluated_step:
            self.evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0 \
                and trainer.global_step != self._evaluated_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Run every benchmark on the current weights and log the metrics (every rank must call it)."""

        def context() -> contextlib.AbstractContextManager:
            stack = contextlib.ExitStack()
            stack.enter_context(trainer.precision_plugin.forward_context())
            stack.enter_context(parallel_ops(pl_module).gathered(pl_module))
            return stack

        encoder = BenchmarkEncoder(pl_module, pl_module.preprocessing, pl_module.device, context)
        self.last_results = run_benchmarks(self.benchmarks, encoder)
        # FSDP2 leaves the root's parameters gathered after a forward without backward: shard them
        # again, as the optimizer and checkpointing hold them (local, no communication).
        parallel_ops(pl_module).reshard(pl_module)
        self._evaluated_step = trainer.global_step
        metrics = flat_metrics(self.last_results)
        # Straight to the loggers at this step (self.log on a step would wait for log_every_n_steps);
        # callback_metrics too, so a checkpoint callback can monitor them.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("/top1", "R@1")))
            print(f"mmkit: benchmarks at step {trainer.global_step}: {shown}", flush=True)
        return metrics
