"""FLOPs of one training step per sample, counted once by ``torch.utils.flop_counter``.

The count is a side pass on a real batch, outside the training step: one forward through both
towers (and ``project``), the technique's ``compute_loss`` on a copy of the loss (a memory queue
is not advanced), and the backward into the trainable parameters, in eager mode (compiled
kernels are invisible to the counter). The RNG streams and the buffers (BatchNorm statistics)
are put back afterwards and no gradient is left behind, so the run trains as it would without
the count. These are model FLOPs: exact
chunked accumulation's second forward and the optimizer (element-wise work) are not counted.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmkit.parallel.ops import DeepSpeedOps, parallel_ops
from mmkit.rng_state import rng_state_preserved


@contextlib.contextmanager
def _buffers_preserved(module: torch.nn.Module):
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _eager():
    # Compiled regions bypass the dispatcher the counter listens to: run them eagerly here.
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def training_flops_per_sample(pl_module, batch: dict) -> float:
    """Forward + backward FLOPs of one training step of ``pl_module`` (an mmkit technique) per
    sample of ``batch`` (this rank's rows). Every rank must call it: the forward may be a
    collective (a gathered loss, sharded parameters).

    Under FSDP2 and DeepSpeed the backward is not run (the strategy's hooks would reduce or
    partition its gradients) but counted as twice the forward, the usual estimate (too high where
    a tower is locked).
    """
    from mmkit.techniques.base import loss_total

    rows = int(batch["images"].shape[0])
    if rows == 0:
        raise ValueError("training_flops_per_sample: the batch has no rows")
    ops = parallel_ops(pl_module)
    estimated = ops.shards_parameters or isinstance(ops, DeepSpeedOps)
    params = [p for p in pl_module.parameters() if p.requires_grad]
    loss = pl_module.loss
    counter = FlopCounterMode(display=False)
    try:
        pl_module.loss = copy.deepcopy(loss)  # a stateful loss (memory queue) is left as it was
        with rng_state_preserved(), _buffers_preserved(pl_module), _eager(), counter:
            outputs = pl_module(batch["images"], batch["texts"])
            total = loss_total(pl_module.compute_loss(outputs, batch))
            forward = counter.get_total_flops()
            if not estimated and params and total.requires_grad:
                # grad(), not backward(): nothing is accumulated into .grad, no reduction hook fires.
                try:
                    torch.autograd.grad(total, params, allow_unused=True)
                except RuntimeError:
                    # The counter's module hooks refuse grad() when a forward returns a leaf
                    # parameter itself (SigLIP's logit bias): fall back to the estimate.
                    estimated = True
    finally:
        pl_module.loss = loss
    flops = counter.get_total_flops() if not estimated else 3 * forward
    return flops / rows
