"""Adversarial objectives for modality alignment: a discriminator D scores image features high
and text features low; the encoders are trained to make the two indistinguishable.

Both modalities are produced by trainable encoders, so "real" and "fake" are just labels: image =
1, text = 0. Each objective is a sum of two per-modality means (the usual GAN form):

=========  ====================================================  ==============================
objective  discriminator loss                                    encoder (generator) loss
=========  ====================================================  ==============================
bce        E softplus(−D(i)) + E softplus(D(t))   (BCE, i→1 t→0)  E softplus(D(i)) + E softplus(−D(t))
                                                                   (non-saturating: labels swapped)
wgan-gp    E D(t) − E D(i) + λ·GP                                  E D(i) − E D(t)
hinge      E relu(1 − D(i)) + E relu(1 + D(t))                     E D(i) − E D(t)
=========  ====================================================  ==============================

Exact across processes: every mean is a rank's sum divided by
``distributed.global_mean_divisor`` (global count / world size), so the mean of the per-rank
values is the mean over the global batch, and DDP's averaging of the gradients gives the global
batch's gradient, also when ranks hold different numbers of rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkit import distributed
from mmkit.config_checks import Range, check_settings

OBJECTIVES = ("bce", "wgan-gp", "hinge")


def _check(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def discriminator_loss(image_scores: Tensor, text_scores: Tensor, objective: str = "bce", share: float | None = None) -> Tensor:
    """D's loss (without the gradient penalty) for (N,) image and (N,) text scores.

    ``share``: the divisor of the per-modality sums (default: ``global_mean_divisor`` of N).
    """
    _check(objective)
    share = distributed.global_mean_divisor(image_scores.shape[0], image_scores.device) if share is None else share
    if objective == "bce":
        terms = F.softplus(-image_scores).sum() + F.softplus(text_scores).sum()
    elif objective == "hinge":
        terms = F.relu(1 - image_scores).sum() + F.relu(1 + text_scores).sum()
    else:
        terms = text_scores.sum() - image_scores.sum()
    return terms / share


def generator_loss(image_scores: Tensor, text_scores: Tensor, objective: str = "bce", share: float | None = None) -> Tensor:
    """The encoders' loss: make D score images as text and texts as images."""
    _check(objective)
    share = distributed.global_mean_divisor(image_scores.shape[0], image_scores.device) if share is None else share
    if objective == "bce":
        # Non-saturating: maximise log D(swapped label) instead of minimising log(1 − D(label)),
        # which has vanishing gradient exactly when D is winning.
        terms = F.softplus(image_scores).sum() + F.softplus(-text_scores).sum()
    else:
        terms = image_scores.sum() - text_scores.sum()
    return terms / share


def gradient_penalty(
    discriminator: nn.Module,
    image_features: Tensor,
    text_features: Tensor,
    alpha: Tensor | None = None,
    share: float | None = None,
) -> Tensor:
    """WGAN-GP's penalty E (‖∇ₓD(x̂)‖ − 1)² at x̂ = α·image + (1 − α)·text, α ~ U(0, 1) per pair.

    The features are detached: the penalty trains D only (also behind a gradient reversal layer,
    where it would otherwise reach the encoders reversed). Differentiable in D's parameters.

    Args:
        discriminator: maps (N, d) to (N,) scores, each row scored on its own.
        image_features: (N, d).
        text_features: (N, d), paired with the images row by row.
        alpha: (N,) or (N, 1) interpolation weights (default: uniform random).
        share: divisor of the sum over rows (default: ``global_mean_divisor`` of N).
    """
    img, txt = image_features.detach(), text_features.detach()
    if alpha is None:
        alpha = torch.rand(img.shape[0], 1, device=img.device, dtype=img.dtype)
    alpha = alpha.reshape(-1, 1).to(img.dtype)
    x = (alpha * img + (1 - alpha) * txt).requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(discriminator(x).sum(), x, create_graph=True)
    # At least float32 (under autocast the gradient may be half precision); eps keeps the norm
    # differentiable at a zero gradient.
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
    norm = torch.sqrt(grad.pow(2).sum(-1) + 1e-12)
    share = distributed.global_mean_divisor(img.shape[0], img.device) if share is None else share
    return (norm - 1).pow(2).sum() / share


@torch.no_grad()
def discriminator_accuracy(image_scores: Tensor, text_scores: Tensor, threshold: float | Tensor = 0.0) -> Tensor:
    """Fraction of rows D puts on the right side of ``threshold`` (images above, texts below)."""
    correct = (image_scores > threshold).sum() + (text_scores < threshold).sum()
    return correct.float() / max(image_scores.numel() + text_scores.numel(), 1)


@torch.no_grad()
def discriminator_auc(image_scores: Tensor, text_scores: Tensor) -> Tensor:
    """P(a random image scores above a random text), ties counting ½ (ROC AUC; 0.5: D cannot rank
    the modalities apart). Unlike the accuracy it needs no threshold, so a D whose scores are
    all shifted to one side of 0 still shows how separable the modalities are. O(N log N)."""
    if image_scores.numel() == 0 or text_scores.numel() == 0:
        return torch.tensor(float("nan"), device=image_scores.device)
    txt = text_scores.double().sort().values
    img = image_scores.double()
    below = torch.searchsorted(txt, img, right=False)
    at_or_below = torch.searchsorted(txt, img, right=True)
    wins = below.double() + 0.5 * (at_or_below - below).double()
    return (wins.sum() / (img.numel() * txt.numel())).float()


class AdversarialLoss(nn.Module):
    """The discriminator's and the encoders' adversarial terms for one objective.

    Args:
        objective: ``bce`` (non-saturating cross-entropy), ``wgan-gp`` (Wasserstein critic with
            gradient penalty) or ``hinge``.
        gp_weight: weight λ of the gradient penalty. None: 10 for ``wgan-gp``, 0 (off) for the
            others; a positive value adds the penalty to any objective (it also steadies BCE and
            hinge discriminators).
    """

    setting_ranges = {"gp_weight": Range(ge=0, none="10 for wgan-gp, off otherwise")}

    def __init__(self, objective: str = "bce", gp_weight: float | None = None) -> None:
        check_settings(self, locals(), AdversarialLoss.setting_ranges)
        super().__init__()
        _check(objective)
        self.objective = objective
        self.gp_weight = (10.0 if objective == "wgan-gp" else 0.0) if gp_weight is None else gp_weight

    def threshold(self, image_scores: Tensor, text_scores: Tensor) -> Tensor | float:
        """Decision threshold for D's accuracy: 0 for logits (bce, hinge); the midpoint of the
        two mean critic values for wgan-gp, whose scores have no fixed origin."""
        if self.objective == "wgan-gp":
            return 0.5 * (image_scores.mean() + text_scores.mean()).detach()
        return 0.0

    def discriminator_terms(self, discriminator: nn.Module, image_features: Tensor, text_features: Tensor) -> dict[str, Tensor]:
        """``d_loss`` (+ ``d_gp_loss``) to minimise w.r.t. D, with detached statistics
        ``d_accuracy`` and, for wgan-gp, ``wasserstein`` (E D(i) − E D(t))."""
        share = distributed.global_mean_divisor(image_features.shape[0], image_features.device)
        s_img, s_txt = discriminator(image_features), discriminator(text_features)
        out = {"d_loss": discriminator_loss(s_img, s_txt, self.objective, share)}
        if self.gp_weight:
            out["d_gp_loss"] = self.gp_weight * gradient_penalty(discriminator, image_features, text_features, share=share)
        out["d_accuracy"] = discriminator_accuracy(s_img.detach(), s_txt.detach(), self.threshold(s_img, s_txt))
        if self.objective == "wgan-gp":
            out["wasserstein"] = (s_img.mean() - s_txt.mean()).detach()
        return out

    def generator_terms(self, discriminator: nn.Module, image_features: Tensor, text_features: Tensor) -> dict[str, Tensor]:
        """``adversarial_loss`` to minimise w.r.t. the encoders (D's parameters are not updated by it)."""
        s_img, s_txt = discriminator(image_features), discriminator(text_features)
        return {"adversarial_loss": generator_loss(s_img, s_txt, self.objective)}
