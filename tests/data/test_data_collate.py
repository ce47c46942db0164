import numpy as np
import pytest
import torch

from datafakes import DictTokenizerPreprocessing, FakePreprocessing
from mmkit.data import BadDataError, BadSample, BadSampleTracker, ImageTextCollate, SyntheticShapes
from mmkit.data.bad_samples import RowSet


def test_batch_contract_with_tensor_and_dict_tokenizers():
    ds = SyntheticShapes(size=6, seed=0)
    samples = [ds[i] for i in range(6)]
    samples[2] = BadSample("x.csv row 2: image 'a.jpg' not found")
    for prep in (FakePreprocessing(), DictTokenizerPreprocessing()):
        batch = ImageTextCollate(prep.image_transform(train=True), prep.tokenize)(samples)
        assert batch["images"].shape == (5, 3, 32, 32) and batch["images"].dtype == torch.float32
        texts = batch["texts"] if isinstance(batch["texts"], torch.Tensor) else batch["texts"]["input_ids"]
        assert texts.shape[0] == 5 and texts.dtype == torch.long
        assert batch["index"].tolist() == [0, 1, 3, 4, 5] and batch["image_id"].tolist() == [0, 1, 3, 4, 5]
        assert batch["label"].tolist() == [samples[i]["label"] for i in (0, 1, 3, 4, 5)]
        assert batch["num_skipped"] == 1 and batch["skipped"] == ["x.csv row 2: image 'a.jpg' not found"]
        assert batch["skipped_index"] == [None]  # this BadSample gave no index


def test_empty_batch_uses_last_image_shape_and_failing_transform_is_a_skip():
    prep = FakePreprocessing()
    collate = ImageTextCollate(prep.image_transform(train=False), prep.tokenize, max_reasons=2)
    ds = SyntheticShapes(size=2)
    collate([ds[0]])
    empty = collate([BadSample(f"r{i}") for i in range(4)])
    assert empty["images"].shape == (0, 3, 32, 32) and empty["num_skipped"] == 4 and empty["skipped"] == ["r0", "r1"]

    def boom(image):
        raise RuntimeError("bad mode")

    batch = ImageTextCollate(boom, prep.tokenize)([ds[1]])
    assert batch["num_skipped"] == 1 and "sample 1: image transform failed (RuntimeError: bad mode)" in batch["skipped"][0]
    assert batch["skipped_index"] == [1]


def _batch(good: list[int], bad: list[int | None], reason: str = "") -> dict:
    return {"index": torch.tensor(good, dtype=torch.long), "num_skipped": len(bad), "skipped_index": bad,
            "skipped": [reason] * len(bad) if reason else []}


def test_tracker_counts_distinct_rows_and_bad_fraction_limit():
    t = BadSampleTracker(max_reasons=3)
    for i in range(10):
        t.update(_batch(list(range(10 * i, 10 * i + 9)), [10 * i + 9], f"f.csv row {10 * i + 9}: image missing"))
    assert (t.seen, t.skipped) == (100, 10) and t.fraction == pytest.approx(0.1)
    assert t.reasons == [f"f.csv row {10 * i + 9}: image missing" for i in range(3)]
    t.check(max_bad_fraction=0.1, min_samples=50)  # at the limit: fine
    t.check(max_bad_fraction=0.05, min_samples=200)  # too few rows to judge
    with pytest.raises(BadDataError) as e:
        t.check(max_bad_fraction=0.05, min_samples=50)
    msg = str(e.value)
    assert "10.0% of rows were skipped" in msg and "limit of 5.0%" in msg and "(10 of 100 rows)" in msg
    assert "f.csv row 9: image missing" in msg


def test_rows_met_again_count_once():
    """A second epoch, rank padding or a resume meets rows again: the counts are of distinct rows."""
    t = BadSampleTracker()
    for _ in range(3):  # three epochs over 8 rows, rows 2 and 5 bad
        t.update(_batch([0, 1, 3], [2]))
        t.update(_batch([4, 6, 7], [5]))
    t.update(_batch([0, 0], [2, 2]))  # padding: the same rows twice in a batch
    assert (t.seen, t.skipped) == (8, 2) and t.summary() == "2 of 8 rows skipped (25.00%)"
    # A skipped sample whose source gave no index cannot be recognised again: each one counts.
    t.update(_batch([], [None, None]))
    assert (t.seen, t.skipped) == (10, 4)
    # Without skipped_index (another collate function) the counts still arrive.
    t.update({"index": torch.tensor([100]), "num_skipped": 1})
    assert (t.seen, t.skipped) == (12, 5)


def test_trackers_merge_what_other_ranks_met():
    a, b = BadSampleTracker(), BadSampleTracker()
    a.update(_batch([0, 1, 2], [3], "row 3"))
    b.update(_batch([2, 4], [3, 5], "row 3 again"))  # row 2 and the bad row 3 met by both ranks
    total = BadSampleTracker()
    for part in (a.export(), b.export()):
        total.add(**part)
    assert (total.seen, total.skipped) == (6, 2) and total.reasons == ["row 3", "row 3 again", "row 3 again"]


def test_row_set_is_exact_over_sparse_and_dense_indices():
    rng = np.random.default_rng(0)
    # shard-style indices (shard number x 1e6 + position) and a dense range, with repeats
    indices = np.concatenate([rng.integers(0, 50, 2000) * 1_000_000 + rng.integers(0, 300, 2000),
                              np.arange(10_000), np.arange(5_000)])
    rows = RowSet()
    for part in np.array_split(rng.permutation(indices), 7):
        rows.add(part)
    expected = np.unique(indices)
    assert len(rows) == len(expected) and np.array_equal(rows.indices(), expected)
    rows.add([])
    assert len(rows) == len(expected)
