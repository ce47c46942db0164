"""Hinge losses on 2 real gloo processes with per-rank batch b == one process with batch 2b:
loss value, statistics, parameter gradients (averaged over ranks, as DDP does) and the memory
queue, for every negative strategy, including uneven per-rank batches and repeated image ids."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import run_on_processes
from mmkit.losses import RankingLoss, TripletLoss

WORLD, N, D_IN, DIM, STEPS = 2, 6, 7, 5, 3
# Rows of the global batch each rank holds (the last config splits unevenly).
EVEN = [slice(0, 3), slice(3, 6)]
UNEVEN = [slice(0, 2), slice(2, 6)]

CONFIGS = {
    "all": (lambda: RankingLoss(margin=0.3), EVEN),
    "hardest": (lambda: RankingLoss(negatives="hardest"), EVEN),
    "warmup_then_hardest": (lambda: RankingLoss(negatives="hardest", sum_warmup_steps=2), EVEN),
    "semi_hard_triplet": (lambda: TripletLoss(margin=0.5), EVEN),
    "top_k_mean": (lambda: RankingLoss(negatives="top_k", num_negatives=2, reduction="mean"), EVEN),
    "random": (lambda: RankingLoss(negatives="random", num_negatives=2, seed=3), EVEN),
    "hardest_memory": (lambda: RankingLoss(negatives="hardest", memory_size=8), EVEN),
    "euclidean_memory_uneven": (lambda: TripletLoss(negatives="hardest", memory_size=4), UNEVEN),
}


def _params():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(D_IN, DIM, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(D_IN, DIM, generator=g, dtype=torch.float64).requires_grad_())


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    y = x + 0.8 * torch.randn(N, D_IN, generator=g, dtype=torch.float64)  # captions correlate with images
    ids = torch.tensor([0, 1, 2, 3, 2, 5]) + 10 * step  # rows 2 and 4 (on different ranks) share an image
    return x, y, ids


def _run(make_loss, rows):
    """STEPS training steps of a linear 'dual encoder'; the last step's loss, statistics and grads."""
    w_img, w_txt = _params()
    loss_fn = make_loss()
    for step in range(STEPS):
        x, y, ids = _batch(step)
        w_img.grad = w_txt.grad = None
        out = loss_fn(image_features=F.normalize(x[rows] @ w_img, dim=-1),
                      text_features=F.normalize(y[rows] @ w_txt, dim=-1), step=step, image_ids=ids[rows])
        loss = next(v for k, v in out.items() if k.endswith("_loss"))
        loss.backward()
    stats = {k: v.item() for k, v in out.items() if not k.endswith("_loss")}
    memory = [t.clone() for t in loss_fn.memory.entries()] if loss_fn.memory is not None else None
    return loss.detach(), stats, [w_img.grad.clone(), w_txt.grad.clone()], memory


def _worker(rank, world, out_dir):
    for name, (make_loss, split) in CONFIGS.items():
        loss, stats, grads, memory = _run(make_loss, split[rank])
        # What DDP does: average the loss for logging and the gradients for the update.
        dist.all_reduce(loss)
        for g in grads:
            dist.all_reduce(g)
            g /= world
        torch.save({"loss": loss / world, "stats": stats, "grads": grads, "memory": memory},
                   Path(out_dir) / f"{name}_rank{rank}.pt")


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranking_dist")
    run_on_processes(_worker, WORLD, str(out))  # one spawn for every config: start-up dominates
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_processes_equal_one_big_batch(name, distributed_results):
    make_loss, _ = CONFIGS[name]
    ref_loss, ref_stats, ref_grads, ref_memory = _run(make_loss, slice(0, N))
    for rank in range(WORLD):
        got = torch.load(distributed_results / f"{name}_rank{rank}.pt")
        assert torch.allclose(got["loss"], ref_loss, atol=1e-10, rtol=0)
        for g, r in zip(got["grads"], ref_grads):
            assert torch.allclose(g, r, atol=1e-10, rtol=0)
        assert got["stats"] == pytest.approx(ref_stats, abs=1e-6)
        if ref_memory is not None:  # the same queue on every rank as in the single process
            assert all(torch.equal(a, b) for a, b in zip(got["memory"], ref_memory))
    assert any(g.abs().max() > 1e-3 for g in ref_grads)  # the comparison means something
