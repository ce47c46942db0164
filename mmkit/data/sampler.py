"""Splits a map-style dataset into per-rank batches: each index exactly once per epoch, the same
number of batches on every rank, resumable mid-epoch.

torch's DistributedSampler pads the last batch by repeating samples, which double-counts them
in evaluation metrics; here the last global batch is split as evenly as possible instead, so the
ranks' last batches may differ in size by one but never in count (a rank with fewer batches
would leave DDP waiting in a collective).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from mmkit import distributed
from mmkit.data.workers import IndexBatch, batch_seed


class DistributedBatchSampler(DistributedSampler):
    """Yields lists of indices (one list per batch) for this rank.

    Global batch k is the slice ``[k*G, (k+1)*G)`` of the epoch's permutation, G = batch_size x
    world_size; rank r takes its ``batch_size`` share. The final partial global batch is split
    evenly over ranks (or dropped with ``drop_last``). DataLoader workers each fetch whole
    batches, so worker splitting needs nothing extra.

    Each batch is an ``IndexBatch``: its indices and a seed from (seed, epoch, batch, rank), under
    which ``BatchFetch`` loads and augments it, so a batch is the same whichever worker loads it
    and whether or not the run was resumed.

    Use it as ``DataLoader(BatchFetch(dataset), sampler=this, batch_size=None)``. Subclassing
    DistributedSampler (and being passed as ``sampler``) is deliberate: Lightning then neither
    replaces it (whatever ``use_distributed_sampler`` says) nor forgets to call ``set_epoch``.

    Args:
        data: The dataset (or its length).
        batch_size: Samples per batch on each rank.
        rank: This rank; default: from ``mmkit.distributed``.
        world_size: Number of ranks; default: from ``mmkit.distributed``.
        shuffle: Permute indices each epoch, seeded by ``seed + epoch``.
        seed: Must be equal on all ranks.
        drop_last: Drop the final partial global batch.
    """

    def __init__(
        self,
        data: int | Sized,
        batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        # DistributedSampler.__init__ is skipped on purpose: it computes a padded split; only
        # its public attributes are set so code that inspects samplers keeps working.
        size = data if isinstance(data, int) else len(data)
        world_size = distributed.world_size() if world_size is None else world_size
        rank = distributed.rank() if rank is None else rank
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"DistributedBatchSampler: bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.dataset = range(size)
        self.size = size
        self.batch_size = batch_size
        self.num_replicas = world_size
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        global_batch = batch_size * world_size
        self.num_batches = size // global_batch if drop_last else math.ceil(size / global_batch)
        self.total_size = min(size, self.num_batches * global_batch)
        self.num_samples = sum(len(self._rank_slice(k)) for k in range(self.num_batches))
        self._yielded = 0  # batches of the current epoch handed out so far
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) from load_state_dict

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        # The whole epoch even when resuming mid-epoch: Lightning restores its count of the batches
        # already trained in the epoch and stops the epoch when that count reaches this length.
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        start = self._skip()
        self._resume = None  # a restored position applies to one pass only
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        self._yielded = start
        for k in range(start, self.num_batches):
            positions = self._rank_slice(k)
            self._yielded = k + 1
            yield IndexBatch(order[positions.start : positions.stop], batch_seed(self.seed, self.epoch, k, self.rank))

    def _rank_slice(self, k: int) -> range:
        """Positions in the epoch order that global batch k gives this rank."""
        g = self.batch_size * self.num_replicas
        begin, n = k * g, min(g, self.total_size - k * g)
        base, extra = divmod(n, self.num_replicas)  # equals batch_size, 0 for every full batch
        lo = begin + self.rank * base + min(self.rank, extra)
        return range(lo, lo + base + (self.rank < extra))

    def _skip(self) -> int:
        if self._resume is not None and self._resume[0] == self.epoch:
            return min(self._resume[1], self.num_batches)
        return 0

    def state_dict(self) -> dict[str, Any]:
        """Epoch and batches of it handed out so far.

        With DataLoader workers the count runs ahead of what training consumed by up to
        ``num_workers * prefetch_factor`` batches (+1 that Lightning prefetches); overwrite
        ``batches_consumed`` with the training loop's own count before saving when exact resume
        matters (``ImageTextDataModule.state_dict`` does).
        """
        return {
            "epoch": self.epoch,
            "batches_consumed": self._yielded,
            "seed": self.seed,
            "size": self.size,
            "batch_size": self.batch_size,
            "world_size": self.num_replicas,
            "num_batches": self.num_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue epoch ``state["epoch"]`` after its first ``batches_consumed`` batches.

        A different layout (dataset size, batch size, world size) is fine at an epoch boundary but
        cannot continue mid-epoch: the remaining samples would not map onto the new batches.
        """
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        layout = {"size": self.size, "batch_size": self.batch_size, "world_size": self.num_replicas}
        saved = {k: state.get(k, v) for k, v in layout.items()}
        if saved != layout:
            if consumed >= state.get("num_batches", math.inf):
                consumed = self.num_batches  # saved epoch was finished
            elif consumed > 0:
                raise ValueError(
                    f"DistributedBatchSampler: cannot resume mid-epoch ({consumed} batches into epoch {epoch}) "
                    f"with a different layout: saved {saved}, now {layout}"
                )
        if consumed >= self.num_batches:
            # the saved epoch was complete: resume at the start of the next one, so loaders that
            # prefetch before set_epoch() is called do not replay an empty epoch
            epoch, consumed = epoch + 1, 0
        self.seed = state.get("seed", self.seed)
        self.epoch = epoch
        self._resume = (epoch, consumed) if consumed else None
        self._yielded = consumed
