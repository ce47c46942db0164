import pytest
import torch

from datafakes import DictTokenizerPreprocessing, FakePreprocessing
from mmkit.data import BadDataError, BadSample, BadSampleTracker, ImageTextCollate, SyntheticShapes


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


def test_tracker_counts_and_bad_fraction_limit():
    t = BadSampleTracker(max_reasons=3)
    for i in range(10):
        t.update({"index": torch.arange(9), "num_skipped": 1, "skipped": [f"f.csv row {i}: image missing"]})
    assert (t.seen, t.skipped) == (100, 10) and t.fraction == pytest.approx(0.1)
    assert t.reasons == [f"f.csv row {i}: image missing" for i in range(3)]
    t.check(max_bad_fraction=0.1, min_samples=50)  # at the limit: fine
    t.check(max_bad_fraction=0.05, min_samples=200)  # too few samples to judge
    with pytest.raises(BadDataError) as e:
        t.check(max_bad_fraction=0.05, min_samples=50)
    msg = str(e.value)
    assert "10.0% of samples were skipped" in msg and "limit of 5.0%" in msg and "(10 of 100 samples)" in msg
    assert "f.csv row 0: image missing" in msg
