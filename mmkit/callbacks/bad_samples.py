"""Watches the bad-sample counts that mmkit batches carry during training, validation and test:
logs them, shows the first reasons, and stops the run when too much of the data is unusable."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from mmkit import distributed
from mmkit.config_checks import Range, check_settings
from mmkit.data.bad_samples import BadSampleTracker
from mmkit.training.gathered_log import log_gathered


class BadSampleCallback(Callback):
    """Counts the distinct rows met and skipped in training batches on all ranks (a row met again,
    in a later epoch, as padding or after a resume, counts once) and raises ``BadDataError`` when
    the skipped fraction exceeds the limit.

    The rows each rank met are gathered every ``check_every_n_steps`` batches and at epoch end, so
    every rank reaches the same verdict at the same step (one rank raising alone would hang DDP).
    Validation and test splits are counted the same way, per pass over the split, logged as
    ``val/data_skipped`` (``test/...``) and held to the same limit; a split whose every sample is
    bad fails before its metrics are computed from nothing.

    Args:
        max_bad_fraction: Largest tolerated skipped fraction; default: the datamodule's
            ``max_bad_fraction`` (0.05 if it has none).
        min_samples: Do not judge before this many distinct rows were met (over all ranks); at
            the end of an epoch the rows met are judged however few.
        check_every_n_steps: Batches between count syncs, checks and logs.
        num_reasons: Skip reasons kept and printed.
    """

    setting_ranges = {
        "max_bad_fraction": Range(ge=0, le=1, none="the data module's"),
        "min_samples": Range(ge=0, integer=True),
        "check_every_n_steps": Range(ge=1, integer=True),
        "num_reasons": Range(ge=0, integer=True),
    }

    def __init__(
        self,
        max_bad_fraction: float | None = None,
        min_samples: int = 100,
        check_every_n_steps: int = 50,
        num_reasons: int = 5,
    ) -> None:
        check_settings(self, locals(), BadSampleCallback.setting_ranges)
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.check_every_n_steps = check_every_n_steps
        self.tracker = BadSampleTracker(max_reasons=num_reasons)  # totals over all ranks
        self._local = BadSampleTracker(max_reasons=num_reasons)  # this rank, since the last sync
        self._printed = 0
        self._reported_skipped = 0
        self._eval: dict[str, BadSampleTracker] = {}  # this rank's counts of the split being evaluated

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tracker.reset()
        self._local.reset()
        self._printed = 0
        self._reported_skipped = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(batch, dict) and "num_skipped" in batch:
            # A task stream's separate train sources each number their rows from 0.
            self._local.update(batch, int(getattr(trainer.datamodule, "train_row_offset", 0) or 0))
        if (batch_idx + 1) % self.check_every_n_steps == 0:
            self._sync(pl_module)
            pl_module.log_dict(
                {"data/skipped": float(self.tracker.skipped), "data/skipped_fraction": self.tracker.fraction},
                on_step=True, on_epoch=False,
            )
            self._check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        pl_module.log_dict(
            {"data/skipped": float(self.tracker.skipped), "data/skipped_fraction": self.tracker.fraction},
            on_step=False, on_epoch=True,
        )
        new = self.tracker.reasons[self._printed:]
        if self.tracker.skipped > self._reported_skipped:  # every epoch that found bad rows not met before
            message = self.tracker.summary(when="so far") + "."
            rank_zero_info(message + (" First reasons:\n  " + "\n  ".join(new) if new else ""))
            self._printed = len(self.tracker.reasons)
            self._reported_skipped = self.tracker.skipped
        # A whole epoch is no noisy first batch: judge it however few rows the data has (counting
        # distinct rows, a small file never reaches min_samples, however many epochs it runs).
        self._check(trainer, min_samples=0)

    # -- validation and test: the same rules, per pass over the split -------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval["val"] = BadSampleTracker(max_reasons=self.tracker.max_reasons)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval["test"] = BadSampleTracker(max_reasons=self.tracker.max_reasons)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(batch, dict) and "num_skipped" in batch and "val" in self._eval:
            self._eval["val"].update(batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(batch, dict) and "num_skipped" in batch and "test" in self._eval:
            self._eval["test"].update(batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning calls callbacks before the module's own epoch end, where the metrics are computed.
        self._finish_eval("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish_eval("test", trainer, pl_module)

    def _finish_eval(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        local = self._eval.pop(split, None)
        if local is None or trainer.sanity_checking:
            return
        total = BadSampleTracker(max_reasons=self.tracker.max_reasons)
        for part in distributed.all_gather_object(local.export()):
            total.add(**part)
        if total.skipped:
            log_gathered(pl_module, {f"{split}/data_skipped": float(total.skipped),  # gathered over ranks above
                                     f"{split}/data_skipped_fraction": total.fraction}, on_step=False, on_epoch=True)
            rank_zero_info(f"{split}: {total.summary()}. First reasons:\n  " + "\n  ".join(total.reasons))
        total.check(self._limit(trainer), self.min_samples, what=f"{split} rows", whole_split=True)

    def _sync(self, pl_module: L.LightningModule) -> None:
        # Every rank adds every rank's rows since the last sync: the same totals everywhere. Rows
        # go as index arrays (8 bytes a row, check_every_n_steps batches' worth).
        mine = self._local.export()
        if self.tracker.max_reasons <= len(self.tracker.reasons):  # reasons only while still wanted
            mine["reasons"] = []
        for part in distributed.all_gather_object(mine):
            self.tracker.add(**part)
        self._local.reset()

    def _check(self, trainer: L.Trainer, min_samples: int | None = None) -> None:
        self.tracker.check(self._limit(trainer), self.min_samples if min_samples is None else min_samples)

    def _limit(self, trainer: L.Trainer) -> float:
        if self.max_bad_fraction is not None:
            return self.max_bad_fraction
        return getattr(trainer.datamodule, "max_bad_fraction", 0.05) if trainer.datamodule is not None else 0.05
