import collections
import os
import tarfile

import pytest
from torch.utils.data import DataLoader

from datafakes import FakePreprocessing, make_shards, shard_samples, write_shard_tarfile, write_shard_webdataset
from mmkit.data import BadSample, BadSampleTracker, ImageTextCollate, WebDatasetShards, build_loader


def _collate():
    p = FakePreprocessing()
    return ImageTextCollate(p.image_transform(train=False), p.tokenize)


def _read(ds, rank=0, world=1, workers=0, batch_size=4, epoch=0):
    """All batches one rank's loader yields in one epoch."""
    ds.set_distributed(rank, world, batch_size)
    ds.set_epoch(epoch)
    return list(DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate()))


def _indices(batches):
    return [i for b in batches for i in b["index"].tolist()]


@pytest.mark.parametrize("writer", [write_shard_tarfile, write_shard_webdataset])
def test_reads_shards_from_tarfile_and_webdataset_writers(tmp_path, writer):
    make_shards(tmp_path, [3, 2], writer=writer)
    ds = WebDatasetShards(str(tmp_path / "shard-{000..001}.tar"), shuffle_shards=False)
    samples = list(ds)
    assert [s["caption"] for s in samples] == [f"shard {s} item {i}" for s, n in [(0, 3), (1, 2)] for i in range(n)]
    assert [s["index"] for s in samples] == [0, 1, 2, 1_000_000, 1_000_001]
    assert [s["label"] for s in samples] == [0, 1, 2, 0, 1]
    assert samples[0]["image"].mode == "RGB" and samples[0]["image_id"] == samples[0]["index"]


def test_brace_and_glob_expansion(tmp_path):
    make_shards(tmp_path, [1, 1, 1, 1])
    assert len(WebDatasetShards(str(tmp_path / "shard-{000..003}.tar")).shards) == 4
    assert len(WebDatasetShards(str(tmp_path / "shard-{001,003}.tar")).shards) == 2
    assert len(WebDatasetShards(str(tmp_path / "shard-*.tar")).shards) == 4
    with pytest.raises(FileNotFoundError, match="no shard found"):
        WebDatasetShards(str(tmp_path / "nope-{000..003}.tar"))


def test_split_across_ranks_and_workers_without_duplicates(tmp_path):
    make_shards(tmp_path, [5, 3, 4, 6, 2])
    ds = WebDatasetShards(str(tmp_path / "shard-{000..004}.tar"), seed=3)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            seen += _indices(_read(ds, rank, 2, workers=2, epoch=epoch))
        assert sorted(seen) == sorted(s * 1_000_000 + i for s, n in enumerate([5, 3, 4, 6, 2]) for i in range(n))
    # the shard order changes with the epoch
    orders = {tuple(_indices(_read(ds, 0, 1, epoch=e))) for e in range(4)}
    assert len(orders) > 1


def test_too_few_shards_for_ranks_times_workers_is_a_clear_error(tmp_path):
    make_shards(tmp_path, [2, 2, 2])
    ds = WebDatasetShards(str(tmp_path / "shard-*.tar"))
    with pytest.raises(ValueError, match=r"3 shard\(s\) cannot be split across 2 rank\(s\) x 2 worker\(s\) = 4"):
        build_loader(ds, _collate(), batch_size=2, rank=0, world_size=2, shuffle=True, num_workers=2)


def test_samples_per_epoch_gives_equal_exact_batch_counts_per_rank(tmp_path):
    make_shards(tmp_path, [7, 1, 5, 2])  # very uneven shards
    ds = WebDatasetShards(str(tmp_path / "shard-*.tar"), samples_per_epoch=22)
    counts = []
    for rank in (0, 1):
        loader = build_loader(ds, _collate(), batch_size=4, rank=rank, world_size=2, shuffle=True, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader) == 3  # 11 per rank -> 4 + 4 + 3
        counts.append(sum(len(b["index"]) for b in batches))
    assert counts == [11, 11]


def test_weighted_mixture_of_sources(tmp_path):
    make_shards(tmp_path / "a", [50, 50], prefix="a")
    make_shards(tmp_path / "b", [50, 50], prefix="b")
    ds = WebDatasetShards([str(tmp_path / "a/a-{000..001}.tar"), str(tmp_path / "b/b-{000..001}.tar")],
                          weights=[3, 1], resampled=True, samples_per_epoch=400, seed=1)
    # source is recoverable from the index: shards 0-1 are source a, 2-3 are source b
    sources = collections.Counter(i // 1_000_000 < 2 for i in _indices(_read(ds, batch_size=50)))
    assert 0.65 < sources[True] / 400 < 0.85
    # without resampling every sample still comes exactly once, just interleaved
    once = WebDatasetShards([str(tmp_path / "a/a-*.tar"), str(tmp_path / "b/b-*.tar")], weights=[3, 1])
    idx = _indices(_read(once, batch_size=50))
    assert len(idx) == len(set(idx)) == 200
    assert sum(i // 1_000_000 < 2 for i in idx[:100]) > 60  # source a dominates early on


def test_resampled_draws_with_replacement_for_samples_per_epoch(tmp_path):
    make_shards(tmp_path, [3, 3])
    ds = WebDatasetShards(str(tmp_path / "shard-*.tar"), resampled=True, samples_per_epoch=40)
    idx = _indices(_read(ds, batch_size=8, workers=2))
    assert len(idx) == 40 and len(set(idx)) <= 6
    assert idx == _indices(_read(ds, batch_size=8, workers=2))  # seeded
    assert idx != _indices(_read(ds, batch_size=8, workers=2, epoch=1))
    with pytest.raises(ValueError, match="set samples_per_epoch"):
        WebDatasetShards(str(tmp_path / "shard-*.tar"), resampled=True)


def test_bad_members_and_truncated_tar_are_skipped_and_counted(tmp_path):
    samples = shard_samples(0, 6)
    samples[1]["jpg"] = os.urandom(100)  # undecodable image
    samples[2]["txt"] = "  "  # empty caption
    del samples[3]["txt"]  # no caption member
    samples[4]["jpg"] = b""  # zero-byte image
    good = tmp_path / "good.tar"
    write_shard_tarfile(good, samples)
    # a second shard cut in the middle of its third sample's image
    whole = tmp_path / "whole.tar"
    write_shard_tarfile(whole, shard_samples(1, 4))
    with tarfile.open(whole) as t:
        cut_at = t.getmember("0010002.jpg").offset_data + 10
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:cut_at])

    ds = WebDatasetShards(f"{good}::{tmp_path / 'cut.tar'}", shuffle_shards=False)  # one source, two shards
    items = list(ds)
    bad = [s.reason for s in items if isinstance(s, BadSample)]
    good_idx = [s["index"] for s in items if not isinstance(s, BadSample)]
    assert good_idx == [0, 5, 1_000_000, 1_000_001]
    assert len(bad) == 5
    assert f"{good} sample '0000001' (#1): image '0000001.jpg' cannot be decoded" in bad[0]
    assert "'0000002' (#2): empty caption" in bad[1]
    assert "'0000003' (#3): no .txt caption member" in bad[2]
    assert "'0000004' (#4): image '0000004.jpg' is empty" in bad[3]
    assert "cut.tar sample '0010002' (#2): cannot be read" in bad[4]

    batch = _collate()(items)
    assert batch["num_skipped"] == 5 and batch["index"].tolist() == good_idx


def test_missing_shard_is_counted_not_fatal(tmp_path):
    make_shards(tmp_path, [2])
    ds = WebDatasetShards([str(tmp_path / "shard-{000..001}.tar")], shuffle_shards=False)
    items = list(ds)
    assert len(items) == 3 and isinstance(items[2], BadSample) and "shard-001.tar shard: cannot be read" in items[2].reason


def test_epoch_reaches_persistent_workers(tmp_path):
    make_shards(tmp_path, [2, 2, 2, 2])
    ds = WebDatasetShards(str(tmp_path / "shard-*.tar"), seed=0)
    loader = build_loader(ds, _collate(), batch_size=2, rank=0, world_size=1, shuffle=True, num_workers=2,
                          persistent_workers=True)
    orders = [tuple(_indices(loader)) for _ in range(3)]  # epochs 0, 1, 2 via the loader's own pass count
    fresh = []
    for e in range(3):
        ds2 = WebDatasetShards(str(tmp_path / "shard-*.tar"), seed=0)
        fresh.append(tuple(_indices(_read(ds2, batch_size=2, workers=2, epoch=e))))
    assert orders == fresh and len(set(orders)) > 1


def test_json_labels_and_shuffle_buffer(tmp_path):
    samples = shard_samples(0, 12)
    for i, s in enumerate(samples):
        del s["cls"]
        s["json"] = f'{{"label": {i % 4}}}'
    write_shard_webdataset(tmp_path / "j.tar", samples)
    plain = list(WebDatasetShards(str(tmp_path / "j.tar")))
    assert [s["label"] for s in plain] == [i % 4 for i in range(12)]
    mixed = [s["index"] for s in WebDatasetShards(str(tmp_path / "j.tar"), shuffle_buffer=5)]
    assert sorted(mixed) == list(range(12)) and mixed != list(range(12))


def test_class_names_for_cls_labels_from_a_list_or_a_classnames_file(tmp_path):
    shards = make_shards(tmp_path, [4])
    names = tmp_path / "classnames.txt"
    names.write_text("tench\ngoldfish\n\ngreat white shark\n")
    assert WebDatasetShards(shards[0], class_names=str(names)).class_names == ["tench", "goldfish", "great white shark"]
    assert WebDatasetShards(shards[0], class_names=["a", "b"]).class_names == ["a", "b"]
    assert WebDatasetShards(shards[0]).class_names is None
    with pytest.raises(FileNotFoundError, match="class_names='nope.txt' is neither a list nor a file"):
        WebDatasetShards(shards[0], class_names="nope.txt")


@pytest.mark.parametrize("writer", [write_shard_tarfile, write_shard_webdataset])
def test_shard_cut_at_a_block_boundary_is_counted(tmp_path, writer):
    """tarfile stops silently when a file ends exactly between two 512-byte blocks: the shard
    would look shorter. A missing end-of-archive marker is reported as a bad item instead."""
    whole = tmp_path / "whole.tar"
    writer(whole, shard_samples(0, 4))
    with tarfile.open(whole) as t:
        cut_at = min(m.offset for m in t.getmembers() if m.name.startswith("0000002."))  # the third sample's first header
    assert cut_at % 512 == 0
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:cut_at])
    items = list(WebDatasetShards(str(tmp_path / "cut.tar"), shuffle_shards=False))
    good = [s["index"] for s in items if not isinstance(s, BadSample)]
    bad = [s.reason for s in items if isinstance(s, BadSample)]
    assert good == [0, 1]
    assert len(bad) == 1 and "cut.tar: ends after sample '0000001' (#1) without tar's end-of-archive blocks" in bad[0]
    # An intact shard reports nothing.
    assert not [s for s in WebDatasetShards(str(whole), shuffle_shards=False) if isinstance(s, BadSample)]


def test_bad_shard_rows_met_again_are_counted_once(tmp_path):
    """Cycling over the shards to fill an epoch, and a second epoch, meet the same bad rows again:
    each carries its index (a missing shard its first position), so the tracker counts it once."""
    samples = shard_samples(0, 5)
    samples[1]["jpg"] = b""  # one bad row
    write_shard_tarfile(tmp_path / "shard-000.tar", samples)
    ds = WebDatasetShards(str(tmp_path / "shard-{000..001}.tar"), samples_per_epoch=18, seed=0)  # shard-001 is missing
    tracker = BadSampleTracker()
    visits = 0
    for epoch in (0, 1):
        for batch in _read(ds, batch_size=4, epoch=epoch):
            tracker.update(batch)
            visits += len(batch["index"]) + batch["num_skipped"]
    assert visits == 36
    assert (tracker.seen, tracker.skipped) == (6, 2)  # 5 rows and the missing shard; the bad row and the missing shard
    assert sorted(tracker.bad_rows.indices().tolist()) == [1, 1_000_000]
