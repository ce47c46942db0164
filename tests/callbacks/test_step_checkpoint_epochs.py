"""StepCheckpoint's epoch-end checkpoints: on by default, every N-th epoch (and the epoch training
stops in) with ``every_n_epochs``, none with ``every_n_epochs: 0`` (for short epochs, where a
~12-bytes-per-parameter file per epoch costs more than it saves); and what a checkpoint holds."""

import lightning as L
import pytest
import torch

from mmkit import CLIPPretrain
from mmkit.callbacks import StepCheckpoint
from mmkit.data import ImageTextDataModule, SyntheticShapes
from mmkit.models import OpenCLIP

STEPS_PER_EPOCH = 5  # 20 samples, batch 4


def _fit(tiny_arch, root, max_epochs, **checkpoint_args):
    torch.manual_seed(0)
    module = CLIPPretrain(OpenCLIP(tiny_arch), export_dir="")
    dm = ImageTextDataModule(train=SyntheticShapes(20, image_size=16), batch_size=4, preprocessing=module.preprocessing)
    callback = StepCheckpoint(keep_last=-1, **checkpoint_args)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, callbacks=[callback])
    trainer.fit(module, datamodule=dm)
    folder = root / "checkpoints"
    return sorted(p.name for p in folder.glob("epoch=*.ckpt")), folder


@pytest.mark.parametrize("off", [{"every_n_epochs": 0}, {"save_on_train_epoch_end": False}], ids=["every_n_epochs_0", "flag"])
def test_no_epoch_end_checkpoints_only_step_ones(tiny_arch, tmp_path, off):
    names, folder = _fit(tiny_arch, tmp_path, max_epochs=2, every_n_train_steps=3, **off)
    # steps 3, 6, 9; the epoch ends (5, 10) write nothing
    assert names == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "epoch=1-step=9.ckpt"]
    assert (folder / "last.ckpt").resolve().name == "epoch=1-step=9.ckpt"


def test_default_saves_at_every_epoch_end(tiny_arch, tmp_path):
    names, _ = _fit(tiny_arch, tmp_path, max_epochs=2, every_n_train_steps=3)
    assert names == ["epoch=0-step=3.ckpt", "epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt",
                     "epoch=1-step=6.ckpt", "epoch=1-step=9.ckpt"]


def test_every_n_epochs_saves_every_nth_and_the_last_epoch(tiny_arch, tmp_path):
    names, folder = _fit(tiny_arch, tmp_path, max_epochs=3, every_n_train_steps=0, every_n_epochs=2)
    # epoch 1 (the 2nd) and epoch 2, where training stops, though 3 is not a multiple of 2
    assert names == ["epoch=1-step=10.ckpt", "epoch=2-step=15.ckpt"]
    assert (folder / "last.ckpt").resolve().name == "epoch=2-step=15.ckpt"


def test_a_checkpoint_holds_weights_adamw_moments_and_small_resume_state(tiny_arch, tmp_path):
    """docs/checkpoints.md: weights (4 bytes per fp32 parameter) + AdamW's two moments (8 more)
    are the whole size; loop, sampler and RNG state add kilobytes."""
    names, folder = _fit(tiny_arch, tmp_path, max_epochs=1, every_n_train_steps=0)
    path = folder / names[-1]
    ckpt = torch.load(path, weights_only=True)
    weight_bytes = sum(t.numel() * t.element_size() for t in ckpt["state_dict"].values())
    moments = [t for state in ckpt["optimizer_states"][0]["state"].values()
               for key, t in state.items() if key in ("exp_avg", "exp_avg_sq")]
    moment_bytes = sum(t.numel() * t.element_size() for t in moments)
    assert moment_bytes == 2 * weight_bytes  # every weight is trained (the buffers hold no moments)
    assert path.stat().st_size < 3 * weight_bytes + 200_000  # the rest: counters, sampler, RNG states
    assert {"loops", "lr_schedulers", "callbacks", "ImageTextDataModule"} <= set(ckpt)
