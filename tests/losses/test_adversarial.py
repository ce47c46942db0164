"""Adversarial objectives against direct reference computations; the gradient penalty on cases
whose input gradient is known analytically; exactness of every term across 2 real processes
with uneven per-rank batches."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_utils import run_on_processes
from mmkit.losses import AdversarialLoss
from mmkit.losses.adversarial import (
    discriminator_accuracy,
    discriminator_auc,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
)
from mmkit.models import ModalityDiscriminator


def _scores(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64) * 3, torch.randn(n, generator=g, dtype=torch.float64) * 3


def test_bce_objective_is_binary_cross_entropy_with_images_labelled_one():
    s_img, s_txt = _scores()
    ones, zeros = torch.ones_like(s_img), torch.zeros_like(s_txt)
    ref_d = F.binary_cross_entropy(torch.sigmoid(s_img), ones) + F.binary_cross_entropy(torch.sigmoid(s_txt), zeros)
    assert torch.allclose(discriminator_loss(s_img, s_txt, "bce"), ref_d)
    # Non-saturating generator: the same cross-entropy with the labels swapped.
    ref_g = F.binary_cross_entropy(torch.sigmoid(s_img), zeros) + F.binary_cross_entropy(torch.sigmoid(s_txt), ones)
    assert torch.allclose(generator_loss(s_img, s_txt, "bce"), ref_g)


def test_bce_generator_gradient_does_not_vanish_when_the_discriminator_wins():
    # D is confidently right (image score +8, text score −8): the saturating loss log(1 − D)
    # would give a gradient of ~sigmoid(−8) ≈ 3e-4; the non-saturating one gives ~1.
    s_img = torch.tensor([8.0], requires_grad=True)
    s_txt = torch.tensor([-8.0], requires_grad=True)
    generator_loss(s_img, s_txt, "bce").backward()
    assert s_img.grad.item() > 0.99 and s_txt.grad.item() < -0.99


def test_hinge_objective_matches_an_elementwise_reference():
    s_img, s_txt = _scores(seed=1)
    n = len(s_img)
    ref_d = sum(max(0.0, 1 - float(s)) for s in s_img) / n + sum(max(0.0, 1 + float(s)) for s in s_txt) / n
    ref_g = sum(float(s) for s in s_img) / n - sum(float(s) for s in s_txt) / n
    assert discriminator_loss(s_img, s_txt, "hinge").item() == pytest.approx(ref_d, rel=1e-12)
    assert generator_loss(s_img, s_txt, "hinge").item() == pytest.approx(ref_g, rel=1e-12)


def test_wasserstein_objective_is_the_difference_of_mean_critic_values():
    s_img, s_txt = _scores(seed=2)
    n = len(s_img)
    mean_img, mean_txt = sum(map(float, s_img)) / n, sum(map(float, s_txt)) / n
    assert discriminator_loss(s_img, s_txt, "wgan-gp").item() == pytest.approx(mean_txt - mean_img, rel=1e-12)
    assert generator_loss(s_img, s_txt, "wgan-gp").item() == pytest.approx(mean_img - mean_txt, rel=1e-12)


def test_unknown_objective_is_rejected():
    with pytest.raises(ValueError, match="objective"):
        AdversarialLoss("lsgan")


def test_gradient_penalty_of_a_linear_critic_is_known_in_closed_form():
    # D(x) = w·x + b has ∇ₓD = w everywhere, so the penalty is (‖w‖ − 1)² whatever the
    # interpolates, and its gradient in w is 2(‖w‖ − 1) w / ‖w‖.
    torch.manual_seed(0)
    d = ModalityDiscriminator(5, depth=0, spectral_norm=False).double()
    w = d.net[0].weight
    with torch.no_grad():
        w.copy_(torch.tensor([[3.0, 0.0, 4.0, 0.0, 0.0]]))  # ‖w‖ = 5
    img, txt = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    gp = gradient_penalty(d, img, txt)
    assert gp.item() == pytest.approx(16.0, rel=1e-9)
    gp.backward()
    assert torch.allclose(w.grad, 2 * (5.0 - 1) * w.detach() / 5.0)


def test_gradient_penalty_at_given_interpolates_of_a_quadratic_critic():
    class Quadratic(nn.Module):  # D(x) = ½‖x‖², so ∇ₓD(x̂) = x̂
        def forward(self, x):
            return 0.5 * x.pow(2).sum(-1)

    img = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[0.0, 0.0], [0.0, -3.0], [1.0, 1.0]], dtype=torch.float64)
    alpha = torch.tensor([0.5, 0.25, 0.9], dtype=torch.float64)
    # x̂ = (1, 0), (0, −2), (1, 1): norms 1, 2, √2
    expected = ((1 - 1) ** 2 + (2 - 1) ** 2 + (2**0.5 - 1) ** 2) / 3
    assert gradient_penalty(Quadratic(), img, txt, alpha=alpha).item() == pytest.approx(expected, rel=1e-9)


def test_gradient_penalty_trains_the_discriminator_only():
    d = ModalityDiscriminator(4, hidden_dim=8, depth=1, spectral_norm=False)
    img, txt = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    gradient_penalty(d, img, txt).backward()
    assert img.grad is None and txt.grad is None
    # Biases shift D but not its input gradient (piecewise linear D): only weights are penalised.
    weights = [p for n, p in d.named_parameters() if n.endswith("weight")]
    assert len(weights) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)


def test_discriminator_terms_of_each_objective():
    torch.manual_seed(0)
    d = ModalityDiscriminator(4, hidden_dim=8, depth=1, spectral_norm=False)
    img, txt = torch.randn(6, 4), torch.randn(6, 4)
    bce = AdversarialLoss("bce").discriminator_terms(d, img, txt)
    assert set(bce) == {"d_loss", "d_accuracy"}  # no penalty unless asked for
    wgan = AdversarialLoss("wgan-gp").discriminator_terms(d, img, txt)
    assert set(wgan) == {"d_loss", "d_gp_loss", "d_accuracy", "wasserstein"}
    assert wgan["wasserstein"].item() == pytest.approx((d(img).mean() - d(txt).mean()).item(), abs=1e-6)
    hinge = AdversarialLoss("hinge", gp_weight=2.0).discriminator_terms(d, img, txt)
    assert "d_gp_loss" in hinge
    gen = AdversarialLoss("hinge").generator_terms(d, img, txt)
    assert gen["adversarial_loss"].item() == pytest.approx((d(img).mean() - d(txt).mean()).item(), abs=1e-6)


def test_discriminator_accuracy():
    s_img = torch.tensor([1.0, -1.0, 2.0])
    s_txt = torch.tensor([-3.0, 0.5, -0.1])
    assert discriminator_accuracy(s_img, s_txt).item() == pytest.approx(4 / 6)
    assert discriminator_accuracy(s_img, s_txt, threshold=1.5).item() == pytest.approx(4 / 6)


def test_discriminator_auc_matches_pairwise_counting_with_ties():
    g = torch.Generator().manual_seed(4)
    s_img = torch.randint(0, 6, (40,), generator=g).float()  # coarse values: many ties
    s_txt = torch.randint(0, 5, (33,), generator=g).float()
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in s_img.tolist() for b in s_txt.tolist())
    assert discriminator_auc(s_img, s_txt).item() == pytest.approx(wins / (40 * 33), rel=1e-6)
    # Threshold-free: shifting every score leaves it unchanged, unlike the accuracy at 0.
    assert discriminator_auc(s_img + 100, s_txt + 100).item() == pytest.approx(wins / (40 * 33), rel=1e-6)
    assert discriminator_auc(torch.tensor([1.0, 2.0]), torch.tensor([-1.0])).item() == 1.0


# -- exactness across processes --------------------------------------------------------------
SIZES = (3, 2)  # uneven per-rank batches
OBJECTIVES = ("bce", "wgan-gp", "hinge")


def _critic():
    torch.manual_seed(0)
    return ModalityDiscriminator(4, hidden_dim=8, depth=1, spectral_norm=False).double()


def _data():
    g = torch.Generator().manual_seed(3)
    n = sum(SIZES)
    img = torch.randn(n, 4, generator=g, dtype=torch.float64)
    txt = torch.randn(n, 4, generator=g, dtype=torch.float64)
    alpha = torch.rand(n, generator=g, dtype=torch.float64)
    return img, txt, alpha


def _all_terms(img, txt, alpha):
    """Every adversarial term of every objective with its gradients in D and in the features."""
    out = {}
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    for obj in OBJECTIVES:
        d = _critic()
        s_img, s_txt = d(img), d(txt)
        for name, value in (
            ("d", discriminator_loss(s_img, s_txt, obj)),
            ("g", generator_loss(s_img, s_txt, obj)),
            ("gp", gradient_penalty(d, img, txt, alpha=alpha)),
        ):
            params = list(d.parameters())
            grads = torch.autograd.grad(value, params + [img, txt], retain_graph=True, allow_unused=True)
            out[f"{obj}/{name}"] = {
                "value": value.detach(),
                "params": [torch.zeros_like(p) if g is None else g.clone() for p, g in zip(params, grads)],
                "features": [torch.zeros_like(f) if g is None else g.clone() for f, g in zip((img, txt), grads[len(params):])],
            }
    return out


def _worker(rank, world, out_dir):
    img, txt, alpha = _data()
    lo = sum(SIZES[:rank])
    sl = slice(lo, lo + SIZES[rank])
    terms = _all_terms(img[sl], txt[sl], alpha[sl])
    for t in terms.values():
        # What DDP does: the logged loss and the parameter gradients are averaged over ranks.
        dist.all_reduce(t["value"])
        t["value"] /= world
        for g in t["params"]:
            dist.all_reduce(g)
            g /= world
        # A feature gradient belongs to the rank that owns the row; scaled as DDP would scale
        # the encoder's gradient, so all ranks' rows side by side give the global one.
        t["features"] = [g / world for g in t["features"]]
    torch.save(terms, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_adversarial_terms_on_two_uneven_ranks_equal_one_big_batch(tmp_path):
    run_on_processes(_worker, len(SIZES), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(SIZES))]
    ref = _all_terms(*_data())
    assert len(ref) == 9
    for key, r in ref.items():
        for got in ranks:
            assert torch.allclose(got[key]["value"], r["value"], atol=1e-12), key
            for a, b in zip(got[key]["params"], r["params"]):
                assert torch.allclose(a, b, atol=1e-12), key
        for i in range(2):  # image and text feature gradients, rows of both ranks concatenated
            joined = torch.cat([got[key]["features"][i] for got in ranks])
            assert torch.allclose(joined, r["features"][i], atol=1e-12), key
    assert any(g.abs().max() > 1e-3 for g in ref["wgan-gp/gp"]["params"])
