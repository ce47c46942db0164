"""ClipLoss / SigLipLoss against direct reference computations (single process)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmkit.losses import ClipLoss, SigLipLoss


def _features(b=6, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    return img.requires_grad_(), txt.requires_grad_(), torch.tensor(10.0, dtype=dtype, requires_grad=True)


def reference_infonce(img, txt, scale):
    """Literal per-row formula: -log softmax of the matching pair, both directions."""
    logits = scale * img @ txt.T
    b = logits.shape[0]
    i2t = -sum(logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(b)) / b
    t2i = -sum(logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(b)) / b
    return (i2t + t2i) / 2


def reference_siglip(img, txt, scale, bias):
    b = img.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (scale * img[i] @ txt[j] + bias)))
    return total / b


@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_matches_reference_value_and_grads(local_loss):
    img, txt, scale = _features()
    out = ClipLoss(local_loss=local_loss)(image_features=img, text_features=txt, logit_scale=scale)
    assert set(out) == {"contrastive_loss"}
    ref = reference_infonce(img, txt, scale)
    assert torch.allclose(out["contrastive_loss"], ref, atol=1e-10)
    g = torch.autograd.grad(out["contrastive_loss"], (img, txt, scale))
    g_ref = torch.autograd.grad(ref, (img, txt, scale))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-10)


def test_clip_loss_perfect_alignment_is_low_and_random_is_log_b():
    b = 16
    eye = torch.eye(b, dtype=torch.float64)
    loss = ClipLoss()(image_features=eye, text_features=eye, logit_scale=torch.tensor(100.0, dtype=torch.float64))
    assert loss["contrastive_loss"] < 1e-6
    # Zero scale: every logit equal, the loss is exactly log(B).
    loss0 = ClipLoss()(image_features=eye, text_features=eye, logit_scale=torch.tensor(0.0, dtype=torch.float64))
    assert math.isclose(loss0["contrastive_loss"].item(), math.log(b), rel_tol=1e-12)


def test_clip_loss_label_smoothing_changes_value():
    img, txt, scale = _features()
    a = ClipLoss()(image_features=img, text_features=txt, logit_scale=scale)["contrastive_loss"]
    b = ClipLoss(label_smoothing=0.1)(image_features=img, text_features=txt, logit_scale=scale)["contrastive_loss"]
    assert not torch.allclose(a, b)


def test_clip_loss_with_learned_pair_head_uses_it():
    img, txt, scale = _features()
    calls = []

    def head(i, t):
        calls.append((i.shape[0], t.shape[0]))
        return 3.0 * i @ t.T

    out = ClipLoss()(image_features=img, text_features=txt, logit_scale=scale, pair_logits=head)
    ref = reference_infonce(img, txt, torch.tensor(3.0, dtype=torch.float64))
    assert calls and torch.allclose(out["contrastive_loss"], ref)


def test_siglip_loss_matches_reference_value_and_grads():
    img, txt, scale = _features(b=5)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    out = SigLipLoss()(image_features=img, text_features=txt, logit_scale=scale, logit_bias=bias)
    ref = reference_siglip(img, txt, scale, bias)
    assert torch.allclose(out["sigmoid_loss"], ref, atol=1e-10)
    g = torch.autograd.grad(out["sigmoid_loss"], (img, txt, scale, bias))
    g_ref = torch.autograd.grad(ref, (img, txt, scale, bias))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-10)
