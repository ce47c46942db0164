"""Short fits of MetricAlign, AlignGAN (both modes) and KDStudent under a real Lightning Trainer,
one after another in the same processes; every rank saves, per setting, the gradients of one
encoder step (FSDP's sharded ones gathered to full tensors), the per-step losses, the logged
training terms, the validation metrics and the setting's own state (memory queue, D, how the
teacher is sharded).

    python fsdp_modules_script.py OUT_DIR DEVICES PER_RANK_BATCH [SETTINGS [STRATEGY]]

SETTINGS is a comma-separated subset of ``SETTINGS`` below (default: all). With DEVICES > 1 the
strategy is STRATEGY: ``ddp``, or (default) mmkit's ``fsdp2`` (Lightning's ``ModelParallelStrategy``, tensor parallel 1: the CPU
route to ``fully_shard``; Lightning relaunches this script for the other ranks), float32. Run by tests/techniques/test_fsdp_modules.py, as a script for
2 processes and through ``run`` in the test's own process for the one-process reference.
"""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

from mmkit import AlignGAN, KDStudent, MetricAlign
from mmkit.data import ImageTextDataModule, SyntheticShapes
from mmkit.losses import ClipLoss, DistillationLoss, RankingLoss
from mmkit.models import OpenCLIP, Teacher

ARCH = str(Path(__file__).parents[1] / "models" / "tiny_test_arch.json")
SETTINGS = ("metric_align", "align_gan_alternating", "align_gan_reversal", "align_gan_owned_loss", "kd_student",
            "kd_student_chunked")
CLIP = 0.05  # below every setting's gradient norm: the step clips sharded and replicated gradients together


def _full(t: torch.Tensor) -> torch.Tensor:
    # A sharded DTensor gathered to the full tensor (a collective: every rank calls it).
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _teacher_arch(out: Path) -> str:
    """Wider than the student (embedding 24 vs 16: the loss learns a projection), its own image
    size (24) and context length (12), and 2 blocks per tower, so each is sharded on its own."""
    cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 24, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    path = out / "teacher_arch.json"
    path.write_text(json.dumps(cfg))
    return str(path)


class ProjectedClipLoss(torch.nn.Module):
    """A paired loss with parameters of its own (a learned map of the image features before
    InfoNCE): they sit beside the model, replicated under FSDP2, and need their gradient averaged."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
        self.clip = ClipLoss()

    def forward(self, image_features, text_features, logit_scale, **_):
        image = torch.nn.functional.normalize(self.proj(image_features), dim=-1)
        return self.clip(image_features=image, text_features=text_features, logit_scale=logit_scale)


def _build(name: str, out: Path):
    """The module of a setting, the encoder step whose gradients are saved, and the step count."""
    torch.manual_seed(0)
    common = dict(warmup_steps=1, grad_clip_norm=CLIP, export_dir="")
    if name == "metric_align":
        # Step 1 ranks against the queue filled at step 0 (hardest negatives among batch + queue).
        module = MetricAlign(OpenCLIP(ARCH), loss=RankingLoss(negatives="hardest", memory_size=16),
                             projection_head=True, head_dropout=0.0, **common)
        return module, 1, 2
    if name.startswith("align_gan"):
        # BCE without dropout or gradient penalty: nothing random, so 2 x b must equal 1 x 2b.
        mode = "gradient_reversal" if name.endswith("reversal") else "alternating"
        loss = ProjectedClipLoss(16) if name.endswith("owned_loss") else None
        module = AlignGAN(OpenCLIP(ARCH), loss=loss, objective="bce", mode=mode, n_critic=2, adv_weight=0.5,
                          d_lr=1e-2, spectral_norm=True, grl_schedule="constant", **common)
        return module, 0, 1
    if name.startswith("kd_student"):
        # Chunked: the sharded teacher runs per chunk, the loss's replicated projection gets its
        # gradient through the cached-feature pass.
        chunks = 2 if name.endswith("chunked") else 1
        loss = DistillationLoss(contrastive=1.0, similarity=1.0, feature=1.0, interactive=1.0, temperature=2.0)
        module = KDStudent(OpenCLIP(ARCH), teacher=Teacher(OpenCLIP(_teacher_arch(out))), loss=loss,
                           accumulate_chunks=chunks, **common)
        return module, 0, 1
    raise ValueError(f"unknown setting {name!r}; choose from {SETTINGS}")


class _Capture(L.Callback):
    """Full gradients before the encoder optimizer's step ``step`` (clipped), and each step's loss."""

    def __init__(self, step: int):
        self.step, self.grads, self.losses = step, None, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # AlignGAN's D steps call this hook too, with D's optimizer: only the encoders' step counts.
        if optimizer is not trainer.optimizers[0] or trainer.global_step != self.step:
            return
        self.grads = {n: _full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def _extra(name: str, module, trainer) -> dict:
    if name == "metric_align":
        return {"memory": [t.clone() for t in module.loss[0].memory.entries()]}
    if name.startswith("align_gan"):
        extra = {"discriminator": {k: v.detach().clone() for k, v in module.discriminator.state_dict().items()},
                 "loss": {k: v.detach().clone() for k, v in module.loss.state_dict().items()}}
        if not name.endswith("reversal"):
            extra["d_steps"] = sorted({int(s["step"]) for s in trainer.optimizers[1].state.values()})
        return extra
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    teacher = module._teacher
    params = [p for p in teacher.parameters() if p.ndim > 0]
    in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    return {
        "teacher": {
            "all_dtensors": all(isinstance(p, DTensor) for p in params),
            "mesh_sizes": sorted({p.device_mesh.size() for p in params if isinstance(p, DTensor)}),
            "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
            "full_numel": sum(p.numel() for p in params),
            "blocks_sharded": sum(1 for m in teacher.modules() if isinstance(m, FSDPModule)),
            "requires_grad": any(p.requires_grad for p in teacher.parameters()),
            "in_optimizer": any(id(p) in in_optimizer for p in teacher.parameters()),
            "training": any(m.training for m in teacher.modules()),
        },
        "state_dict_keys": sorted(module.state_dict()),
    }


def run_one(name: str, out: Path, devices: int, batch: int, strategy_name: str = "fsdp2") -> None:
    out.mkdir(parents=True, exist_ok=True)
    module, grad_step, steps = _build(name, out)
    module.configure_model()  # the same initial weights on every rank and in the 1-process run
    if name.startswith("align_gan") and os.environ.get("LOCAL_RANK", "0") != "0":
        with torch.no_grad():  # AlignGAN must copy rank 0's D to every rank (D is not sharded)
            for t in module.discriminator.state_dict().values():
                t.add_(0.5)
    dm = ImageTextDataModule(
        train=SyntheticShapes(64, seed=0, image_size=16),
        val=SyntheticShapes(21, seed=1, image_size=16),  # 11 + 10 rows: uneven across ranks
        batch_size=batch,
        eval_batch_size=4,
        train_augment=False,  # random crops would differ between 1 and 2 processes
    )
    dm.set_preprocessing(module.preprocessing)
    capture = _Capture(grad_step)
    if devices > 1 and strategy_name == "ddp":
        strategy = "ddp"
    elif devices > 1:
        from mmkit.parallel.fsdp2_strategy import FSDP2Strategy  # ModelParallelStrategy, data parallel over all ranks

        strategy = FSDP2Strategy()
    else:
        strategy = "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy,
        precision="32-true",  # ModelParallelStrategy refuses float64
        max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[capture], default_root_dir=out,
    )
    torch.manual_seed(0)
    trainer.fit(module, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    result = {
        "world": trainer.world_size, "grads": capture.grads, "losses": capture.losses, "metrics": metrics,
        **_extra(name, module, trainer),
    }
    torch.save(result, out / f"{name}_rank{trainer.global_rank}.pt")


def run(out: Path, devices: int, batch: int, settings=SETTINGS, strategy_name: str = "fsdp2") -> None:
    for name in settings:
        run_one(name, out / name, devices, batch, strategy_name)


if __name__ == "__main__":
    chosen = sys.argv[4].split(",") if len(sys.argv) > 4 else SETTINGS
    run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), chosen, sys.argv[5] if len(sys.argv) > 5 else "fsdp2")
