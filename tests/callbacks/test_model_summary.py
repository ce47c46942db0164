"""The model summary of an mmkit run lists the modules and parameters and no "Total Flops: 0"
(Lightning counts none without an example input; Throughput counts a training step's)."""

import logging
import sys
from pathlib import Path

import lightning as L
import torch

from mmkit import CLIPPretrain
from mmkit.callbacks import ModelSummary
from mmkit.cli import run_cli
from mmkit.data import ImageTextDataModule, SyntheticShapes
from mmkit.models import OpenCLIP

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
from test_run_output import tiny

ARCH = str(Path(__file__).parents[1] / "models" / "tiny_test_arch.json")


def _summary_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if "Total params" in r.getMessage())


def test_summary_without_uncounted_flops(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    module = CLIPPretrain(OpenCLIP(ARCH), export_dir="")
    dm = ImageTextDataModule(train=SyntheticShapes(4, image_size=16), batch_size=4, preprocessing=module.preprocessing)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, callbacks=[ModelSummary()])
    trainer.fit(module, datamodule=dm)
    text = _summary_text(caplog)
    assert "model" in text and "Trainable params" in text and "Modules in train mode" in text
    assert "Flops" not in text and "FLOPs" not in text


def test_the_cli_uses_it_unless_the_summary_is_off(tmp_path):
    cli = run_cli(["fit", *tiny(tmp_path / "run"), "--trainer.max_steps", "1", "--trainer.enable_model_summary", "true"])
    assert [type(c) for c in cli.trainer.callbacks if isinstance(c, L.pytorch.callbacks.ModelSummary)] == [ModelSummary]
    cli = run_cli(["fit", *tiny(tmp_path / "run2"), "--trainer.max_steps", "1"])  # tiny() turns it off
    assert not [c for c in cli.trainer.callbacks if isinstance(c, L.pytorch.callbacks.ModelSummary)]
