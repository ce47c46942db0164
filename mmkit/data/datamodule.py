"""The LightningDataModule every mmkit recipe uses: up to four image–text sources, one
preprocessing supplied by the model, and loaders that split data across ranks and workers."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mmkit import distributed
from mmkit.config_checks import Range, check_settings
from mmkit.data.collate import ImageTextCollate
from mmkit.data.loaders import build_loader
from mmkit.data.preprocessing import Preprocessing
from mmkit.data.sampler import DistributedBatchSampler


class ImageTextDataModule(L.LightningDataModule):
    """Image–text data for training, validation, test and prediction.

    Each rank reads a disjoint part of every source, each sample once per epoch, with the same
    number of batches on every rank (for shard streams: set their ``samples_per_epoch``). Map-style
    sources use ``DistributedBatchSampler``, which Lightning leaves in place, so
    ``Trainer(use_distributed_sampler=...)`` does not matter (False is the tidy setting).

    Args:
        train: Training source (ManifestDataset, WebDatasetShards, HFImageTextDataset,
            SyntheticShapes, ...), or None.
        val: Validation source, or None.
        test: Test source, or None.
        predict: Prediction source, or None.
        batch_size: Training samples per batch on each rank.
        eval_batch_size: Samples per batch on each rank for val/test/predict; default: batch_size.
        num_workers: DataLoader worker processes per rank (0 = load in the main process).
        pin_memory: Pin batches in page-locked memory (faster host-to-GPU copies).
        persistent_workers: Keep workers alive between epochs (needs num_workers > 0).
        drop_last: Drop the final partial global training batch (evaluation never drops).
        seed: Seed for the training order; the same on every rank.
        max_bad_fraction: Largest tolerated fraction of skipped (bad) samples; enforced by
            ``mmkit.callbacks.bad_samples.BadSampleCallback``.
        preprocessing: A ``mmkit.data.Preprocessing`` (image transforms and tokenizer), supplied by
            the model at run time (linked by the CLI, or ``set_preprocessing``), never written in
            YAML. Typed ``Any`` because jsonargparse cannot check an instance against a Protocol.
        train_augment: Use the model's training transform (augmentation) for the train source.
    """

    setting_ranges = {
        "batch_size": Range(ge=1, integer=True),
        "eval_batch_size": Range(ge=1, integer=True, none="batch_size"),
        "num_workers": Range(ge=0, integer=True),
        "seed": Range(ge=0, integer=True),  # numpy's SeedSequence takes non-negative seeds only
        "max_bad_fraction": Range(ge=0, le=1),
    }

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        predict: Dataset | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        max_bad_fraction: float = 0.05,
        preprocessing: Any = None,
        train_augment: bool = True,
    ) -> None:
        check_settings(self, locals(), ImageTextDataModule.setting_ranges)
        super().__init__()
        self.train, self.val, self.test, self.predict = train, val, test, predict
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.drop_last = drop_last
        self.seed = seed
        self.max_bad_fraction = max_bad_fraction
        self.preprocessing = preprocessing
        self.train_augment = train_augment
        self.train_sampler: DistributedBatchSampler | None = None
        self._pending_state: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        distributed.destroy_group_at_exit()  # a data-only user's run also exits cleanly

    def set_preprocessing(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing

    def train_dataloader(self) -> DataLoader:
        if self.train is None:
            raise ValueError("ImageTextDataModule: no train source configured")
        loader = self._loader(self.train, train=True)
        self.train_sampler = loader.sampler if isinstance(loader.sampler, DistributedBatchSampler) else None
        if self.train_sampler is not None:
            if self._pending_state is not None:
                # sets the epoch too: on resume this runs before Lightning restores its epoch count
                self.train_sampler.load_state_dict(self._pending_state)
            elif self.trainer is not None:
                # Lightning starts the loader (and workers prefetch) before it calls set_epoch
                self.train_sampler.set_epoch(self.trainer.current_epoch)
        self._pending_state = None
        return loader

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val, train=False) if self.val is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader(self.test, train=False) if self.test is not None else []

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader(self.predict, train=False) if self.predict is not None else []

    def state_dict(self) -> dict[str, Any]:
        """The train sampler's position (epoch, batches trained in it), for mid-epoch resume.

        While fitting, the position is the training loop's count of batches trained in this
        epoch, not the sampler's: DataLoader workers and Lightning prefetch batches that are not
        trained yet when a checkpoint is written, and a resume must not skip them.
        """
        if self.train_sampler is None:
            return {"train_sampler": self._pending_state} if self._pending_state is not None else {}
        state = self.train_sampler.state_dict()
        trained = self._batches_trained_this_epoch()
        if trained is not None:
            state["batches_consumed"] = trained
        return {"train_sampler": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores this before it builds the loaders: keep it for the sampler that the
        # next train_dataloader() builds (an existing one, from an earlier fit, is replaced then).
        sampler_state = state_dict.get("train_sampler")
        if sampler_state is None:
            return
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(sampler_state)
            fit_loop = getattr(self.trainer, "fit_loop", None)
            if getattr(fit_loop, "_combined_loader", None) is not None:
                # Strategies that restore after setup (FSDP, DeepSpeed, ModelParallel) built the
                # loader, and started its iterator, before this: make Lightning build it again.
                fit_loop._combined_loader = None
        self._pending_state = sampler_state

    def _batches_trained_this_epoch(self) -> int | None:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit" or self.train_sampler.epoch != trainer.current_epoch:
            return None
        # `processed` counts a batch once its training step is done: right in on_train_batch_end
        # (where step checkpoints are written), after validation and at the epoch's end.
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        if self.preprocessing is None:
            raise ValueError(
                "ImageTextDataModule has no preprocessing: call set_preprocessing(model.preprocessing) "
                "or link model.preprocessing to data.preprocessing in the CLI"
            )
        rank, world_size = self._rank_world()
        collate = ImageTextCollate(
            self.preprocessing.image_transform(train=train and self.train_augment),
            self.preprocessing.tokenize,
            extra_views=self._extra_views(train),
        )
        return build_loader(
            dataset,
            collate,
            batch_size=self.batch_size if train else self.eval_batch_size,
            rank=rank,
            world_size=world_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            seed=self.seed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            epoch_fn=self._trainer_epoch if isinstance(dataset, IterableDataset) else None,
        )

    def _extra_views(self, train: bool) -> dict | None:
        # A preprocessing may offer extra named inputs (``extra_views``: name -> preprocessing),
        # e.g. a distillation teacher's own transform and tokenizer; the collate function then
        # adds ``<name>_images`` / ``<name>_texts`` to every batch.
        views = getattr(self.preprocessing, "extra_views", None) or {}
        augment = train and self.train_augment
        return {name: (view.image_transform(train=augment), view.tokenize) for name, view in views.items()} or None

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return distributed.rank(), distributed.world_size()

    def _trainer_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None
