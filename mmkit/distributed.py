"""The one place that talks to ``torch.distributed``.

Everything that crosses processes (feature gathers for the loss, embedding gathers for
evaluation, counters) goes through these helpers, so losses and metrics stay plain tensor code
and behave identically on one process (where every helper is the identity).
"""

from __future__ import annotations

import atexit
import contextlib
import os

import torch
import torch.distributed as dist
from torch import Tensor

_local_only_depth = 0  # > 0 inside ``local_only()``
_group_ends_at_exit = False


def destroy_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, if it is still there.

    Lightning keeps the group after ``fit`` (a ``test`` may follow), and a gloo group still alive
    when Python finalizes can abort the process ("terminate called without an active exception",
    pytorch/pytorch#190489): a finished run would exit with SIGABRT about half the time. An
    ``atexit`` hook runs while the interpreter is still whole. Registered once, from mmkit's
    modules' and data modules' ``setup``."""
    global _group_ends_at_exit
    if not _group_ends_at_exit:
        atexit.register(_destroy_group_if_alive)
        _group_ends_at_exit = True


def _destroy_group_if_alive() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_from_flag(choice: str) -> torch.device:
    """The device a command's ``--device`` names: ``auto`` (this process's GPU where CUDA is
    visible, else the CPU), ``cpu``, ``cuda`` (this process's GPU, ``LOCAL_RANK`` under a
    launcher) or ``cuda:N``. CUDA asked for where none is visible is an error."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {choice}: no CUDA device is visible")
    if choice == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(choice)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and _local_only_depth == 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_sizes(n: int, device: torch.device | None = None) -> list[int]:
    """Number of rows each rank holds (ranks may hold different counts, e.g. a last partial batch)."""
    if not is_distributed():
        return [n]
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]


def _all_gather_padded(x: Tensor, sizes: list[int]) -> Tensor:
    # all_gather needs equal shapes: pad every rank to the largest row count, then trim.
    max_rows = max(sizes)
    if x.shape[0] < max_rows:
        pad = x.new_zeros((max_rows - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums the incoming gradient over ranks and keeps
    this rank's rows.

    Summing is what makes the result exact under DDP: each rank's loss depends on every rank's
    features, so the gradient a rank owes its own features is the sum over all ranks' losses;
    DDP then averages parameter gradients, which cancels the 1/N of a rank-replicated loss.
    """

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        ctx.rank = rank()
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Gather rows from all ranks (sizes may differ) keeping autograd.

    Returns the concatenated tensor and the offset of this rank's rows inside it.
    """
    if not is_distributed():
        return x, 0
    sizes = gather_sizes(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, sizes), sum(sizes[: rank()])


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Gather rows from all ranks (sizes may differ), for evaluation and bookkeeping."""
    if not is_distributed():
        return x
    return _all_gather_padded(x, gather_sizes(x.shape[0], x.device))


def mean_divisor(count: float, partitioned: bool = True) -> float:
    """What a rank divides its sum of per-item loss terms by, so that the loss is exact across ranks.

    ``count`` is the number of items the mean runs over (at least 1 is used: no items give a loss
    of 0, not NaN). ``partitioned``: each rank summed only its own items' terms; the divisor is then
    ``count`` (over all ranks) / world size, so that the mean of the per-rank values, which DDP's
    gradient averaging takes, is the mean over all items, also when ranks hold different numbers
    of them. Not partitioned (a loss every rank computes whole, or one kept on its own rank): the
    divisor is ``count``.
    """
    return max(float(count), 1.0) / (world_size() if partitioned else 1)


def global_mean_divisor(local_count: int, device: torch.device | None = None) -> float:
    """``mean_divisor`` of every rank's ``local_count`` added up (one all_gather of an integer)."""
    return mean_divisor(sum(gather_sizes(local_count, device)))


def all_reduce_sum(x: Tensor) -> Tensor:
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def broadcast_from_rank_zero_(tensors: list[Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values: one flat broadcast per dtype and device."""
    if not is_distributed() or not tensors:
        return
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def local_only():
    """Context in which the helpers above act as on one process (e.g. a per-rank validation
    loss, where ranks may run different numbers of batches and must not wait on each other)."""
    global _local_only_depth
    _local_only_depth += 1
    try:
        yield
    finally:
        _local_only_depth -= 1


@torch.no_grad()
def average_gradients_(params) -> None:
    """Average the gradients of ``params`` over ranks in place, as DDP does for the parameters it
    manages (for parameters kept outside it). One all-reduce per gradient dtype; a no-op on one process."""
    if world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


# -- tensors in a sharded parameter's layout (FSDP2 DTensors), used where a tensor follows its parameter --
def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2-sharded parameter or a tensor in its layout)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return False
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local shard of a DTensor, ``t`` itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def like(local_part: Tensor, param: Tensor) -> Tensor:
    """``local_part`` (this rank's part) in ``param``'s layout: a DTensor with the parameter's
    mesh, placements and global shape when the parameter is one; unchanged otherwise."""
    if not is_dtensor(param):
        return local_part
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_part, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def shard_like(full: Tensor, param: Tensor) -> Tensor:
    """A full tensor (e.g. read from a checkpoint, identical on every rank) cut to ``param``'s
    layout without communication; moved to the parameter's device."""
    full = full.to(param.device)
    if not is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank takes its shard from its own full copy, no collective.
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
