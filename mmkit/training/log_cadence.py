"""On which training steps mmkit produces its per-step values (losses, temperature, lr, throughput).

Lightning writes step values to the loggers every ``log_every_n_steps`` batches and drops the rest,
yet every ``self.log`` call costs host time (~1 ms of Python on this project's CPU, measured by
benchmarks/step_overhead.py) and, for a device tensor, a copy the progress bar or a report then
waits on. mmkit therefore logs its per-step values only on the steps that are written, on the
steps a callback reads them from ``trainer.callback_metrics`` (``ProgressLog``, ``RunReport``:
each declares ``train_values_every``), and on the last training step, so a finished run always
holds its final values.
"""

from __future__ import annotations

import lightning as L


def is_last_training_step(trainer: L.Trainer) -> bool:
    """Whether the optimizer step just taken ends the fit (``max_steps`` reached, or the last
    batch of the last epoch)."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    return bool(trainer.is_last_batch) and max_epochs is not None and max_epochs > 0 \
        and trainer.current_epoch + 1 >= max_epochs


def logs_step_values(trainer: L.Trainer | None, every_n_steps: int | None = None) -> bool:
    """Whether values of the training step just taken are wanted: after every ``every_n_steps``
    optimizer steps (default: the trainer's ``log_every_n_steps``, Lightning's own rule, so the
    loggers write exactly these steps), on the steps a callback reads them (a callback says so
    with ``train_values_every(trainer) -> int | None``: ``ProgressLog``, ``RunReport``) and after
    the last step. Without a trainer (a module driven by hand): always."""
    if trainer is None:
        return True
    cadences = {every_n_steps or trainer.log_every_n_steps}
    for callback in getattr(trainer, "callbacks", ()):
        reader = getattr(callback, "train_values_every", None)
        if callable(reader) and (n := reader(trainer)):
            cadences.add(n)
    return any(trainer.global_step % n == 0 for n in cadences) or is_last_training_step(trainer)
