import os

import pytest

datasets = pytest.importorskip("datasets")

from datafakes import image_bytes, write_images  # noqa: E402
from mmkit.data import BadSample, HFImageTextDataset  # noqa: E402


def test_image_feature_list_captions_labels_and_bad_rows(tmp_path):
    ds = datasets.Dataset.from_dict({
        "img": [{"bytes": image_bytes(), "path": None}, {"bytes": os.urandom(50), "path": "bad.jpg"},
                {"bytes": image_bytes((0, 0, 255), "PNG"), "path": None}],
        "captions": [["red one", "still red"], ["broken"], [" "]],
        "y": [1, 0, 1],
    }).cast_column("img", datasets.Image()).cast_column("y", datasets.ClassLabel(names=["no", "yes"]))
    datasets.DatasetDict({"train": ds, "val": ds}).save_to_disk(str(tmp_path / "hf"))

    with pytest.raises(ValueError, match="holds splits"):
        HFImageTextDataset(str(tmp_path / "hf"))
    h = HFImageTextDataset(str(tmp_path / "hf"), split="val", image_column="img", caption_column="captions",
                           label_column="y")
    assert len(h) == 4 and h.class_names == ["no", "yes"]
    s0, s1 = h[0], h[1]
    assert (s0["caption"], s1["caption"]) == ("red one", "still red")
    assert s0["image_id"] == s1["image_id"] == 0 and s0["label"] == 1 and s0["image"].mode == "RGB"
    assert isinstance(h[2], BadSample) and f"{tmp_path / 'hf'}[val] row 1: image 'bad.jpg' cannot be decoded" in h[2].reason
    assert isinstance(h[3], BadSample) and "row 2: empty or missing caption" in h[3].reason


def test_path_column_and_column_error(tmp_path):
    write_images(tmp_path / "hf_paths", ["a.jpg"])
    ds = datasets.Dataset.from_dict({"file": ["a.jpg", "missing.jpg"], "text": ["an a", "gone"]})
    ds.save_to_disk(str(tmp_path / "hf_paths"))
    h = HFImageTextDataset(str(tmp_path / "hf_paths"), image_column="file", caption_column="text")
    assert h[0]["caption"] == "an a" and h[0]["label"] == -1
    assert isinstance(h[1], BadSample) and "'missing.jpg' not found" in h[1].reason
    with pytest.raises(ValueError, match=r"caption_column 'caption' not found; columns present: 'file', 'text'"):
        HFImageTextDataset(str(tmp_path / "hf_paths"), image_column="file")
