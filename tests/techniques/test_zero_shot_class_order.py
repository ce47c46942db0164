"""Zero-shot accuracy scores each label with its own class name, whatever order
``zero_shot_classes`` is typed in, and defaults to the data's own class names."""

import csv

import lightning as L
import pytest
import torch
from PIL import Image

from mmkit import CLIPPretrain
from mmkit.data import ImageTextDataModule, ManifestDataset
from mmkit.losses import ClipLoss
from mmkit.models import OpenCLIP

COLORS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 30, 220)}


@pytest.fixture
def labelled_csv(tmp_path):
    rows = []
    for i, (name, rgb) in enumerate(list(COLORS.items()) * 4):
        Image.new("RGB", (20, 20), rgb).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {name} square", "label": name})
    path = tmp_path / "val.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path  # string labels: the data numbers them in sorted order (blue 0, green 1, red 2)


def _classifier(tiny_arch, csv, classes):
    torch.manual_seed(0)
    spec = OpenCLIP(tiny_arch)
    module = CLIPPretrain(spec, ClipLoss(), zero_shot_classes=classes, export_dir="")
    dm = ImageTextDataModule(val=ManifestDataset(str(csv), label_column="label"), batch_size=4, eval_batch_size=6)
    dm.set_preprocessing(spec.preprocessing)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    return module._classifier, metrics["val/zeroshot_top1"]


def test_the_order_of_zero_shot_classes_does_not_change_the_scores(tiny_arch, labelled_csv):
    typed, typed_top1 = _classifier(tiny_arch, labelled_csv, ["red", "green", "blue"])
    sorted_, sorted_top1 = _classifier(tiny_arch, labelled_csv, ["blue", "green", "red"])
    default, default_top1 = _classifier(tiny_arch, labelled_csv, None)
    # Row i is label i's class, however the list was typed (before: row i was the i-th typed name).
    assert torch.equal(typed, sorted_) and torch.equal(typed, default)
    assert typed_top1 == sorted_top1 == default_top1


def test_zero_shot_classes_that_do_not_match_the_data_are_refused(tiny_arch, labelled_csv):
    with pytest.raises(ValueError, match=r"do not match the class names of the val data .*missing \['blue', 'green'\]"):
        _classifier(tiny_arch, labelled_csv, ["red"])
