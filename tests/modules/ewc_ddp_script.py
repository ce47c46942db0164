"""A 2-task EWCIncremental fit under Lightning DDP (2 gloo processes); each rank saves the Fisher
and anchor it holds after task 0, its own un-reduced Fisher sums, and the matrix.

    python ewc_ddp_script.py OUT_DIR

Run by tests/modules/test_ewc_incremental.py (Lightning's `ddp` strategy relaunches this script
for rank 1).
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from mmkit import EWCIncremental
from mmkit import distributed as D
from mmkit.data import SyntheticShapes, TaskStreamDataModule
from mmkit.losses.ewc import fisher_sums
from mmkit.models import OpenCLIP

ARCH = str(Path(__file__).parents[1] / "models" / "tiny_test_arch.json")


class KeepParamsAfterTask0(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            pl_module.after_task0 = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = EWCIncremental(OpenCLIP(ARCH), ewc_lambda=1.0, fisher_samples=10, fisher_batch_size=3,
                            warmup_steps=1, export_dir="", report_dir="")
    module.configure_model()  # same initial weights on every rank
    dm = TaskStreamDataModule(
        train=SyntheticShapes(24, seed=0, image_size=16), val=SyntheticShapes(11, seed=1, image_size=16),
        task_groups=[["circle", "square", "triangle"], ["cross", "star"]], batch_size=4, train_augment=False,
        preprocessing=module.preprocessing,
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, reload_dataloaders_every_n_epochs=1,
        num_sanity_val_steps=0, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[KeepParamsAfterTask0()], default_root_dir=out,
    )
    trainer.fit(module, datamodule=dm)
    (term,) = module.penalty.terms

    # This rank's own share of the task-0 estimate, recomputed at the anchor (the weights the
    # estimate was taken at): the test checks the stored Fisher pools both ranks' shares.
    model = module.model
    model.load_state_dict({**model.state_dict(), **term["anchor"]})
    model.eval()
    loader = dm.task_loader(0, "train", batch_size=3, shuffle=True)
    batches = ((b["images"], b["texts"]) for b in (move_data_to_device(b, module.device) for b in loader))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums, count = fisher_sums(params, batches, model, lambda **o: module.loss(**o), 5, "per_sample")
    assert all(torch.equal(term["anchor"][n], module.after_task0[n]) for n in term["anchor"])
    torch.save(
        {"fisher": term["fisher"], "anchor": term["anchor"], "local": (sums, count),
         "matrix": module.matrix.state_dict(), "world": D.world_size()},
        out / f"rank{trainer.global_rank}.pt",
    )
    trainer.strategy.barrier("saved")  # rank 0 must not exit (ending the test's wait) before rank 1 saved


if __name__ == "__main__":
    main()
