"""EWCIncremental: learn a stream of image–text tasks with Elastic Weight Consolidation.

The stream comes from ``mmkit.data.TaskStreamDataModule`` and runs inside one ``trainer.fit``:
epoch ``e`` trains task ``e // epochs_per_task``. At the end of each task the module

1. evaluates every task's validation part (one row of the continual-learning matrix),
2. estimates the diagonal empirical Fisher of the finished task on its training data and stores
   it with the parameters' current values as the anchor (``mmkit.losses.ewc``),

and from then on adds ``λ/2 · Σ F_i (θ_i − θ*_i)²`` to the training loss through the base step's
``parameter_penalty`` hook: one backward carries it with the data loss, under every strategy, with
its analytic gradient ``λ F (θ − θ*)`` (``EWCPenalty.loss``; the Fisher is all-reduced, so every
rank holds the same penalty and the strategy's averaging keeps its gradient as is). Baselines are
settings of the same module: ``ewc_lambda: 0`` is plain fine-tuning, ``importance: uniform`` is L2
to the anchor (F ≡ 1).

Strategies (each exact against one process with the whole batch, tested on 2 gloo processes):

- one device, DDP: Fisher and anchors are whole tensors, the same on every rank.
- FSDP2 (``ModelParallelStrategy``): Fisher and anchors are DTensors in their parameter's layout,
  so each rank stores its shard; the penalty's value is summed over the shards, its gradient lands
  in the sharded ``p.grad`` (FSDP2 adds the reduced data gradient to it). FSDP reduces every
  backward's gradients over ranks before they could be squared, so for the Fisher every rank
  scores every rank's samples (the estimate costs what it costs on one process; memory stays
  sharded) and keeps its shard of each squared gradient.
- DeepSpeed ZeRO-1/2: the penalty's gradient goes through DeepSpeed's backward like the data
  loss's; the Fisher uses ``torch.autograd.grad``, which DeepSpeed's gradient hooks do not see.
  ZeRO-3 (parameters partitioned) is refused.

The penalty state and the matrix live in the checkpoint, so a run can stop after any task and
resume (under FSDP the checkpoint holds the whole tensors, gathered to rank 0, which are cut to
the parameters' layout again on resume, also for another world size). The matrix is written
after every task as CSV + heatmap under ``<log dir>/continual/`` and logged as
``continual/<score>_task<d>`` and ``continual/<score>_<avg|last|bwt|forgetting|fwt>``.

Scores: ``R@1`` is the mean of image→text and text→image Recall@1 on the task's validation part
(both also kept on their own as ``i2t_R@1``, ``t2i_R@1``); ``R@5`` likewise for Recall@5 (less
noisy on small tasks); ``zeroshot_top1`` is the zero-shot accuracy over all
``zero_shot_classes`` (when given and the data has labels).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from mmkit import distributed as D
from mmkit.reports.continual import PLOTTED, score_filename, write_continual_report
from mmkit.config_checks import Range, check_settings
from mmkit.losses.contrastive import ClipLoss
from mmkit.losses.protocol import as_loss
from mmkit.losses.ewc import (
    EWCPenalty,
    autograd_grads,
    fisher_in_layout,
    fisher_sums,
    local,
    normalize_mean,
    reduce_fisher,
)
from mmkit.metrics.continual import ContinualMatrix
from mmkit.metrics.zeroshot import zero_shot_class_names
from mmkit.models.spec import ModelSpec
from mmkit.parallel.ops import parallel_ops
from mmkit.techniques.base import DualEncoderModule
from mmkit.training.gathered_log import log_gathered
from mmkit.training.optim import param_groups, warmup_cosine_factor
from mmkit.run_folder import run_folder

_STREAM_API = ("num_tasks", "task_names", "task_of_epoch", "is_task_end", "task_loader", "epochs_per_task")


class EWCIncremental(DualEncoderModule):
    """Continual image–text learning over a task stream with an EWC penalty (see module docstring).

    Args:
        model: the model spec (e.g. ``mmkit.models.OpenCLIP``).
        loss: the alignment loss, any loss of the loss protocol or a list of them (default
            ``mmkit.losses.ClipLoss``); also the loss whose gradients define the Fisher.
        ewc_lambda: ``λ``, the penalty strength (0: plain fine-tuning; nothing is estimated).
        importance: ``fisher`` (EWC) or ``uniform`` (L2 to the anchor, F ≡ 1: no estimation).
        mode: ``separate`` (one Fisher and anchor per finished task) or ``online`` (one running
            Fisher ``F ← γ F + F_new`` and the latest anchor).
        gamma: decay ``γ`` of the running Fisher in ``online`` mode.
        fisher_estimator: ``per_sample`` (each sample's share of the batch gradient) or
            ``per_batch`` (squared batch-mean gradients); see ``mmkit.losses.ewc``.
        fisher_samples: training samples of the finished task used for the estimate (over all ranks).
        fisher_batch_size: samples per batch (per rank) while estimating; they are each other's
            negatives.
        normalize_fisher: scale each task's Fisher to mean 1 over all parameters, so ``λ`` has the
            same meaning as for ``importance: uniform`` and does not depend on the loss scale.
        schedule_per_task: restart the warmup + cosine learning-rate schedule at every task (each
            task gets the full schedule); otherwise one schedule spans the stream.
        evaluate_before: evaluate every task before training (the ``before`` row, needed for
            forward transfer).
        report_dir: folder for the matrix CSVs and heatmaps (default ``<log dir>/continual``;
            an empty string writes nothing).
        **kwargs: optimisation and evaluation settings of ``DualEncoderModule``.
    """

    setting_ranges = {
        "ewc_lambda": Range(ge=0),
        "gamma": Range(ge=0, le=1),
        "fisher_samples": Range(ge=1, integer=True),
        "fisher_batch_size": Range(ge=1, integer=True),
    }

    def __init__(
        self,
        model: ModelSpec,
        loss: nn.Module | list[nn.Module] | None = None,
        ewc_lambda: float = 1.0,
        importance: Literal["fisher", "uniform"] = "fisher",
        mode: Literal["separate", "online"] = "separate",
        gamma: float = 1.0,
        fisher_estimator: Literal["per_sample", "per_batch"] = "per_sample",
        fisher_samples: int = 256,
        fisher_batch_size: int = 32,
        normalize_fisher: bool = False,
        schedule_per_task: bool = True,
        evaluate_before: bool = True,
        report_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_settings(self, locals(), EWCIncremental.setting_ranges)
        super().__init__(model, **kwargs)
        if importance not in ("fisher", "uniform"):
            raise ValueError(f"importance must be 'fisher' or 'uniform', got {importance!r}")
        if fisher_estimator not in ("per_sample", "per_batch"):
            raise ValueError(f"fisher_estimator must be 'per_sample' or 'per_batch', got {fisher_estimator!r}")
        self.loss = as_loss(loss, default=ClipLoss)
        self.ewc_lambda = ewc_lambda
        self.importance = importance
        self.fisher_estimator = fisher_estimator
        self.fisher_samples = fisher_samples
        self.fisher_batch_size = fisher_batch_size
        self.normalize_fisher = normalize_fisher
        self.schedule_per_task = schedule_per_task
        self.evaluate_before = evaluate_before
        self.report_dir = report_dir
        self._report_out: Path | None = None  # where the matrix files went (resolved on every rank)
        self.penalty = EWCPenalty(mode, gamma)
        self.matrix: ContinualMatrix | None = None
        self._matrix_state: dict | None = None  # restored from a checkpoint before the stream is known
        self._task = -1  # task being trained
        self._task_start_step = 0  # optimizer step at which it started (for the per-task schedule)

    # -- the stream ----------------------------------------------------------------------------
    def _stream(self):
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not all(hasattr(dm, a) for a in _STREAM_API):
            raise TypeError(
                "EWCIncremental trains on a task stream: use mmkit.data.TaskStreamDataModule "
                f"(got {type(dm).__name__})"
            )
        return dm

    def _ensure_matrix(self) -> ContinualMatrix:
        if self.matrix is None:
            dm = self._stream()
            self.matrix = ContinualMatrix(dm.num_tasks, dm.task_names)
            if self._matrix_state is not None:
                self.matrix.load_state_dict(self._matrix_state)
                self._matrix_state = None
        return self.matrix

    def _tracked(self) -> dict[str, nn.Parameter]:
        parallel_ops(self).reshard(self.model)  # FSDP2: the parameters as the optimizer holds them (sharded DTensors)
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def on_fit_start(self) -> None:
        self._stream()
        self._check_strategy()
        self._ensure_matrix()

    def _check_strategy(self) -> None:
        # ZeRO-3 marks the parameters it partitions with ``ds_id``; they are gathered only inside
        # a forward, so neither the Fisher estimate nor the penalty could read them.
        if parallel_ops(self).partitions_parameters:
            raise NotImplementedError(
                "EWCIncremental does not run under DeepSpeed ZeRO stage 3 (parameters partitioned over ranks): "
                "use ZeRO stage 1 or 2 (e.g. recipes/deepspeed/zero2.json) or FSDP2 "
                "(lightning.pytorch.strategies.ModelParallelStrategy), which EWCIncremental supports"
            )

    def on_train_start(self) -> None:
        self.penalty.place(self._tracked())  # on the device; restored whole tensors cut to FSDP shards
        matrix = self._ensure_matrix()
        fresh = self.global_step == 0 and matrix.tasks_done == 0 and not matrix.before
        if self.evaluate_before and fresh:
            matrix.set_before(self._evaluate_tasks())
            self._write_report()

    def on_train_epoch_start(self) -> None:
        task = self._stream().task_of_epoch(self.current_epoch)
        if task != self._task:
            self._task, self._task_start_step = task, self.global_step
            if self.schedule_per_task and task > 0:
                self.lr_schedulers().step()  # the schedule reads the new start: back to warmup

    # -- training ------------------------------------------------------------------------------
    def parameter_penalty(self) -> dict[str, Tensor]:
        # The same value on every rank; its gradient λ F (θ − θ*) is the analytic one (EWCPenalty.loss).
        return {"ewc_loss": self.penalty.loss(self._tracked(), self.ewc_lambda)}

    def on_train_epoch_end(self) -> None:
        dm = self._stream()
        epoch = self.current_epoch
        # A fit stopped by max_steps inside the task's last epoch has not finished the task.
        finished = self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if not (dm.is_task_end(epoch) and finished):
            return
        task = dm.task_of_epoch(epoch)
        matrix = self._ensure_matrix()
        matrix.add_row(task, self._evaluate_tasks())
        # Nothing trains after the last task, so its Fisher would never be used.
        if self.ewc_lambda > 0 and self.penalty.tasks_consolidated <= task < dm.num_tasks - 1:
            fisher = self._estimate_fisher(task) if self.importance == "fisher" else None
            self.penalty.consolidate({n: p.detach() for n, p in self._tracked().items()}, fisher)
        self._log_matrix(task)
        self._write_report()

    # -- per-task evaluation -------------------------------------------------------------------
    def _evaluate_tasks(self) -> dict[str, list[float]]:
        """Scores of the current weights on every task's validation part (identical on all ranks),
        through the base's evaluation (``zero_shot_classifier``, ``score_loader``)."""
        dm = self._stream()
        source = dm.stream_val if dm.stream_val is not None else dm.stream_train  # val parts may come from train
        class_names = zero_shot_class_names(self.zero_shot_classes, getattr(source, "class_names", None), "stream's val data")
        classifier = self.zero_shot_classifier(class_names)
        rows: dict[str, list[float]] = defaultdict(list)
        for task in range(dm.num_tasks):
            scores = _matrix_scores(self.score_loader(dm.task_loader(task, "val"), classifier), classifier is not None)
            for key, value in scores.items():
                rows[key].append(value)
        return dict(rows)

    # -- Fisher --------------------------------------------------------------------------------
    def _estimate_fisher(self, task: int) -> dict[str, Tensor]:
        loader = self._stream().task_loader(task, "train", batch_size=self.fisher_batch_size, shuffle=True)
        per_rank = math.ceil(self.fisher_samples / D.world_size())
        batches = _take(((b["images"], b["texts"]) for b in loader if b["images"].shape[0] > 0), per_rank)
        params = self._tracked()  # (resharded first)
        sharded = parallel_ops(self).shards_parameters
        if sharded:
            # FSDP averages each backward's gradients over ranks (reduce-scatter) before anyone could
            # square them: so every rank scores every rank's samples, one backward each, and squares
            # its shard of that sample's exact gradient. Same samples and sums as the DDP path.
            batches = _every_ranks_batches(batches)
        batches = (move_data_to_device(b, self.device) for b in batches)
        was_training = self.model.training
        self.model.eval()  # the Fisher of the deterministic model (no dropout)
        stash = {p: p.grad for p in self.parameters()} if sharded else {}
        try:
            for p in stash:
                p.grad = None
            sums, count = fisher_sums(
                params, batches, self.model, lambda **out: self.compute_loss(out, {}),
                per_rank * D.world_size() if sharded else per_rank, self.fisher_estimator,
                self._backward_grads if sharded else autograd_grads,
            )
        finally:
            self.model.train(was_training)
            for p, g in stash.items():
                p.grad = g
        # DDP / one device: a collective sum of the ranks' shares, the same Fisher on every rank.
        fisher = fisher_in_layout(sums, count, params) if sharded else reduce_fisher(sums, count)
        return normalize_mean(fisher) if self.normalize_fisher else fisher

    def _backward_grads(self, output: Tensor, params: dict[str, Tensor]) -> list[Tensor]:
        """Gradients through FSDP's own backward (``autograd.grad`` cannot reach sharded
        parameters): every rank back-propagates the same sample, so the reduced gradient is that
        sample's; returns each parameter's local shard and clears ``p.grad``."""
        output.backward()
        with torch.no_grad():
            grads = [torch.zeros_like(local(p)) if p.grad is None else local(p.grad) for p in params.values()]
        for p in self.parameters():
            p.grad = None
        return grads

    # -- reporting -----------------------------------------------------------------------------
    def _log_matrix(self, task: int) -> None:
        matrix = self._ensure_matrix()
        values: dict[str, float] = {}
        for score, rows in matrix.rows.items():
            for d, value in enumerate(rows[task]):
                values[f"continual/{score}_task{d}"] = value
            for key, value in matrix.summary(score).items():
                if math.isfinite(value):
                    values[f"continual/{score}_{key}"] = value
        values["continual/tasks_done"] = float(task + 1)
        log_gathered(self, values)  # the matrix is scored over every rank's data

    def _write_report(self) -> None:
        if self.report_dir == "":
            return
        out = Path(self.report_dir) if self.report_dir else run_folder(self.trainer) / "continual"  # every rank
        self._report_out = out
        if self.trainer.is_global_zero:
            write_continual_report(out, self._ensure_matrix())

    def report_figures(self) -> dict[str, Path]:
        """The continual-learning matrix heatmaps written after the last task, for the run report."""
        out = self._report_out
        if out is None:
            return {}
        pngs = {score: out / f"{score_filename(score)}.png" for score in PLOTTED}
        return {f"Continual-learning matrix: {score} (rows: after each task; columns: task evaluated)": path
                for score, path in pngs.items() if path.is_file()}

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        if not self.schedule_per_task:
            return super().configure_optimizers()
        opt = self._adamw(param_groups(self, self.weight_decay))
        # A function, not a callable object: LambdaLR then keeps it out of the checkpoint.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: self._lr_factor())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_factor(self) -> float:
        """Warmup + cosine within the current task, from the steps taken since it started."""
        total = math.inf
        if self._trainer is not None and self.trainer.datamodule is not None:
            total = self.trainer.num_training_batches * getattr(self.trainer.datamodule, "epochs_per_task", 1)
        return warmup_cosine_factor(self.global_step - self._task_start_step, self.warmup_steps, total, self.min_lr_ratio)

    # -- checkpoint ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        matrix = self.matrix.state_dict() if self.matrix is not None else self._matrix_state
        checkpoint["ewc_incremental"] = {
            "penalty": self.penalty.state_dict(),
            "matrix": matrix,
            "task": self._task,
            "task_start_step": self._task_start_step,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ewc_incremental")
        if state is None:
            return
        self.penalty.load_state_dict(state["penalty"])
        self._task, self._task_start_step = int(state["task"]), int(state["task_start_step"])
        self.matrix, self._matrix_state = None, state["matrix"]


def _matrix_scores(scores: dict[str, Tensor], zero_shot: bool) -> dict[str, float]:
    """One task's entries of the matrix from ``score_loader``'s scores (NaN: no sample on any rank):
    ``R@k`` is the mean of image→text and text→image Recall@k."""
    keys = ["i2t_R@1", "t2i_R@1", "R@1", "R@5"] + (["zeroshot_top1"] if zero_shot else [])
    if not scores:
        return dict.fromkeys(keys, math.nan)
    row = {k: float(scores[k]) for k in ("i2t_R@1", "t2i_R@1")}
    for k in ("R@1", "R@5"):
        row[k] = 0.5 * (float(scores[f"i2t_{k}"]) + float(scores[f"t2i_{k}"]))
    if zero_shot:
        row["zeroshot_top1"] = float(scores["zeroshot_top1"])
    return row


def _take(batches, n: int):
    """The first ``n`` samples of ``(images, texts)`` batches (the last batch cut to fit)."""
    if n <= 0:
        return
    for images, texts in batches:
        if images.shape[0] > n:
            images = images[:n]
            texts = {k: v[:n] for k, v in texts.items()} if isinstance(texts, dict) else texts[:n]
        n -= images.shape[0]
        yield images, texts
        if n <= 0:
            return  # before the loader loads another batch


def _every_ranks_batches(batches):
    """Every rank's batches on every rank, in rank order, round by round (a collective per round
    until every rank has run out). Batches are gathered as they come from the loader (CPU)."""
    mine = iter(batches)
    while True:
        everyone = D.all_gather_object(next(mine, None))
        if all(b is None for b in everyone):
            return
        yield from (b for b in everyone if b is not None)
