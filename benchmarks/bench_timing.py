"""Timing probes used by clip_vs_open_clip.py, the same measurement for both trainers.

``EpochTimer`` (a Lightning callback for the mmkit run) and ``time_open_clip_epochs`` (a wrapper
around open_clip_train's ``train_one_epoch``) record, per training epoch, the wall time from
the start of the epoch (before the DataLoader iterator and its worker start) to the end of its
last optimizer step, and the CPU time the trainer process (all its threads; the DataLoader
worker is a separate process) and its main thread spent in that span: CPU time is far less
sensitive than wall time to other jobs on a shared machine. Validation and checkpoint saving are outside that span in both trainers.
Both also record a checksum of the freshly initialised weights, to show whether the two runs
start from the same model. Nothing here changes what either trainer computes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def param_checksum(model) -> dict:
    import torch

    with torch.no_grad():
        params = dict(model.named_parameters())
        total = sum(float(p.double().sum()) for p in params.values())
        sq = sum(float(p.double().pow(2).sum()) for p in params.values())
    return {"num_params": sum(p.numel() for p in params.values()), "sum": total, "sum_sq": sq,
            "torch_threads": torch.get_num_threads()}


try:  # the open_clip venv has no Lightning; only the mmkit run needs the callback
    import lightning as L
except ImportError:
    L = None

if L is not None:

    class EpochTimer(L.Callback):
        """Lightning callback; writes ``{"epochs": [{"seconds", "batches", "samples"}], "init": ...}``
        to ``path`` after every training epoch."""

        def __init__(self, path: str) -> None:
            self.path = Path(path)
            self.record: dict = {"epochs": [], "init": None}
            self._start = self._last_end = None
            self._batches = self._samples = 0

        def on_fit_start(self, trainer, pl_module) -> None:
            # configure_model() has run: these are the initial weights.
            self.record["init"] = param_checksum(pl_module.model.clip)

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start, self._batches, self._samples = time.perf_counter(), 0, 0
            self._cpu0, self._thread0 = time.process_time(), time.thread_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._last_end = time.perf_counter()
            self._cpu1, self._thread1 = time.process_time(), time.thread_time()
            self._batches += 1
            self._samples += int(batch["images"].shape[0])

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.record["epochs"].append(
                {"seconds": self._last_end - self._start, "batches": self._batches, "samples": self._samples,
                 "process_cpu_s": self._cpu1 - self._cpu0, "main_thread_cpu_s": self._thread1 - self._thread0}
            )
            self.path.write_text(json.dumps(self.record))


def time_open_clip_epochs(main_module, path: str) -> None:
    """Wrap ``open_clip_train.main.train_one_epoch`` / ``create_model_and_transforms`` in place."""
    out = Path(path)
    record: dict = {"epochs": [], "init": None}
    train_one_epoch = main_module.train_one_epoch
    create = main_module.create_model_and_transforms

    def timed_create(*args, **kwargs):
        result = create(*args, **kwargs)
        record["init"] = param_checksum(result[0])
        return result

    def timed_train_one_epoch(model, data, *args, **kwargs):
        loader = data["train"].dataloader
        start, cpu0, thread0 = time.perf_counter(), time.process_time(), time.thread_time()
        train_one_epoch(model, data, *args, **kwargs)
        record["epochs"].append(
            {"seconds": time.perf_counter() - start, "batches": loader.num_batches,
             "samples": loader.num_batches * loader.batch_size,
             "process_cpu_s": time.process_time() - cpu0, "main_thread_cpu_s": time.thread_time() - thread0}
        )
        out.write_text(json.dumps(record))

    main_module.train_one_epoch = timed_train_one_epoch
    main_module.create_model_and_transforms = timed_create
