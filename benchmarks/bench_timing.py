"""Timing probes used by clip_vs_open_clip.py, the same measurement for every trainer.

``EpochTimer`` (a Lightning callback for the mmkit run), ``time_open_clip_epochs`` (a wrapper
around open_clip_train's ``train_one_epoch``) and ``LoopTimer`` (calls placed in the hand-written
loop, hand_written_loop.py) record, per training epoch, the wall time from
the start of the epoch (before the DataLoader iterator and its worker start) to the end of its
last optimizer step, and the CPU time the trainer process (all its threads; the DataLoader
worker is a separate process) and its main thread spent in that span: CPU time is far less
sensitive than wall time to other jobs on a shared machine. Validation and checkpoint saving are
outside that span in every trainer. All three also record a checksum of the freshly initialised
weights, to show whether the runs start from the same model. Nothing here changes what any
trainer computes.
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


def _epoch_record(start: float, last_end: float, batches: int, samples: int, cpu: float, thread: float) -> dict:
    return {"seconds": last_end - start, "batches": batches, "samples": samples,
            "process_cpu_s": cpu, "main_thread_cpu_s": thread}


class LoopTimer:
    """The probe for a plain PyTorch loop: ``init(model)`` once the model is built,
    ``epoch_start()`` before the epoch's DataLoader iterator is created, ``batch_end(n)`` after each
    optimizer step (n samples), ``epoch_end()``. Writes the same record as ``EpochTimer``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.record: dict = {"epochs": [], "init": None}

    def init(self, model) -> None:
        self.record["init"] = param_checksum(model)

    def epoch_start(self) -> None:
        self._start, self._batches, self._samples = time.perf_counter(), 0, 0
        self._cpu0, self._thread0 = time.process_time(), time.thread_time()

    def batch_end(self, samples: int) -> None:
        self._last_end = time.perf_counter()
        self._cpu1, self._thread1 = time.process_time(), time.thread_time()
        self._batches += 1
        self._samples += int(samples)

    def epoch_end(self) -> None:
        self.record["epochs"].append(_epoch_record(self._start, self._last_end, self._batches, self._samples,
                                                   self._cpu1 - self._cpu0, self._thread1 - self._thread0))
        self.path.write_text(json.dumps(self.record))


def _define_epoch_timer():
    import lightning as L

    class EpochTimer(L.Callback):
        """Lightning callback; writes ``{"epochs": [{"seconds", "batches", "samples"}], "init": ...}``
        to ``path`` after every training epoch."""

        def __init__(self, path: str) -> None:
            self.probe = LoopTimer(path)

        def on_fit_start(self, trainer, pl_module) -> None:
            # configure_model() has run: these are the initial weights.
            self.probe.init(pl_module.model.clip)

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.probe.epoch_start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.probe.batch_end(int(batch["images"].shape[0]))

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.probe.epoch_end()

    EpochTimer.__qualname__ = "EpochTimer"  # so bench_timing.EpochTimer names it (jsonargparse)
    return EpochTimer


def __getattr__(name: str):
    # Lightning is imported only when the mmkit run asks for the callback: the open_clip venv has
    # no Lightning, and the hand-written loop should not pay its import time (~10 s here).
    if name == "EpochTimer":
        cls = globals()["EpochTimer"] = _define_epoch_timer()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        record["epochs"].append(_epoch_record(
            start, time.perf_counter(), loader.num_batches, loader.num_batches * loader.batch_size,
            time.process_time() - cpu0, time.thread_time() - thread0,
        ))
        out.write_text(json.dumps(record))

    main_module.train_one_epoch = timed_train_one_epoch
    main_module.create_model_and_transforms = timed_create
