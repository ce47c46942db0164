import json

import numpy as np
import pytest

from mmkit.callbacks.report import RunReport, write_report
from mmkit.callbacks.throughput import Throughput
from mmkit.reports.curves import group_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_history():
    steps = range(1, 21)
    return {
        "step": {
            "train/loss": [(s, 2.0 / s) for s in steps],
            "train/contrastive_loss": [(s, 1.5 / s) for s in steps],
            "train/temperature": [(s, 0.07 + 0.001 * s) for s in steps],
            "train/logit_scale": [(s, 1 / (0.07 + 0.001 * s)) for s in steps],
            "train/lr": [(s, 1e-3 * min(1, s / 5)) for s in steps],
            "train/empty": [],
            "val/loss": [(10, 1.0), (20, 0.5)],
            "val/i2t_R@1": [(10, 0.1), (20, 0.2)],
            "val/i2t_R@5": [(10, 0.3), (20, 0.5)],
            "val/t2i_R@1": [(10, 0.12), (20, 0.18)],
            "val/i2t_medr": [(10, 12.0), (20, 7.0)],
            "val/zeroshot_top1": [(10, 0.4), (20, 0.6)],
            "val/zeroshot_top5": [(10, 1.0), (20, 1.0)],
            "val/modality_gap": [(10, 0.8), (20, 0.7)],
        },
    }


def test_curves_are_grouped_by_figure_and_panel_without_trivial_ones():
    groups = group_curves(fake_history()["step"], num_classes=5)
    assert list(groups) == ["optimisation", "retrieval", "zeroshot", "technique"]
    assert groups["optimisation"]["loss"].keys() == {"train/loss", "val/loss"}  # one x-axis for both
    # One loss term is the loss itself: no panel repeating it; two get their panel.
    assert list(groups["optimisation"]) == ["loss", "learning rate", "temperature"]
    two_terms = {**fake_history()["step"], "train/ewc_loss": [(1, 0.1)]}
    assert group_curves(two_terms)["optimisation"]["loss terms"].keys() == {"train/contrastive_loss", "train/ewc_loss"}
    assert groups["retrieval"]["image → text Recall@K"].keys() == {"val/i2t_R@1", "val/i2t_R@5"}
    # top-5 of 5 classes is always 1; logit_scale is 1/temperature: neither is drawn
    assert [list(p) for p in groups["zeroshot"].values()] == [["val/zeroshot_top1"]]
    assert not any("logit_scale" in k for panels in groups.values() for keys in panels.values() for k in keys)
    assert groups["technique"] == {"modality gap": {"val/modality_gap": [(10, 0.8), (20, 0.7)]}}
    # With more classes, top-5 is worth a curve.
    assert "val/zeroshot_top5" in next(iter(group_curves(fake_history()["step"], num_classes=10)["zeroshot"].values()))
    # A key no rule knows gets a panel of its own in "other".
    assert group_curves({"val/novel_score": [(1, 2.0)]}) == {"other": {"novel_score": {"val/novel_score": [(1, 2.0)]}}}


def test_write_report_from_a_fake_history(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "train_loss.png").write_bytes(PNG_MAGIC)  # a figure of an earlier report, no longer drawn
    final = {"val/i2t_R@1": 0.2, "train/loss": 0.1, "val/loss": float("nan"), "test/i2t_R@1": 0.25,
             "continual/R@1_avg": 0.5, "continual/R@1_bwt": -0.25, "continual/tasks_done": 3.0}
    report = write_report(out, fake_history(), final, technique="AlignGAN", num_classes=5)

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["optimisation.png", "retrieval.png", "technique.png", "zeroshot.png"]
    for png in pngs:
        assert (out / png).read_bytes()[:8] == PNG_MAGIC

    text = report.read_text()
    assert report == out / "report.md"
    # One row per metric, a column per split; other keys in a table of their own.
    assert "| metric | train | val | test |" in text
    assert "| `i2t_R@1` |  | 0.2 | 0.25 |" in text and "| `loss` | 0.1 | nan |  |" in text
    assert "| score | avg | last | bwt | forgetting | fwt |" in text and "| `R@1` | 0.5 |  | -0.25 |  |  |" in text
    assert "| `continual/tasks_done` | 3 |" in text
    assert "AlignGAN: its own signals" in text
    for png in pngs:  # embedded by a path relative to report.md
        assert f"]({png})" in text

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/i2t_R@1"] == 0.25 and metrics["train/loss"] == 0.1
    assert json.loads((out / "history.json").read_text())["step"]["val/i2t_R@5"][1] == [20, 0.5]


def test_write_report_with_nothing_recorded(tmp_path):
    report = write_report(tmp_path, {"step": {}}, {})
    assert "No metrics" in report.read_text()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {}
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_run_report_in_a_real_fit(tiny_fit, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    callback = RunReport()
    logger = CSVLogger(tmp_path, name="run")
    # Throughput listed after the report: its values must still be recorded with their own step.
    callbacks = [callback, Throughput(window=2, warmup=1)]
    trainer = tiny_fit(callbacks, max_steps=-1, max_epochs=2, limit_val_batches=2, logger=logger)

    out = tmp_path / "run" / "version_0" / "report"  # trainer.log_dir of the CSV logger
    steps = callback.history["step"]
    # 24 rows / batch 4 = 6 steps per epoch; train/loss_step and _epoch fold into train/loss.
    assert [x for x, _ in steps["train/loss"]] == list(range(1, 13))
    # Recorded at each batch end, the values are that batch's, not the previous one's.
    assert [y for _, y in steps["train/loss"]] == pytest.approx(trainer.lightning_module.train_losses)
    assert {"train/loss", "train/temperature", "train/lr"} <= steps.keys()
    # Steps 1 (warm-up) and 2 (opens the window) have no throughput yet; from step 3 on the
    # latest value is recorded every step, including the step it was logged on.
    assert [x for x, _ in steps["train/samples_per_sec"]] == list(range(3, 13))
    assert not any(k.endswith(("_step", "_epoch")) for k in steps)
    # Validation at each epoch end, on the same step axis as training.
    assert [x for x, _ in steps["val/i2t_R@1"]] == [6, 12]
    assert {"val/i2t_R@1", "val/t2i_R@1", "val/loss"} <= steps.keys()

    assert sorted(p.name for p in out.glob("*.png")) == ["optimisation.png", "retrieval.png"]
    final = json.loads((out / "metrics.json").read_text())
    assert final["val/i2t_R@1"] == pytest.approx(steps["val/i2t_R@1"][-1][1])
    assert "train/lr" in final
    text = (out / "report.md").read_text()
    assert "(retrieval.png)" in text and "What the model learnt" not in text  # not a dual encoder: no pictures


def test_retrieval_examples_mark_the_images_and_captions_that_belong_together():
    from mmkit.reports.examples import image_to_text, text_to_image

    rng = np.random.default_rng(0)
    image_ids = np.array([7, 7, 3, 9, 3, 5, 11, 2])  # rows 0/1 and 2/4: one image, two captions
    sim = rng.normal(size=(8, 8))
    for q, result in zip([0, 3, 4], text_to_image(sim, image_ids, [0, 3, 4], k=5)):
        gallery = [0, 2, 3, 5, 6, 7]  # each image once (its first row)
        ranked = sorted(gallery, key=lambda i: -sim[i, q])
        assert result["top"] == ranked[:5]
        own = next(i for i in gallery if image_ids[i] == image_ids[q])
        assert result["correct"] == [i == own for i in ranked[:5]]
        assert result["rank"] == ranked.index(own) + 1
    for q, result in zip([1, 6], image_to_text(sim, image_ids, [1, 6], k=5)):
        ranked = sorted(range(8), key=lambda j: -sim[q, j])
        assert result["top"] == ranked[:5]
        assert result["correct"] == [image_ids[j] == image_ids[q] for j in ranked[:5]]
        assert result["rank"] == 1 + min(ranked.index(j) for j in range(8) if image_ids[j] == image_ids[q])


def test_confusion_matrix_counts_pairs_and_skips_unlabelled_rows():
    from mmkit.reports.examples import confusion_matrix

    labels = np.array([0, 1, 2, 2, -1, 1, 0, 2])
    predictions = np.array([0, 2, 2, 1, 0, 1, 0, 2])
    counts = confusion_matrix(labels, predictions, 3)
    direct = np.zeros((3, 3), dtype=int)
    for t, p in zip(labels, predictions):
        if t >= 0:
            direct[t, p] += 1
    assert counts.tolist() == direct.tolist() and counts.sum() == 7


def test_a_checkpoint_from_before_the_one_step_axis_loads_its_step_curves():
    callback = RunReport()
    callback.load_state_dict({"history": {"step": {"train/loss": [(1, 2.0)]}, "epoch": {"val/i2t_R@1": [(1.0, 0.3)]}}})
    assert callback.history == {"step": {"train/loss": [(1, 2.0)]}}


def test_pictures_with_several_captions_per_image_many_classes_and_large_images(tmp_path):
    from mmkit.reports.examples import Examples

    rng = np.random.default_rng(1)
    n, classes = 40, 30
    image_ids = np.repeat(np.arange(8), 5)  # COCO-like: 5 captions per image
    labels = rng.integers(0, classes, size=n)
    examples = Examples(
        images=rng.integers(0, 255, size=(n, 224, 224, 3), dtype=np.uint8),
        captions=[f"caption {i} of image {image_ids[i]}, " + "a rather long description " * 4 for i in range(n)],
        image_ids=image_ids, similarity=rng.normal(size=(n, n)), labels=labels,
        class_names=[f"class number {c}" for c in range(classes)], predictions=rng.integers(0, classes, size=n),
    )
    write_report(tmp_path, {"step": {}}, {}, examples=examples)
    numbers = json.loads((tmp_path / "examples.json").read_text())
    # The queries are distinct images (the first caption of each), not four captions of one image.
    assert [r["query"] for r in numbers["text_to_image"]] == [0, 5, 10, 15]
    assert [r["query"] for r in numbers["image_to_text"]] == [0, 5, 10, 15]
    assert all(len(set(image_ids[r["top"]])) == 5 for r in numbers["text_to_image"])  # each image once
    # All 30 classes are counted, whatever the figure shows.
    counts = np.array(numbers["confusion"]["counts"])
    assert counts.shape == (classes, classes) and counts.sum() == n
    for png in ("retrieval_text_to_image.png", "retrieval_image_to_text.png", "similarity.png", "confusion.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
