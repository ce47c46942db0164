"""2-task EWCIncremental fits under every supported strategy, on 2 real gloo processes, and the
same stream on one process with the double batch; each run saves what the tests compare.

    python ewc_ddp_script.py OUT_DIR [RUN ...]

RUN (default: all, in this order):

- ``single``: one process (rank 0, the other waits), batch 8: the reference.
- ``ddp``: Lightning DDP, batch 4 per rank; also each rank's own, un-reduced Fisher sums.
- ``fsdp``: FSDP2 (``ModelParallelStrategy``, the CPU route), batch 4 per rank, a sharded
  checkpoint after each task; ``fsdp_resume`` resumes from the one after task 0 and trains task 1.
- ``zero1``, ``zero2``, ``zero2_chunks`` (``accumulate_chunks=2``): DeepSpeed through mmkit's
  ``DeepSpeedStrategy`` minus Lightning's CUDA check (``deepspeed_cpu.CPUDeepSpeedStrategy``).
- ``zero3``: DeepSpeed ZeRO-3, which EWCIncremental refuses: saves the error message.

Each run writes ``<run>_rank<r>.pt``: the Fisher (per-sample estimator) and anchor stored after
task 0 (gathered whole), for every step of task 1 the penalty's value and gradient, the step's
whole gradient and the weights after the step, and a per-batch Fisher of task 0 at the end. All ranks run every distributed run in the same order (one process
group, several Trainers: Lightning sees the processes as launched externally).

Run by tests/techniques/test_ewc_sharded.py through ``tests/dist_utils.run_on_processes(worker, 2, ...)``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import deepspeed_cpu  # noqa: E402,F401  (DS_ACCELERATOR=cpu before anything imports deepspeed)

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.fabric.utilities.apply_func import move_data_to_device  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from mmkit import EWCIncremental  # noqa: E402
from mmkit import distributed as D  # noqa: E402
from mmkit.data import SyntheticShapes, TaskStreamDataModule  # noqa: E402
from mmkit.losses.ewc import fisher_sums, is_dtensor, like, local  # noqa: E402
from mmkit.models import OpenCLIP  # noqa: E402

ROOT = HERE.parents[1]
ARCH = str(HERE.parent / "models" / "tiny_test_arch.json")
RUNS = ["single", "ddp", "fsdp", "fsdp_resume", "zero1", "zero2", "zero2_chunks", "zero3"]
PER_RANK, WORLD = 4, 2
LAMBDA = 5.0  # with the Fisher at mean 1: the penalty's gradient is a sizeable part of the step's
FISHER_SAMPLES, FISHER_BATCH = 12, 3  # 6 per rank = 2 batches: the same batches as one process
GROUPS = [["circle", "square", "triangle"], ["cross", "star"]]


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if is_dtensor(t) else t).detach().cpu().clone()


def _grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    if hasattr(p, "_hp_mapping"):  # DeepSpeed ZeRO-1/2: gathered from its partitions (a collective)
        from deepspeed.utils import safe_get_full_grad

        g = safe_get_full_grad(p)
        return None if g is None else g.detach().cpu().clone()
    return None if p.grad is None else _whole(p.grad)


class Record(L.Callback):
    """Penalty state at the start of task 1, and per step of task 1: penalty value and gradient,
    the whole gradient before the optimizer step, and the weights after it."""

    def __init__(self) -> None:
        self.state: dict = {}
        self.steps: list[dict] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != 1:
            return
        (term,) = pl_module.penalty.terms
        self.state = {
            "fisher": {n: _whole(f) for n, f in term["fisher"].items()},
            "anchor": {n: _whole(a) for n, a in term["anchor"].items()},
            "is_dtensor": {n: is_dtensor(f) for n, f in term["fisher"].items()},
            "local_numel": sum(local(f).numel() for f in term["fisher"].values()),
            "numel": sum(f.numel() for f in term["fisher"].values()),
        }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.current_epoch != 1:
            return
        params = {n: p for n, p in pl_module.model.named_parameters() if p.requires_grad}
        value, pen = pl_module.penalty(params, pl_module.ewc_lambda)  # collective under FSDP
        grads = {n: _grad(p) for n, p in params.items()}
        self.steps.append({
            "penalty": float(value),
            "penalty_grads": {n: _whole(like(g, params[n])) for n, g in pen.items()},  # local shards
            "grads": {n: g for n, g in grads.items() if g is not None},
        })

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch != 1:
            return
        self.steps[-1]["weights"] = {n: _whole(p) for n, p in pl_module.model.named_parameters()}
        self.steps[-1]["logged_ewc"] = float(trainer.callback_metrics["train/ewc_loss"])


def _deepspeed_config(run: str) -> dict:
    cfg = json.loads((ROOT / "recipes" / "deepspeed" / "zero2.json").read_text())
    cfg["zero_optimization"]["stage"] = {"zero1": 1, "zero2": 2, "zero2_chunks": 2, "zero3": 3}[run]
    return cfg


def _strategy(run: str):
    if run == "single":
        return "auto"
    if run == "ddp":
        return "ddp"
    if run.startswith("fsdp"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    return deepspeed_cpu.CPUDeepSpeedStrategy(config=_deepspeed_config(run))


def fit(run: str, out: Path) -> dict:
    torch.manual_seed(0)
    module = EWCIncremental(
        OpenCLIP(ARCH), ewc_lambda=LAMBDA, fisher_samples=FISHER_SAMPLES, fisher_batch_size=FISHER_BATCH,
        normalize_fisher=True,  # also the sharded global mean
        lr=1e-3, warmup_steps=1, grad_clip_norm=None, accumulate_chunks=2 if run.endswith("chunks") else 1,
        evaluate_before=False, export_dir="", report_dir="",
    )
    module.configure_model()  # the same initial weights in every run and on every rank
    single = run == "single"
    dm = TaskStreamDataModule(
        train=SyntheticShapes(27, seed=0, image_size=16), val=SyntheticShapes(10, seed=1, image_size=16),
        task_groups=GROUPS, batch_size=PER_RANK * (WORLD if single else 1), eval_batch_size=8,
        train_augment=False, preprocessing=module.preprocessing,
    )
    record = Record()
    callbacks = [record]
    if run == "fsdp":  # a sharded (distributed) checkpoint after each task
        callbacks.append(ModelCheckpoint(dirpath=out / "fsdp_ckpt", save_top_k=-1, every_n_epochs=1))
    trainer = L.Trainer(
        accelerator="cpu", devices=1 if single else WORLD, strategy=_strategy(run), precision="32-true",
        max_epochs=2, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, limit_val_batches=0,
        logger=False, enable_checkpointing=run == "fsdp", enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=callbacks, default_root_dir=out / run,
        log_every_n_steps=1,  # Record reads train/ewc_loss after every step
    )
    result: dict = {"world": trainer.world_size}
    ckpt = None
    if run == "fsdp_resume":
        (ckpt,) = (out / "fsdp_ckpt").glob("epoch=0-*")
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    except NotImplementedError as e:  # the refused strategies
        return {**result, "error": str(e)}
    result.update(record.state, steps=record.steps, matrix=module.matrix.state_dict(),
                  tasks_consolidated=module.penalty.tasks_consolidated)
    # The other estimator, on task 0 at the final weights (a collective, as at a task's end).
    module.fisher_estimator = "per_batch"
    result["per_batch"] = {n: _whole(f) for n, f in module._estimate_fisher(0).items()}
    if run == "ddp":
        result["local"] = _own_share(module, dm)
    return result


def _own_share(module, dm) -> tuple[dict, int]:
    """This rank's own, un-reduced share of the task-0 Fisher, recomputed at the anchor (the
    weights the estimate was taken at): the stored Fisher must pool both ranks' shares."""
    (term,) = module.penalty.terms
    model = module.model
    model.load_state_dict({**model.state_dict(), **term["anchor"]})
    model.eval()
    loader = dm.task_loader(0, "train", batch_size=FISHER_BATCH, shuffle=True)
    batches = ((b["images"], b["texts"]) for b in (move_data_to_device(b, module.device) for b in loader))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return fisher_sums(params, batches, model, lambda **o: module.loss(**o), FISHER_SAMPLES // WORLD, "per_sample")


def worker(rank: int, world: int, out: str, runs: list[str]) -> None:
    """One rank (in a gloo group already set up by ``run_on_processes``) running ``runs``."""
    out = Path(out)
    for run in runs:
        if run == "single":
            if rank == 0:
                with D.local_only():  # mmkit's collectives act as on one process
                    torch.save(fit(run, out), out / f"{run}_rank0.pt")
            dist.barrier()
            continue
        # Lightning joins the existing process group and launches nothing when LOCAL_RANK is set.
        os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), RANK=str(rank))
        torch.save(fit(run, out), out / f"{run}_rank{rank}.pt")
        dist.barrier()


if __name__ == "__main__":
    from dist_utils import run_on_processes

    run_on_processes(worker, WORLD, sys.argv[1], sys.argv[2:] or RUNS)
