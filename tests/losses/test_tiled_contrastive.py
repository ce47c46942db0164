"""The tiled InfoNCE equals the plain one (value and every gradient), in full and local-loss
mode, on one and on two real processes, without ever holding a B×B tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dist_utils import run_on_processes
from mmkit.losses import ClipLoss
from mmkit.losses.tiled_contrastive import tiled_clip_loss


def _features(n: int, d: int = 8, dtype=torch.float64, seed: int = 0, scale: float = 14.3):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    # Make the positives somewhat aligned so the softmaxes are not all flat.
    text = F.normalize(text + image, dim=1)
    return image.requires_grad_(), text.requires_grad_(), torch.tensor(scale, dtype=dtype, requires_grad=True)


def _plain(row_image, row_text, all_image, all_text, scale, offset=0):
    labels = torch.arange(row_image.shape[0]) + offset
    return F.cross_entropy(scale * row_image @ all_text.T, labels, reduction="sum") + F.cross_entropy(
        scale * row_text @ all_image.T, labels, reduction="sum"
    )


def _check(tiled, plain, leaves):
    """``tiled(*leaves)`` vs ``plain`` on float64 copies of the same leaves (the exact value).

    float64: within 1e-9. float32: within 1e-5 of each tensor's scale, or within a bound on the
    rounding error that holds for any BLAS's summation order (Intel's and AMD's kernels differ).
    The logit_scale gradient is a sum of large terms that mostly cancel, so its scale is that of
    its terms (loss / s).

    Error model: each float32 logit s·<x, y> over d features carries up to eps·s·sqrt(d) of
    rounding; a feature gradient is s times convex combinations of those errors in both
    directions (≤ 2·eps·s²·sqrt(d)); the loss value and the logit_scale gradient add one such
    logit error per row and direction (≤ 2·B·eps·s·sqrt(d))."""
    dtype = leaves[0].dtype
    exact = [t.detach().double().requires_grad_() for t in leaves]
    got = _value_and_grads(lambda: tiled(*leaves), leaves)
    ref = _value_and_grads(lambda: plain(*exact), exact)
    assert got[0].dtype == dtype
    if dtype == torch.float64:
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-9)
        return
    scales = [r.abs().max().item() for r in ref]
    scales[-1] = max(scales[-1], ref[0].abs().item() / exact[-1].abs().max().item())
    (batch, d), s = leaves[0].shape, exact[-1].abs().max().item()
    logit_error = torch.finfo(dtype).eps * s * d**0.5
    bounds = [2 * batch * logit_error, 2 * s * logit_error, 2 * s * logit_error, 2 * batch * logit_error]
    for g, r, scale, bound in zip(got, ref, scales, bounds):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=max(1e-5 * scale, bound))


def _value_and_grads(fn, wrt):
    loss = fn()
    return [loss.detach(), *torch.autograd.grad(loss, wrt)]


SIZES = [(8, 3), (8, 8), (8, 32), (9, 1), (37, 8), (64, 16), (50, 7)]  # (B, tile)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,tile", SIZES)
@pytest.mark.parametrize("scale", [14.3, 100.0])
def test_full_batch_matches_plain(batch, tile, dtype, scale):
    x, y, s = _features(batch, dtype=dtype, scale=scale)
    _check(lambda x, y, s: tiled_clip_loss(x, y, x, y, s, tile_size=tile), lambda x, y, s: _plain(x, y, x, y, s), [x, y, s])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,tile", SIZES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_local_rows_match_plain_rows(batch, tile, dtype, where):
    x, y, s = _features(batch, dtype=dtype)
    n = max(1, batch // 3)
    offset = {"first": 0, "middle": batch // 3, "last": batch - n}[where]
    rows = slice(offset, offset + n)
    # Row views are distinct autograd nodes (as on a rank): gradients reach x through both.
    _check(
        lambda x, y, s: tiled_clip_loss(x[rows], y[rows], x, y, s, row_offset=offset, tile_size=tile),
        lambda x, y, s: _plain(x[rows], y[rows], x, y, s, offset),
        [x, y, s],
    )


def test_local_rows_partition_the_full_loss():
    x, y, s = _features(23)
    parts = [(0, 7), (7, 16), (16, 23)]
    local = sum(tiled_clip_loss(x[a:b], y[a:b], x, y, s, row_offset=a, tile_size=5) for a, b in parts)
    full = tiled_clip_loss(x, y, x, y, s, tile_size=5)
    torch.testing.assert_close(local, full)


def test_full_rows_through_the_general_path():
    # Same data but not the same tensor objects: the two-direction path must agree too.
    x, y, s = _features(20)
    _check(lambda x, y, s: tiled_clip_loss(x[:], y[:], x, y, s, tile_size=6), lambda x, y, s: _plain(x, y, x, y, s), [x, y, s])


@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_logit_scale_shape_is_kept(scale_shape):
    x, y, _ = _features(10)
    s = torch.full(scale_shape, 10.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.grad(tiled_clip_loss(x, y, x, y, s, tile_size=4), s)[0].shape == scale_shape
    _check(lambda x, y, s: tiled_clip_loss(x, y, x, y, s, tile_size=4), lambda x, y, s: _plain(x, y, x, y, s), [x, y, s])


@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.parametrize("tile", [1, 4, 13, 64])
def test_clip_loss_module_tiled_equals_plain(local_loss, tile):
    x, y, s = _features(13, d=16, dtype=torch.float32)
    _check(
        lambda x, y, s: ClipLoss(local_loss=local_loss, tile_size=tile)(x, y, s)["contrastive_loss"],
        lambda x, y, s: ClipLoss(local_loss=local_loss)(x, y, s)["contrastive_loss"],
        [x, y, s],
    )


@pytest.mark.parametrize("mode", ["bf16_inputs", "autocast"])
def test_low_precision_is_close_and_accumulates_in_float32(mode):
    g = torch.Generator().manual_seed(0)
    x64, y64 = F.normalize(torch.randn(2, 40, 32, generator=g, dtype=torch.float64), dim=-1)
    dtype = torch.bfloat16 if mode == "bf16_inputs" else torch.float32
    x, y = x64.to(dtype).requires_grad_(), y64.to(dtype).requires_grad_()
    s = torch.tensor(3.0, requires_grad=True)  # bf16 logits are off by ~s/256: keep s small
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        loss = tiled_clip_loss(x, y, x, y, s, tile_size=16)
    gx, gy, gs = torch.autograd.grad(loss, [x, y, s])
    assert loss.dtype == torch.float32 and gx.dtype == dtype and gs.dtype == torch.float32
    exact = [t.detach().double().requires_grad_() for t in (x, y, s)]
    ref = _value_and_grads(lambda: _plain(*exact[:2], *exact), exact)
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-3, atol=0)
    for got, r in zip((gx, gy, gs), ref[1:]):
        assert (got.double() - r).norm() <= 1e-2 * r.norm()


def test_rejects_bad_arguments():
    x, y, s = _features(6)
    with pytest.raises(ValueError, match="tile_size"):
        tiled_clip_loss(x, y, x, y, s, tile_size=0)
    with pytest.raises(ValueError, match="inside the batch"):
        tiled_clip_loss(x[:4], y[:4], x, y, s, row_offset=3, tile_size=2)


# --- memory: nothing quadratic is saved or ever allocated ---------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any ATen op produces (forward and
    backward both run through the dispatcher)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("rows", [None, (64, 128)], ids=["full", "local_rows"])
def test_no_quadratic_tensor_saved_or_allocated(rows):
    batch, d, tile = 256, 16, 32  # B·d and tile² are both far below b·B
    a, b = rows or (0, batch)
    x, y, s = _features(batch, d=d, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    def loss(tile_size):
        if rows is None:
            return ClipLoss(tile_size=tile_size)(x, y, s)["contrastive_loss"]
        if tile_size is None:
            return _plain(x[a:b], y[a:b], x, y, s, a)
        return tiled_clip_loss(x[a:b], y[a:b], x, y, s, row_offset=a, tile_size=tile_size)

    def run(tile_size):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _LargestTensor() as probe:
            loss(tile_size).backward()
        return probe.largest

    largest_tiled = run(tile)
    assert max(saved) <= batch * d
    assert largest_tiled <= max(tile * tile, batch * d) < (b - a) * batch // 2
    # The probe does see the plain loss's b×B logits, so the bound above means something.
    saved.clear()
    assert run(None) == (b - a) * batch and max(saved) == (b - a) * batch


# --- two real processes (gloo), as under DDP ------------------------------------------------

DIST_CASES = [
    (sizes, local_loss, tile)
    for sizes in ((4, 4), (5, 3))  # even and uneven per-rank batches
    for local_loss in (False, True)
    for tile in (3, 16)
]


def _dist_features(sizes):
    x, y, s = _features(sum(sizes), d=16, dtype=torch.float32, seed=3)
    return x.detach(), y.detach(), s.detach()


def _dist_worker(rank, world, out_dir):
    torch.set_num_threads(1)
    for case in DIST_CASES:
        sizes, local_loss, tile = case
        x0, y0, s0 = _dist_features(sizes)
        # Each rank holds the same leaves (like replicated parameters) and feeds its own rows.
        x, y, s = x0.clone().requires_grad_(), y0.clone().requires_grad_(), s0.clone().requires_grad_()
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        loss = ClipLoss(local_loss=local_loss, tile_size=tile)(x[rows], y[rows], s)["contrastive_loss"]
        loss.backward()
        # What DDP does: average the logged loss and the gradients over ranks.
        packed = torch.cat([loss.detach().reshape(1), s.grad.reshape(1), x.grad.flatten(), y.grad.flatten()])
        dist.all_reduce(packed)
        packed /= world
        if rank == 0:
            torch.save(packed, Path(out_dir) / f"{DIST_CASES.index(case)}.pt")


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiled_dist")
    run_on_processes(_dist_worker, 2, str(out))  # one spawn for every case: start-up dominates
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", DIST_CASES, ids=str)
def test_two_processes_equal_one_plain_big_batch(case, dist_results):
    sizes, local_loss, tile = case
    packed = torch.load(dist_results / f"{DIST_CASES.index(case)}.pt")
    x0, y0, s0 = _dist_features(sizes)
    x, y, s = x0.clone().requires_grad_(), y0.clone().requires_grad_(), s0.clone().requires_grad_()
    ref_loss = ClipLoss()(x, y, s)["contrastive_loss"]
    ref_loss.backward()
    n, d = x.shape
    got = {"loss": packed[0], "scale": packed[1], "image": packed[2 : 2 + n * d], "text": packed[2 + n * d :]}
    ref = {"loss": ref_loss.detach(), "scale": s.grad, "image": x.grad.flatten(), "text": y.grad.flatten()}
    for key in got:
        torch.testing.assert_close(got[key], ref[key].reshape(got[key].shape), rtol=0, atol=1e-5, msg=key)
    assert x.grad.abs().max() > 1e-3  # the comparison is not between zeros


def _confident_pairs(batch: int = 32, dim: int = 128):
    # A trained model's regime: matched pairs close, the loss small, the positives' softmax ~1.
    torch.manual_seed(0)
    base = torch.randn(batch, dim)
    return (F.normalize(base + 0.6 * torch.randn(batch, dim), dim=-1),
            F.normalize(base + 0.6 * torch.randn(batch, dim), dim=-1))


@pytest.mark.parametrize("rows", ["all", "subset"])
def test_bf16_gradients_are_as_accurate_as_the_plain_loss_when_the_positives_dominate(rows):
    """Under bf16 autocast at temperature 0.07 with confident positives, the tiled loss's
    gradients are as close to the float32 ones as the plain loss's (~2 %): the positives are
    subtracted from the softmax weights before they are rounded to bf16 (after, a weight of
    2 - 0.003 rounds to 2 and the gradient loses most of its value)."""
    images, texts = _confident_pairs()
    lo, hi = (0, 32) if rows == "all" else (8, 20)

    def plain(i, t, s):
        labels = torch.arange(lo, hi)
        return (F.cross_entropy(s * i[lo:hi] @ t.T, labels, reduction="sum")
                + F.cross_entropy(s * t[lo:hi] @ i.T, labels, reduction="sum"))

    def tiled(i, t, s):
        if rows == "all":
            return tiled_clip_loss(i, t, i, t, s, tile_size=8)
        return tiled_clip_loss(i[lo:hi], t[lo:hi], i, t, s, row_offset=lo, tile_size=5)

    def grads(loss_fn, bf16):
        i, t = images.clone().requires_grad_(), texts.clone().requires_grad_()
        s = torch.tensor(1 / 0.07, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(i, t, s)
        loss.backward()
        return i.grad, t.grad, s.grad

    reference = grads(plain, False)
    rel = lambda got: max(float((g - r).norm() / r.norm()) for g, r in zip(got, reference))  # noqa: E731
    assert rel(grads(tiled, False)) < 1e-4
    plain_bf16, tiled_bf16 = rel(grads(plain, True)), rel(grads(tiled, True))
    assert plain_bf16 < 0.05
    assert tiled_bf16 <= 1.5 * plain_bf16, (tiled_bf16, plain_bf16)
