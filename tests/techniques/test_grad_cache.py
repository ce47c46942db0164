"""Chunked (GradCache-style) accumulation gives the gradient of the whole batch."""

import json
from pathlib import Path

import pytest
import torch

from mmkit.losses import ClipLoss, SigLipLoss
from mmkit.models import OpenCLIP
from mmkit.training.grad_cache import chunked_backward

ARCH = str(Path(__file__).parents[1] / "models" / "tiny_test_arch.json")


def _setup(bias=None):
    torch.manual_seed(0)
    model = OpenCLIP(ARCH, init_logit_bias=bias).build().double()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(10, 3, 16, 16, generator=g, dtype=torch.float64)
    texts = torch.randint(1, 400, (10, 8), generator=g)
    return model, images, texts


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunks", [2, 3, 10])
@pytest.mark.parametrize("loss_cls,bias", [(ClipLoss, None), (SigLipLoss, -5.0)])
def test_chunked_backward_equals_full_batch(chunks, loss_cls, bias):
    model, images, texts = _setup(bias)
    loss_fn = loss_cls()
    full = sum(loss_fn(**model(images, texts)).values())
    full.backward()
    ref = _grads(model)
    model.zero_grad()

    terms = chunked_backward(model, loss_fn, images, texts, chunks, lambda x: x.backward())
    assert torch.allclose(sum(terms.values()), full.detach(), atol=1e-10)
    got = _grads(model)
    assert set(got) == set(ref)
    for name in ref:
        assert torch.allclose(got[name], ref[name], atol=1e-8), name


def test_chunked_backward_replays_random_masks(tmp_path):
    # With random masking (patch dropout) both passes must draw the same masks, or the cached
    # feature gradients would belong to different features.
    cfg = json.loads(Path(ARCH).read_text())
    cfg["vision_cfg"]["patch_dropout"] = 0.5
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = OpenCLIP(str(arch)).build().double()
    _, images, texts = _setup()
    loss_fn = ClipLoss()
    torch.manual_seed(5)
    sum(loss_fn(**model(images, texts)).values()).backward()
    ref = _grads(model)
    model.zero_grad()
    torch.manual_seed(5)
    # One chunk = same RNG consumption as the full pass: exact equality expected.
    chunked_backward(model, loss_fn, images, texts, 1, lambda x: x.backward())
    got = _grads(model)
    for name in ref:
        assert torch.allclose(got[name], ref[name], atol=1e-8), name


def test_chunked_backward_rejects_mlp_head():
    torch.manual_seed(0)
    model = OpenCLIP(ARCH, similarity="mlp").build().double()
    images = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    texts = torch.randint(1, 400, (4, 8))
    with pytest.raises(ValueError, match="cosine"):
        chunked_backward(model, ClipLoss(), images, texts, 2, lambda x: x.backward())
