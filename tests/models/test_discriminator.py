"""The modality discriminator: shapes and layers from its knobs, and spectral normalisation
bounding its Lipschitz constant."""

import pytest
import torch
from torch import nn

from mmkit.models import ModalityDiscriminator


def test_layers_follow_width_depth_and_dropout():
    d = ModalityDiscriminator(12, hidden_dim=20, depth=3, dropout=0.1, spectral_norm=False)
    linears = [m for m in d.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 20), (20, 20), (20, 20), (20, 1)]
    assert sum(isinstance(m, nn.Dropout) for m in d.modules()) == 3
    assert d(torch.randn(5, 12)).shape == (5,)
    linear_d = ModalityDiscriminator(12, depth=0, spectral_norm=False)
    assert [m.out_features for m in linear_d.modules() if isinstance(m, nn.Linear)] == [1]
    with pytest.raises(ValueError):
        ModalityDiscriminator(12, depth=-1)


def test_rows_are_scored_independently():
    # No batch statistics: a row's score does not depend on the rest of the batch (needed for
    # exact cross-rank losses and per-sample gradient penalties).
    d = ModalityDiscriminator(6, hidden_dim=16).eval()
    x = torch.randn(8, 6)
    assert torch.allclose(d(x)[:3], d(x[:3]), atol=1e-6)


def _large_weights(spectral_norm: bool) -> ModalityDiscriminator:
    torch.manual_seed(0)
    d = ModalityDiscriminator(8, hidden_dim=32, depth=2, spectral_norm=spectral_norm)
    with torch.no_grad():
        for m in d.modules():
            if isinstance(m, nn.Linear):
                w = m.parametrizations.weight.original if spectral_norm else m.weight
                w.mul_(20.0)  # singular values far above 1
    return d


def _max_gradient_norm(d: nn.Module, x: torch.Tensor) -> float:
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(d(x).sum(), x)
    return grad.norm(dim=-1).max().item()


def _max_difference_ratio(d: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return ((d(x) - d(y)).abs() / (x - y).norm(dim=-1)).max().item()


def test_spectral_norm_makes_the_discriminator_1_lipschitz():
    torch.manual_seed(1)
    x, y = torch.randn(256, 8), torch.randn(256, 8)
    plain = _large_weights(spectral_norm=False).eval()
    assert _max_gradient_norm(plain, x) > 10  # the same weights without normalisation

    d = _large_weights(spectral_norm=True)
    d.train()
    with torch.no_grad():
        for _ in range(50):  # power iteration (one step per training forward) converges
            d(x)
    d.eval()
    for m in d.modules():
        if isinstance(m, nn.Linear):
            assert torch.linalg.matrix_norm(m.weight, ord=2).item() == pytest.approx(1.0, abs=1e-3)
    assert _max_gradient_norm(d, x) <= 1.0 + 1e-3
    assert _max_difference_ratio(d, x, y) <= 1.0 + 1e-3


def test_bf16_weights_take_fp32_features_and_spectral_norm_vectors():
    # DeepSpeed's bf16 keeps D's weights in bf16 without autocast; the features (and spectral
    # norm's power-iteration vectors) may still be float32: D follows its weights' type.
    d = ModalityDiscriminator(6, hidden_dim=16).to(torch.bfloat16)
    for buf in d.buffers():
        buf.data = buf.data.float()
    scores = d(torch.randn(4, 6))
    assert scores.dtype == torch.bfloat16 and torch.isfinite(scores.float()).all()
    assert all(b.dtype == torch.bfloat16 for b in d.buffers() if b.is_floating_point())
