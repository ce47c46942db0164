import os

import pytest
import torch

from datafakes import FakePreprocessing, image_bytes, write_csv, write_images, write_jsonl
from mmkit.data import BadSample, BadSampleTracker, ImageTextCollate, ManifestDataset


def _collate():
    p = FakePreprocessing()
    return ImageTextCollate(p.image_transform(train=False), p.tokenize)


@pytest.fixture
def good_csv(tmp_path):
    write_images(tmp_path / "img", ["a.jpg", "b.png", "c.jpg"])
    rows = [
        {"image": "img/a.jpg", "caption": "a red thing", "label": "cat"},
        {"image": "img/b.png", "caption": "a green thing", "label": "dog"},
        {"image": "img/a.jpg", "caption": "the same red thing", "label": "cat"},
        {"image": "img/c.jpg", "caption": "another", "label": ""},
    ]
    path = tmp_path / "train.csv"
    write_csv(path, rows)
    return path


def test_csv_samples_image_ids_and_string_labels(good_csv):
    ds = ManifestDataset(str(good_csv), label_column="label")
    assert len(ds) == 4
    s = ds[1]
    assert s["caption"] == "a green thing" and s["index"] == 1
    assert s["image"].mode == "RGB" and s["image"].size == (20, 20)
    # rows with the same image path share an image id; others get their own
    assert [ds[i]["image_id"] for i in range(4)] == [0, 1, 0, 2]
    assert ds.class_names == ["cat", "dog"]
    assert [ds[i]["label"] for i in range(4)] == [0, 1, 0, -1]


def test_tsv_and_jsonl_with_image_root_and_caption_lists(tmp_path):
    write_images(tmp_path / "pics", ["x.jpg", "y.jpg"])
    tsv = tmp_path / "m.tsv"
    write_csv(tsv, [{"file": "x.jpg", "text": "one, with a comma", "y": "3"}], delimiter="\t")
    ds = ManifestDataset(str(tsv), image_column="file", caption_column="text", label_column="y",
                         image_root=str(tmp_path / "pics"))
    assert ds[0]["caption"] == "one, with a comma" and ds[0]["label"] == 3 and ds.class_names is None

    jsonl = tmp_path / "m.jsonl"
    write_jsonl(jsonl, [{"image": str(tmp_path / "pics/x.jpg"), "caption": ["first", "second"]},
                        {"image": "pics/y.jpg", "caption": "third"}])
    ds = ManifestDataset(str(jsonl))
    assert [ds[i]["caption"] for i in range(3)] == ["first", "second", "third"]
    assert [ds[i]["image_id"] for i in range(3)] == [0, 0, 1]
    assert [ds[i]["label"] for i in range(3)] == [-1, -1, -1]


def test_wrong_column_names_fail_at_construction(good_csv, tmp_path):
    with pytest.raises(ValueError) as e:
        ManifestDataset(str(good_csv), caption_column="text")
    msg = str(e.value)
    assert str(good_csv) in msg and "'text'" in msg and "'image', 'caption', 'label'" in msg
    jsonl = tmp_path / "m.jsonl"
    write_jsonl(jsonl, [{"img": "a.jpg", "caption": "x"}])
    with pytest.raises(ValueError, match=r"image_column 'image' not found; columns present: 'img', 'caption'"):
        ManifestDataset(str(jsonl))
    with pytest.raises(ValueError, match="unsupported manifest extension"):
        ManifestDataset(str(tmp_path / "m.parquet"))


def test_bad_rows_are_skipped_counted_and_explained(tmp_path):
    write_images(tmp_path, ["ok.jpg"])
    (tmp_path / "noise.jpg").write_bytes(os.urandom(300))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(image_bytes(side=64)[:200])  # truncated JPEG
    rows = [
        {"image": "ok.jpg", "caption": "fine"},
        {"image": "missing.jpg", "caption": "no file"},
        {"image": "noise.jpg", "caption": "random bytes"},
        {"image": "empty.jpg", "caption": "zero bytes"},
        {"image": "ok.jpg", "caption": "   "},
        {"image": "cut.jpg", "caption": "truncated"},
    ]
    path = tmp_path / "data.csv"
    write_csv(path, rows)
    ds = ManifestDataset(str(path))
    samples = [ds[i] for i in range(len(ds))]
    assert not isinstance(samples[0], BadSample)
    assert all(isinstance(s, BadSample) for s in samples[1:])
    reasons = [s.reason for s in samples[1:]]
    assert reasons[0].startswith(f"{path} row 1 (line 3): image 'missing.jpg' not found")
    assert "row 2" in reasons[1] and "'noise.jpg' cannot be decoded (UnidentifiedImageError)" in reasons[1]
    assert "row 3" in reasons[2] and "'empty.jpg' is empty (0 bytes)" in reasons[2]
    assert "row 4" in reasons[3] and "empty or missing caption" in reasons[3]
    assert "row 5" in reasons[4] and "'cut.jpg' cannot be decoded" in reasons[4]

    batch = _collate()(samples)
    assert batch["images"].shape == (1, 3, 32, 32)
    assert batch["index"].tolist() == [0] and batch["num_skipped"] == 5
    assert batch["skipped"] == reasons  # the first five are kept
    assert batch["skipped_index"] == [1, 2, 3, 4, 5]  # each bad row keeps its index
    tracker = BadSampleTracker()
    tracker.update(batch)
    assert (tracker.seen, tracker.skipped) == (6, 5)


def test_all_bad_batch_keeps_counts_with_empty_tensors(tmp_path):
    path = tmp_path / "data.csv"
    write_csv(path, [{"image": "gone.jpg", "caption": "x"}, {"image": "gone2.jpg", "caption": "y"}])
    ds = ManifestDataset(str(path))
    batch = _collate()([ds[0], ds[1]])
    assert batch["images"].shape[0] == 0 and batch["texts"].shape[0] == 0
    assert batch["index"].dtype == torch.long and batch["index"].numel() == 0
    assert batch["num_skipped"] == 2 and len(batch["skipped"]) == 2


def test_class_names_name_integer_labels_and_order_string_labels(tmp_path, good_csv):
    ds = ManifestDataset(str(good_csv), label_column="label", class_names=["dog", "cat"])
    assert ds.class_names == ["dog", "cat"] and [ds[i]["label"] for i in range(4)] == [1, 0, 1, -1]
    with pytest.raises(ValueError, match=r"train.csv column 'label' line 2: label 'cat' is not among class_names \['dog'\]"):
        ManifestDataset(str(good_csv), label_column="label", class_names=["dog"])
    write_images(tmp_path / "img", ["a.jpg"])
    ints = tmp_path / "ints.csv"
    write_csv(ints, [{"image": "img/a.jpg", "caption": "x", "label": "1"}, {"image": "img/a.jpg", "caption": "y", "label": "2"}])
    assert ManifestDataset(str(ints), label_column="label").class_names is None
    assert ManifestDataset(str(ints), label_column="label", class_names=["a", "b", "c"]).class_names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="line 3: label 2 has no name: class_names lists 2"):
        ManifestDataset(str(ints), label_column="label", class_names=["a", "b"])


def test_captions_that_are_pandas_missing_values_as_text_warn_once_and_are_skipped(tmp_path):
    import warnings

    write_images(tmp_path / "img", ["a.jpg", "b.jpg"])
    rows = [{"image": "img/a.jpg", "caption": "a red thing"}, {"image": "img/b.jpg", "caption": "nan"},
            {"image": "img/a.jpg", "caption": "None"}, {"image": "img/b.jpg", "caption": " NaN "},
            {"image": "img/b.jpg", "caption": "nanny goat"}]
    path = tmp_path / "train.csv"
    write_csv(path, rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ManifestDataset(str(path))
    messages = [str(w.message) for w in caught if "missing values written out as text" in str(w.message)]
    assert len(messages) == 1, messages
    assert "3 of 5 captions" in messages[0] and str(path) in messages[0] and "lines 3, 4, 5" in messages[0]
    assert [isinstance(ds[i], BadSample) for i in range(5)] == [False, True, True, True, False]
    assert "'nan'" in ds[1].reason and ds[4]["caption"] == "nanny goat"


def test_clean_manifest_gives_no_missing_caption_warning(good_csv):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ManifestDataset(str(good_csv))
