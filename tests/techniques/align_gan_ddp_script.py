"""Two AlignGAN training steps (n_critic 2) + validation under a real Lightning Trainer; every
rank saves its discriminator and model parameters, D's optimizer step counts and the validation
metrics.

    python align_gan_ddp_script.py OUT_DIR DEVICES PER_RANK_BATCH MODE

MODE is ``alternating`` or ``gradient_reversal``. Run by tests/techniques/test_align_gan.py, as a
script for DDP (Lightning's ``ddp`` strategy relaunches it for the other ranks) and through
``run`` in the test's own process for the one-process reference. Rank 1's D is
deliberately initialised differently: AlignGAN must copy rank 0's D to every rank, as DDP does
for the parameters it manages. Rank 1's spectral-norm vectors are nudged in their last bits after
every power iteration (as a BLAS that rounds by memory alignment does): AlignGAN must bring
them back to rank 0's.
"""

import os
import sys
from pathlib import Path

import lightning as L
import torch

from mmkit import AlignGAN
from mmkit.data import ImageTextDataModule, SyntheticShapes
from mmkit.models import OpenCLIP

ARCH = str(Path(__file__).parents[1] / "models" / "tiny_test_arch.json")


def _state(module) -> dict:
    return {
        "discriminator": {k: v.detach().clone() for k, v in module.discriminator.state_dict().items()},
        "model": {k: v.detach().clone() for k, v in module.model.named_parameters()},
    }


class NudgeSpectralVectors(L.Callback):
    """On ranks other than 0, after every training-mode forward of D: turn its power-iteration
    vectors by a few ulps, as a BLAS that rounds by memory alignment would (Intel's MKL)."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            pl_module.discriminator.register_forward_hook(self._nudge)

    @staticmethod
    @torch.no_grad()
    def _nudge(module, args, output) -> None:
        if module.training:
            for name, buf in module.named_buffers():
                if name.endswith("_u"):  # a direction, not a scale: u is normalised
                    buf[0] += 4 * torch.finfo(buf.dtype).eps * buf.abs().max()


def run(out: Path, devices: int, batch: int, mode: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    spec = OpenCLIP(ARCH)
    # BCE without dropout or gradient penalty: nothing random, so 2 x 4 must equal 1 x 8.
    module = AlignGAN(
        spec, objective="bce", mode=mode, n_critic=2, adv_weight=0.5, d_lr=1e-2, spectral_norm=True,
        grl_schedule="linear", warmup_steps=1, grad_clip_norm=None, export_dir="",
    )
    module.configure_model()
    initial = _state(module)
    if os.environ.get("LOCAL_RANK", "0") != "0":
        with torch.no_grad():
            for t in module.discriminator.state_dict().values():
                t.add_(0.5)
    dm = ImageTextDataModule(
        train=SyntheticShapes(64, seed=0, image_size=16),
        val=SyntheticShapes(21, seed=1, image_size=16),  # uneven across ranks on purpose
        batch_size=batch,
        eval_batch_size=4,
        train_augment=False,  # random crops would differ between 1 and 2 processes
    )
    dm.set_preprocessing(spec.preprocessing)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision="64-true",
        max_steps=2,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=out,
        callbacks=[NudgeSpectralVectors()],
    )
    trainer.fit(module, datamodule=dm)
    result = _state(module)
    result["initial"] = {part: {k: v.double() for k, v in values.items()} for part, values in initial.items()}
    result["world"] = trainer.world_size
    result["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if mode == "alternating":
        result["d_steps"] = {int(s["step"]) for s in trainer.optimizers[1].state.values()}
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
