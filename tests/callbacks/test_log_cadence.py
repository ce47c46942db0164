"""Per-step values are logged only on the steps the loggers write (every ``log_every_n_steps``)
and on the last step; the values written are those an every-step run writes on the same steps."""

from __future__ import annotations

import csv

import lightning as L
import torch

from mmkit import CLIPPretrain
from mmkit.callbacks import RunReport, Throughput
from mmkit.data import ImageTextDataModule, SyntheticShapes
from mmkit.models import OpenCLIP

STEPS = 12


def _fit(tiny_arch, tmp_path, every: int) -> tuple[CLIPPretrain, L.Trainer, list[str]]:
    torch.manual_seed(0)
    module = CLIPPretrain(OpenCLIP(tiny_arch), warmup_steps=2, export_dir="")
    calls: list[str] = []
    log = module.log

    def counting_log(name, *args, **kwargs):
        calls.append(name)
        return log(name, *args, **kwargs)

    module.log = counting_log
    dm = ImageTextDataModule(train=SyntheticShapes(8 * STEPS, seed=0, image_size=16), batch_size=8,
                             num_workers=0, preprocessing=module.preprocessing)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, log_every_n_steps=every, default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[Throughput(warmup=0, mfu=False), RunReport(examples=0)],
    )
    trainer.fit(module, datamodule=dm)
    return module, trainer, calls


def _train_rows(path) -> dict[int, dict[str, str]]:
    with open(path, newline="") as f:
        return {int(r["step"]): r for r in csv.DictReader(f) if r.get("train/loss")}


def test_train_values_are_logged_on_written_steps_only_with_the_same_values(tiny_arch, tmp_path):
    _, trainer, calls = _fit(tiny_arch, tmp_path / "every5", every=5)
    # Steps 5 and 10 (the loggers' cadence) and 12 (the last): three calls, not twelve.
    assert calls.count("train/loss") == 3 and calls.count("train/lr") == 3
    assert calls.count("train/samples_per_sec") == 3
    assert float(trainer.callback_metrics["train/loss"]) > 0  # the final step's values are there
    gated = _train_rows(tmp_path / "every5" / "metrics.csv")
    assert sorted(gated) == [4, 9]  # Lightning numbers written rows from 0: steps 5 and 10

    _, _, every_calls = _fit(tiny_arch, tmp_path / "every1", every=1)
    assert every_calls.count("train/loss") == STEPS
    full = _train_rows(tmp_path / "every1" / "metrics.csv")
    for step in gated:
        for key in ("train/loss", "train/lr", "train/temperature"):
            assert float(gated[step][key]) == float(full[step][key]), (step, key)


def test_run_report_records_the_logged_steps_and_the_last(tiny_arch, tmp_path):
    _, trainer, _ = _fit(tiny_arch, tmp_path, every=5)
    report = next(c for c in trainer.callbacks if isinstance(c, RunReport))
    assert [x for x, _ in report.history["step"]["train/loss"]] == [5, 10, 12]
