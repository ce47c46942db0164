import json

import pytest

from mmkit.callbacks.report import RunReport, write_report
from mmkit.callbacks.throughput import Throughput

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_history():
    steps = range(1, 21)
    return {
        "step": {
            "train/loss": [(s, 2.0 / s) for s in steps],
            "train/contrastive_loss": [(s, 1.5 / s) for s in steps],
            "train/temperature": [(s, 0.07 + 0.001 * s) for s in steps],
            "train/lr": [(s, 1e-3 * min(1, s / 5)) for s in steps],
            "train/empty": [],
        },
        "epoch": {
            "val/i2t_R@1": [(1, 0.1), (2, 0.2), (3, 0.3)],
            "val/i2t_R@5": [(1, 0.3), (2, 0.5), (3, 0.6)],
            "val/t2i_R@1": [(1, 0.12), (2, 0.18), (3, 0.31)],
            "val/i2t_medr": [(1, 12.0), (2, 7.0), (3, 4.0)],
        },
    }


def test_write_report_from_a_fake_history(tmp_path):
    final = {"val/i2t_R@1": 0.3, "train/loss": 0.1, "val/loss": float("nan")}
    report = write_report(tmp_path / "report", fake_history(), final)

    out = tmp_path / "report"
    pngs = sorted(p.name for p in out.glob("*.png"))
    # Losses share a figure, Recall@K share a figure, everything else gets its own.
    assert pngs == [
        "train_loss.png", "train_lr.png", "train_temperature.png", "val_i2t_medr.png", "val_recall.png"
    ]
    for png in pngs:
        assert (out / png).read_bytes()[:8] == PNG_MAGIC

    text = report.read_text()
    assert report == out / "report.md"
    assert "| `val/i2t_R@1` | 0.3 |" in text and "| `val/loss` | nan |" in text
    for png in pngs:  # embedded by a path relative to report.md
        assert f"]({png})" in text

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val/i2t_R@1"] == 0.3 and metrics["train/loss"] == 0.1
    assert json.loads((out / "history.json").read_text())["epoch"]["val/i2t_R@5"][1] == [2, 0.5]


def test_write_report_with_nothing_recorded(tmp_path):
    report = write_report(tmp_path, {"step": {}, "epoch": {}}, {})
    assert "No metrics" in report.read_text()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {}


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
    epochs = callback.history["epoch"]
    assert [x for x, _ in epochs["val/i2t_R@1"]] == [1.0, 2.0]
    assert {"val/i2t_R@1", "val/t2i_R@1", "val/loss"} <= epochs.keys()

    for png in ("train_loss.png", "train_temperature.png", "train_lr.png", "val_recall.png", "val_loss.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    final = json.loads((out / "metrics.json").read_text())
    assert final["val/i2t_R@1"] == pytest.approx(epochs["val/i2t_R@1"][-1][1])
    assert "train/lr" in final
    assert "![val_recall](val_recall.png)" in (out / "report.md").read_text()
