"""Two AlignGAN ``mode: gradient_reversal`` training steps under a real Lightning Trainer, on
mmkit's DeepSpeed strategy (Lightning's CUDA check removed: ``deepspeed_cpu.CPUDeepSpeedStrategy``) or on
one plain process. Rank 1 starts from another D: DeepSpeed must replace its weights, and AlignGAN
its spectral-norm vectors, with rank 0's. Rank 0 saves each step's loss (mean over ranks) and
gradients (gathered from the ZeRO partitions: encoders, temperature and D) and the trained fp32
weights.

    python deepspeed_align_gan_fit_script.py OUT_DIR DEVICES PER_RANK_BATCH DEEPSPEED_JSON

Run by tests/techniques/test_deepspeed_modules.py: as a script for DeepSpeed (Lightning relaunches
it for the other rank) and through ``run`` in the test's own process (``DEEPSPEED_JSON`` None)
for the one-process reference with the double batch.
"""

import os
import sys
from pathlib import Path

import deepspeed_cpu  # before anything imports deepspeed (it sets DS_ACCELERATOR=cpu)
import lightning as L
import torch

from mmkit import AlignGAN
from mmkit.data import ImageTextDataModule, SyntheticShapes
from mmkit.models import OpenCLIP
from mmkit.parallel import deepspeed_support as ds

ARCH = str(Path(__file__).parents[1] / "models" / "tiny_test_arch.json")


class Record(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.state: dict = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # After the backward (DeepSpeed: after its reduction), before the optimizer step.
        if ds.holds(pl_module):
            from deepspeed.utils import safe_get_full_grad as full  # collectives under ZeRO
        else:
            full = lambda p: p.grad  # noqa: E731
        self.steps.append({"grads": {n: full(p).clone() for n, p in pl_module.named_parameters() if p.requires_grad}})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps[-1]["loss"] = trainer.strategy.reduce(loss.detach().clone(), reduce_op="mean")

    def on_fit_end(self, trainer, pl_module) -> None:
        held = ds.holds(pl_module)
        self.state = ds.full_state_dict(pl_module) if held else {k: v.clone() for k, v in pl_module.state_dict().items()}


def run(out: Path, devices: int, batch: int, deepspeed_json: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    spec = OpenCLIP(ARCH)
    # BCE, no dropout, no gradient penalty, constant reversal weight: nothing random, the encoders
    # get D's reversed gradient from the first step; 2 x 4 must equal 1 x 8.
    module = AlignGAN(
        spec, objective="bce", mode="gradient_reversal", adv_weight=0.5, grl_schedule="constant",
        d_hidden_dim=32, d_lr=1e-2, lr=1e-3, warmup_steps=1, grad_clip_norm=None, export_dir="",
        max_logit_scale=10.0,  # below the initial 1/0.07: the clamp acts (on DeepSpeed's master copy too)
    )
    module.configure_model()
    if devices > 1 and int(os.environ.get("LOCAL_RANK", "0")) != 0:
        # Another D on rank 1: DeepSpeed broadcasts rank 0's weights, AlignGAN its spectral-norm vectors.
        with torch.no_grad():
            for t in module.discriminator.state_dict().values():
                t.add_(0.5)
    dm = ImageTextDataModule(train=SyntheticShapes(64, seed=0, image_size=16), batch_size=batch, train_augment=False)
    dm.set_preprocessing(spec.preprocessing)
    record = Record()
    strategy = deepspeed_cpu.CPUDeepSpeedStrategy(config=deepspeed_json) if deepspeed_json else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, precision="32-true", max_steps=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, default_root_dir=out, callbacks=[record],
    )
    trainer.fit(module, datamodule=dm)
    if trainer.is_global_zero:
        engine = trainer.strategy.model
        stage = engine.zero_optimization_stage() if ds.is_deepspeed_engine(engine) else None
        torch.save({"steps": record.steps, "state": record.state, "world": trainer.world_size, "zero_stage": stage,
                    "global_step": trainer.global_step}, out / "result.pt")


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
