"""Bad validation/test samples are counted, reported and held to the training data's limit; a
split with nothing usable fails naming the reasons instead of computing metrics from nothing."""

import csv

import lightning as L
import pytest
from PIL import Image

from mmkit import CLIPPretrain
from mmkit.callbacks import BadSampleCallback
from mmkit.data import BadDataError, ImageTextDataModule, ManifestDataset
from mmkit.losses import ClipLoss
from mmkit.models import OpenCLIP


def _manifest(tmp_path, good: int, bad: int):
    rows = []
    for i in range(good):
        Image.new("RGB", (20, 20), (10 * i % 256, 80, 160)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"picture {i}"})
    rows += [{"image": f"missing_{i}.png", "caption": f"gone {i}"} for i in range(bad)]
    path = tmp_path / "eval.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _evaluate(tiny_arch, path, split, limit):
    spec = OpenCLIP(tiny_arch)
    module = CLIPPretrain(spec, ClipLoss(), export_dir="")
    dm = ImageTextDataModule(**{split: ManifestDataset(path)}, batch_size=4, eval_batch_size=4, max_bad_fraction=limit)
    dm.set_preprocessing(spec.preprocessing)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[BadSampleCallback(min_samples=1)])
    run = trainer.validate if split == "val" else trainer.test
    return run(module, datamodule=dm, verbose=False)[0]


@pytest.mark.parametrize("split", ["val", "test"])
def test_bad_eval_samples_are_counted_and_logged(tiny_arch, tmp_path, split):
    metrics = _evaluate(tiny_arch, _manifest(tmp_path, good=6, bad=2), split, limit=0.5)
    assert metrics[f"{split}/data_skipped"] == 2 and metrics[f"{split}/data_skipped_fraction"] == pytest.approx(0.25)


def test_too_many_bad_eval_samples_fail_with_the_reasons(tiny_arch, tmp_path):
    with pytest.raises(BadDataError, match=r"(?s)50.0% of val rows were skipped.*missing_0.png"):
        _evaluate(tiny_arch, _manifest(tmp_path, good=4, bad=4), "val", limit=0.05)


def test_an_eval_split_with_no_usable_sample_fails_before_its_metrics(tiny_arch, tmp_path):
    # Above any limit: even a limit of 100 % cannot make metrics out of no rows.
    with pytest.raises(BadDataError, match=r"100.0% of test rows were skipped"):
        _evaluate(tiny_arch, _manifest(tmp_path, good=0, bad=4), "test", limit=1.0)
