"""Two real processes (gloo on localhost), two DataLoader workers each: every sample is seen
exactly once per epoch and both ranks get the same number of batches."""

import collections

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from datafakes import FakePreprocessing, make_shards
from dist_utils import run_on_processes
from mmkit import distributed
from mmkit.data.collate import ImageTextCollate
from mmkit.data.loaders import build_loader
from mmkit.data.sources import SyntheticShapes, WebDatasetShards

SHARD_SIZES = [4, 7, 2, 5, 3, 6]


def _gather_epoch(loader):
    batches = [b["index"].tolist() for b in loader]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, batches)
    return everyone  # per rank: list of batches of indices


def _check_once(per_rank, expected):
    counts = collections.Counter(i for batches in per_rank for b in batches for i in b)
    assert sorted(counts) == sorted(expected) and set(counts.values()) == {1}, counts


def _run(rank, world, shard_pattern):
    # A spawned process inherits "spawn" as its default start method, so its DataLoader workers
    # would re-import everything; torchrun and Lightning's DDP start processes where fork is the
    # default on Linux, so use that here too.
    mp.set_start_method("fork", force=True)
    prep = FakePreprocessing()
    collate = ImageTextCollate(prep.image_transform(train=True), prep.tokenize)
    common = dict(rank=distributed.rank(), world_size=distributed.world_size(), num_workers=2)

    train = build_loader(SyntheticShapes(size=37, seed=0, image_size=32), collate, batch_size=4, shuffle=True, **common)
    orders = []
    for epoch in range(2):
        train.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
        per_rank = _gather_epoch(train)
        _check_once(per_rank, range(37))
        assert [len(b) for b in per_rank] == [5, 5]  # ceil(37 / (4 * 2)) batches on each rank
        orders.append(per_rank)
    assert orders[0] != orders[1]
    val = build_loader(SyntheticShapes(size=11, seed=1, image_size=32), collate, batch_size=4, shuffle=False, **common)
    _check_once(_gather_epoch(val), range(11))

    # shards: one pass splits them over 2 ranks x 2 workers; the loader advances the shard epoch
    shards = build_loader(WebDatasetShards(shard_pattern, seed=0), collate, batch_size=3, shuffle=True, **common)
    expected = [s * 1_000_000 + i for s, n in enumerate(SHARD_SIZES) for i in range(n)]
    epochs = [_gather_epoch(shards) for _ in range(2)]
    for per_rank in epochs:
        _check_once(per_rank, expected)
    assert epochs[0] != epochs[1]
    # with an epoch length, ranks get equal batch counts whatever the shard sizes
    fixed = build_loader(WebDatasetShards(shard_pattern, seed=0, samples_per_epoch=20), collate, batch_size=3,
                         shuffle=True, **common)
    per_rank = _gather_epoch(fixed)
    assert [len(b) for b in per_rank] == [len(fixed)] * 2 == [4, 4]
    assert [sum(map(len, b)) for b in per_rank] == [10, 10]


@pytest.mark.slow
def test_two_processes_two_workers_each_see_every_sample_once(tmp_path):
    make_shards(tmp_path, SHARD_SIZES)
    run_on_processes(_run, 2, str(tmp_path / "shard-{000..005}.tar"))
