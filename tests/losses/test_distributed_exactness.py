"""N real processes with per-rank batch b == one process with batch N·b (loss and every
parameter gradient), for each contrastive loss mode, on a real mmkit model."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_on_processes
from mmkit.losses import ClipLoss, SigLipLoss
from mmkit.models import OpenCLIP

ARCH = str(Path(__file__).parents[1] / "models" / "tiny_test_arch.json")
WORLD, PER_RANK = 2, 3

LOSSES = {
    "clip_full": lambda: ClipLoss(),
    "clip_local": lambda: ClipLoss(local_loss=True),
    "siglip": lambda: SigLipLoss(),
}


def _model(loss_name):
    torch.manual_seed(0)
    return OpenCLIP(ARCH, init_logit_bias=-5.0 if loss_name == "siglip" else None).build().double()


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(WORLD * PER_RANK, 3, 16, 16, generator=g, dtype=torch.float64)
    texts = torch.randint(1, 400, (WORLD * PER_RANK, 8), generator=g)
    return images, texts


def _loss_and_grads(model, loss_fn, images, texts):
    loss = sum(loss_fn(**model(images, texts)).values())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, world, out_dir):
    images, texts = _batch()
    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for loss_name, make_loss in LOSSES.items():
        loss, grads = _loss_and_grads(_model(loss_name), make_loss(), images[sl], texts[sl])
        # What DDP does: average the loss for logging and the gradients for the update.
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        if rank == 0:
            torch.save({"loss": loss / world, "grads": grads}, Path(out_dir) / f"{loss_name}.pt")


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run_on_processes(_worker, WORLD, str(out))  # one spawn for all modes: start-up dominates
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_two_processes_equal_one_big_batch(loss_name, distributed_results):
    got = torch.load(distributed_results / f"{loss_name}.pt")
    images, texts = _batch()
    ref_loss, ref_grads = _loss_and_grads(_model(loss_name), LOSSES[loss_name](), images, texts)
    assert torch.allclose(got["loss"], ref_loss, atol=1e-5, rtol=0)
    assert set(got["grads"]) == set(ref_grads) and len(ref_grads) > 10
    for name, ref in ref_grads.items():
        assert torch.allclose(got["grads"][name], ref, atol=1e-5, rtol=0), name
        # Gradients are not trivially zero: the comparison means something.
    assert any(g.abs().max() > 1e-4 for g in ref_grads.values())
