"""Assembles a DataLoader for any mmkit source so that every rank and worker reads its own part.

Map-style sources get a DistributedBatchSampler; shard streams split themselves across ranks and
workers and only need to be told the rank, batch size and epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, Dataset, IterableDataset

from mmkit.data.sampler import DistributedBatchSampler
from mmkit.data.workers import (
    SeededCollate, SeededSamples, end_at_exit, ignore_stop_signals, seeded_rngs,
)


class BatchFetch(Dataset):
    """Dataset view indexed by a list of indices, for a DataLoader with ``batch_size=None`` whose
    sampler yields whole batches: each worker receives a batch's indices and collates them.
    Indices that carry a seed (``IndexBatch``) are loaded under it, for exact resume."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> list[Any]:
        seed = getattr(indices, "seed", None)
        with seeded_rngs(seed):
            samples = [self.dataset[i] for i in indices]
        return samples if seed is None else SeededSamples(samples, seed)


class WorkerLoader(DataLoader):
    """DataLoader whose worker processes (which ignore SIGTERM: ``ignore_stop_signals``) are
    SIGKILLed if still running when this process exits, instead of waited for forever."""

    def __iter__(self):
        iterator = super().__iter__()
        if self.num_workers > 0:
            end_at_exit(getattr(iterator, "_workers", ()))  # torch's multi-process iterator's
        return iterator


class EpochAwareDataLoader(WorkerLoader):
    """DataLoader that tells its iterable dataset the epoch each time an epoch starts.

    Lightning calls ``set_epoch`` only on samplers, and iterable datasets have none, so shard
    shuffling would repeat every epoch. ``epoch_fn`` (e.g. the trainer's current epoch) wins over
    counting the loader's own passes, so a resumed run continues the right shard order.
    """

    def __init__(self, *args: Any, epoch_fn: Callable[[], int | None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_fn = epoch_fn
        self._passes = 0

    def __iter__(self):
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        self.dataset.set_epoch(self._passes if epoch is None else epoch)
        self._passes += 1
        return super().__iter__()


def build_loader(
    dataset: Dataset,
    collate_fn: Callable,
    batch_size: int,
    rank: int,
    world_size: int,
    shuffle: bool,
    drop_last: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    epoch_fn: Callable[[], int | None] | None = None,
) -> DataLoader:
    """A loader yielding this rank's batches of ``dataset``, each sample once per epoch.

    ``shuffle``, ``seed`` and ``drop_last`` apply to map-style sources; shard streams carry their
    own shuffling settings.
    """
    common = dict(
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_distributed"):
            dataset.set_distributed(rank, world_size, batch_size)
            dataset.check_split(world_size, num_workers)
        if hasattr(dataset, "set_epoch"):
            return EpochAwareDataLoader(dataset, batch_size=batch_size, epoch_fn=epoch_fn, **common)
        return WorkerLoader(dataset, batch_size=batch_size, **common)  # a foreign stream splits itself
    if drop_last and len(dataset) < batch_size * world_size:
        raise ValueError(
            f"batch_size={batch_size} × {world_size} rank(s) = {batch_size * world_size} is larger than the "
            f"{len(dataset)} samples of {type(dataset).__name__} {getattr(dataset, 'path', '')}".rstrip()
            + ": with drop_last=True no training batch would be produced; lower data.batch_size or set drop_last: false"
        )
    sampler = DistributedBatchSampler(
        dataset, batch_size, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    common["collate_fn"] = SeededCollate(collate_fn)  # augmentation seeded per batch: exact resume
    return WorkerLoader(BatchFetch(dataset), sampler=sampler, batch_size=None, **common)
