"""The run report of real dual-encoder fits (tiny models): test metrics after the automatic test,
pictures of what was learnt checked against a direct computation, and each technique's own
figures (AlignGAN, EWCIncremental, KDStudent)."""

import json
import re

import lightning as L
import numpy as np
import pytest
import torch

from mmkit import AlignGAN, CLIPPretrain, EWCIncremental, KDStudent
from mmkit.callbacks.report import RunReport
from mmkit.data import ImageTextDataModule, SyntheticShapes, TaskStreamDataModule
from mmkit.metrics import modality_gap
from mmkit.models import OpenCLIP, Teacher

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _trainer(tmp_path, report, **kw):
    kw.setdefault("max_steps", 4)
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
        use_distributed_sampler=False, callbacks=[report], log_every_n_steps=1, **kw,
    )


def _data(module, test=True):
    return ImageTextDataModule(
        train=SyntheticShapes(64, seed=0, image_size=16), val=SyntheticShapes(24, seed=1, image_size=16),
        test=SyntheticShapes(16, seed=2, image_size=16) if test else None,
        batch_size=8, eval_batch_size=8, preprocessing=module.preprocessing,
    )


def _report_text(tmp_path):
    return (tmp_path / "report" / "report.md").read_text()


def test_fit_then_test_report_has_test_metrics_and_pictures_matching_a_direct_computation(tiny_arch, tmp_path):
    torch.manual_seed(0)
    module = CLIPPretrain(OpenCLIP(tiny_arch), export_dir="", warmup_steps=1)
    dm = _data(module)
    report = RunReport(examples=20)  # more rows than one eval batch (8): taken from three batches
    trainer = _trainer(tmp_path, report, val_check_interval=2)
    trainer.fit(module, datamodule=dm)

    out = tmp_path / "report"
    fit_files = sorted(p.name for p in out.iterdir())
    assert {"optimisation.png", "retrieval.png", "zeroshot.png", "retrieval_text_to_image.png",
            "retrieval_image_to_text.png", "similarity.png", "embedding_map.png", "confusion.png",
            "explained_retrievals.png"} <= set(fit_files)
    assert "![explained retrievals](explained_retrievals.png)" in _report_text(tmp_path)
    assert "test/" not in (out / "metrics.json").read_text()  # a fit without test has its report
    # Validation at steps 2 and 4, on the training curves' axis.
    assert [x for x, _ in report.history["step"]["val/i2t_R@1"]] == [2, 4]

    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    final = json.loads((out / "metrics.json").read_text())
    assert final["test/i2t_R@1"] == pytest.approx(metrics["test/i2t_R@1"])
    assert "val/i2t_R@1" in final and "train/loss" in final  # the fit's values are kept
    text = _report_text(tmp_path)
    row = re.search(r"\| `i2t_R@1` \|  \| (\S+) \| (\S+) \|", text)
    assert row and float(row.group(2)) == pytest.approx(metrics["test/i2t_R@1"], abs=1e-4)
    assert sorted(p.name for p in out.iterdir()) == fit_files  # written again: no new or duplicate files
    # SyntheticShapes has 5 classes: top-5 accuracy (always 1) gets no curve.
    assert "val/zeroshot_top5" in final and "zeroshot_top5" not in json.dumps(_panels(report))

    # The pictures' numbers against a direct computation on the same rows.
    numbers = json.loads((out / "examples.json").read_text())
    rows = [dm.val[i] for i in range(20)]  # the first validation rows, unshuffled
    assert numbers["captions"] == [r["caption"] for r in rows]
    batch = next(iter(ImageTextDataModule(val=dm.val, eval_batch_size=20, preprocessing=module.preprocessing).val_dataloader()))
    module.eval()
    with torch.no_grad():
        image = module.model.encode_image(batch["images"])
        text_f = module.model.encode_text(batch["texts"])
        classifier = module.zero_shot_classifier(dm.val.class_names)
    sim = (image @ text_f.T).numpy()
    for result in numbers["text_to_image"]:  # each image id once here: the gallery is all rows
        q = result["query"]
        ranked = np.argsort(-sim[:, q], kind="stable")
        assert result["top"] == ranked[:5].tolist()
        assert result["correct"] == [int(i) == q for i in ranked[:5]]
        assert result["rank"] == int(np.where(ranked == q)[0][0]) + 1
    predictions = (image @ classifier.T).argmax(1)
    direct = [[0] * 5 for _ in range(5)]
    for label, pred in zip(batch["label"].tolist(), predictions.tolist()):
        direct[label][pred] += 1
    assert numbers["confusion"]["counts"] == direct
    assert numbers["modality_gap"] == pytest.approx(modality_gap(image, text_f).item(), abs=1e-5)
    assert numbers["confusion"]["class_names"] == dm.val.class_names
    for png in fit_files:
        if png.endswith(".png"):
            assert (out / png).read_bytes()[:8] == PNG_MAGIC


def _panels(report):
    from mmkit.reports.curves import group_curves

    return group_curves(report.history["step"], num_classes=5)


def test_align_gan_report_shows_discriminator_accuracy_and_modality_gap(tiny_arch, tmp_path):
    torch.manual_seed(0)
    module = AlignGAN(OpenCLIP(tiny_arch), export_dir="", warmup_steps=1)
    report = RunReport(examples=8)
    _trainer(tmp_path, report, val_check_interval=2).fit(module, datamodule=_data(module, test=False))
    panels = _panels(report)["technique"]
    assert set(panels["discriminator accuracy / AUC (0.5: modalities indistinguishable)"]) == {"train/d_accuracy", "val/d_accuracy", "val/d_auc"}
    assert set(panels["modality gap"]) == {"val/modality_gap"}
    assert set(panels["discriminator loss"]) == {"train/d_loss"}
    assert "## Curves" in _report_text(tmp_path) and "AlignGAN: its own signals" in _report_text(tmp_path)
    assert (tmp_path / "report" / "technique.png").read_bytes()[:8] == PNG_MAGIC


def test_ewc_report_links_the_continual_learning_matrix_heatmap(tiny_arch, tmp_path):
    torch.manual_seed(0)
    module = EWCIncremental(OpenCLIP(tiny_arch), export_dir="", warmup_steps=1, fisher_samples=6, fisher_batch_size=4)
    dm = TaskStreamDataModule(
        train=SyntheticShapes(24, seed=0, image_size=16), val=SyntheticShapes(15, seed=1, image_size=16),
        task_groups=[["circle", "square"], ["triangle", "cross", "star"]], epochs_per_task=1, batch_size=8,
        eval_batch_size=16, train_augment=False, preprocessing=module.preprocessing,
    )
    report = RunReport(examples=8)
    _trainer(tmp_path, report, max_steps=-1, max_epochs=2, reload_dataloaders_every_n_epochs=1).fit(module, datamodule=dm)
    text = _report_text(tmp_path)
    assert "## EWCIncremental" in text
    links = re.findall(r"\]\((\.\./continual/[^)]+\.png)\)", text)
    assert links == ["../continual/R_at_1.png", "../continual/zeroshot_top1.png"]
    for link in links:
        assert (tmp_path / "report" / link).resolve().read_bytes()[:8] == PNG_MAGIC
    assert "continual/R@1_avg" in json.loads((tmp_path / "report" / "metrics.json").read_text())


def test_kd_report_shows_teacher_student_agreement(tiny_arch, tmp_path):
    torch.manual_seed(0)
    module = KDStudent(OpenCLIP(tiny_arch), teacher=Teacher(OpenCLIP(tiny_arch)), export_dir="", warmup_steps=1)
    report = RunReport(examples=8)
    _trainer(tmp_path, report, val_check_interval=2).fit(module, datamodule=_data(module, test=False))
    agreement = report.history["step"]["val/teacher_agreement"]
    assert [x for x, _ in agreement] == [2, 4] and all(0.0 <= y <= 1.0 for _, y in agreement)
    assert set(_panels(report)["technique"]["teacher/student top-1 agreement"]) == {"val/teacher_agreement"}
    assert (tmp_path / "report" / "technique.png").is_file() and (tmp_path / "report" / "similarity.png").is_file()
