import pytest

from mmkit.data import DistributedBatchSampler


def _epoch(size, batch_size, world, epoch=0, **kw):
    samplers = [DistributedBatchSampler(size, batch_size, rank=r, world_size=world, **kw) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers], samplers


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("size", [1, 2, 5, 7, 8, 9, 16, 23, 64, 101])
def test_every_index_exactly_once_with_equal_batch_counts(size, world):
    per_rank, samplers = _epoch(size, 4, world, shuffle=True, seed=1)
    seen = [i for batches in per_rank for b in batches for i in b]
    assert sorted(seen) == list(range(size))
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1 and counts == {len(s) for s in samplers}
    # only the last batch may be short, and ranks' last batches differ by at most one
    for batches in per_rank:
        assert all(len(b) == 4 for b in batches[:-1])
    last = [len(batches[-1]) for batches in per_rank]
    assert max(last) - min(last) <= 1


def test_shuffle_depends_on_seed_and_epoch_and_is_equal_across_ranks():
    a, _ = _epoch(50, 5, 2, epoch=0, seed=0)
    b, _ = _epoch(50, 5, 2, epoch=1, seed=0)
    c, _ = _epoch(50, 5, 2, epoch=0, seed=0)
    assert a == c and a != b
    plain, _ = _epoch(10, 5, 1, shuffle=False)
    assert plain == [[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]]


def test_drop_last_drops_only_the_final_partial_global_batch():
    per_rank, samplers = _epoch(23, 4, 2, drop_last=True)
    assert [len(b) for b in per_rank] == [2, 2] and all(len(x) == 4 for b in per_rank for x in b)
    assert len({i for b in per_rank for x in b for i in x}) == 16
    exact, _ = _epoch(24, 4, 2, drop_last=True)
    assert sum(len(x) for b in exact for x in b) == 24
    assert samplers[0].num_samples == 8


def test_resume_mid_epoch_continues_with_the_remaining_batches():
    full, _ = _epoch(37, 3, 2, epoch=4, seed=7)
    for rank in (0, 1):
        s = DistributedBatchSampler(37, 3, rank=rank, world_size=2, seed=7)
        s.set_epoch(4)
        it = iter(s)
        first = [next(it) for _ in range(2)]
        state = s.state_dict()
        assert state["epoch"] == 4 and state["batches_consumed"] == 2

        resumed = DistributedBatchSampler(37, 3, rank=rank, world_size=2, seed=7)
        resumed.load_state_dict(state)
        # len stays the epoch's: Lightning counts the batches trained before the resume itself
        assert len(resumed) == len(full[rank])
        assert first + list(resumed) == full[rank]
        # the restored position applies to that pass only; the next epoch is whole again
        resumed.set_epoch(5)
        assert len(list(resumed)) == len(full[rank])


def test_resume_with_a_different_world_size_only_at_epoch_boundary():
    s = DistributedBatchSampler(40, 4, rank=0, world_size=2)
    list(s)
    finished = s.state_dict()
    other = DistributedBatchSampler(40, 4, rank=0, world_size=4)
    other.load_state_dict(finished)  # epoch 0 was complete: continue with a whole epoch 1
    assert other.epoch == 1 and len(other) == 3 and len(list(other)) == 3
    it = iter(s)
    next(it)
    with pytest.raises(ValueError, match="cannot resume mid-epoch"):
        other.load_state_dict(s.state_dict())
