"""One CLIPPretrain training step + validation under a real Lightning Trainer; saves rank 0's
gradients (after DDP's all-reduce) and validation metrics.

    python ddp_step_script.py OUT_DIR DEVICES PER_RANK_BATCH LOSS [NUM_NODES [STRATEGY [STEPS [COMPILE]]]]

STRATEGY is ``ddp`` (default) or ``fsdp`` (FSDP2 through ModelParallelStrategy, the CPU route).
STEPS training steps are taken (default 1); under DDP the model's weights after them go to
weights.pt. COMPILE ``1`` compiles the towers (``compile: true``; default 0).

Run by tests/techniques/test_ddp_exactness.py (Lightning's `ddp` strategy relaunches this script
for the other ranks) and by tests/launch/test_multinode.py (with NUM_NODES=2 the test starts one
process per "node" with NODE_RANK/LOCAL_RANK/MASTER_* set, as an external launcher would; and
under torchrun).
"""

import sys
from pathlib import Path

import lightning as L
import torch

from mmkit import CLIPPretrain
from mmkit.data import ImageTextDataModule, SyntheticShapes
from mmkit.losses import ClipLoss, RankingLoss, SigLipLoss
from mmkit.models import OpenCLIP

ARCH = str(Path(__file__).parents[1] / "models" / "tiny_test_arch.json")


class SaveGrads(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step != 0:
            return
        # FSDP gradients are sharded DTensors: gathering them is a collective on every rank.
        grads = {
            n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in pl_module.model.named_parameters()
            if p.grad is not None
        }
        if trainer.global_rank == 0:
            torch.save(grads, self.out / "grads.pt")


def _strategy(name: str, devices: int):
    if name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    return name


def main() -> None:
    out, devices, batch, loss_name = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    num_nodes = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    strategy_name = sys.argv[6] if len(sys.argv) > 6 else "ddp"
    steps = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    compile_towers = len(sys.argv) > 8 and sys.argv[8] == "1"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    losses = {
        "clip": ClipLoss(), "clip_local": ClipLoss(local_loss=True), "siglip": SigLipLoss(),
        "ranking": RankingLoss(negatives="hardest"),  # a hinge: the temperature gets no gradient
    }
    spec = OpenCLIP(ARCH, init_logit_bias=-5.0 if loss_name == "siglip" else None)
    module = CLIPPretrain(spec, loss=losses[loss_name], warmup_steps=1, grad_clip_norm=None, export_dir="",
                          compile=compile_towers)
    module.configure_model()  # same initial weights on every rank and in the 1-process run
    dm = ImageTextDataModule(
        train=SyntheticShapes(64, seed=0, image_size=16),
        val=SyntheticShapes(21, seed=1, image_size=16),  # uneven across ranks on purpose
        batch_size=batch,
        eval_batch_size=4,
        train_augment=False,  # random crops would differ between 1 and 2 processes
    )
    dm.set_preprocessing(spec.preprocessing)
    world = devices * num_nodes
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=_strategy(strategy_name, devices) if world > 1 else "auto",
        # ModelParallelStrategy refuses float64; its runs (and their 1-process reference) use float32.
        precision="32-true" if strategy_name == "fsdp" else "64-true",
        max_steps=steps,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[SaveGrads(out)],
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=dm)
    if trainer.global_rank == 0:
        if strategy_name == "ddp":  # (FSDP's are sharded DTensors)
            torch.save({n: p.detach().clone() for n, p in module.model.named_parameters()}, out / "weights.pt")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/loss"))}
        env = type(getattr(trainer.strategy, "cluster_environment", None)).__name__  # who set the ranks
        torch.save({"metrics": metrics, "world": trainer.world_size, "env": env}, out / "metrics.pt")


if __name__ == "__main__":
    main()
