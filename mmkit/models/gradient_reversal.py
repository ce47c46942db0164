"""Gradient reversal (Ganin & Lempitsky, 2015): the identity going forward, −λ × the incoming
gradient going back.

Placed between the encoders' features and a discriminator, it lets one optimizer step train both
players: the discriminator descends its loss while the encoders, receiving the reversed gradient,
ascend it. λ is usually ramped up from 0 so the encoders are not pushed around by a discriminator
that has not learned anything yet.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SCHEDULES = ("dann", "linear", "constant")


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: float) -> Tensor:  # type: ignore[override]
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return -ctx.weight * grad, None


def reverse_gradient(x: Tensor, weight: float = 1.0) -> Tensor:
    """``x`` unchanged; its gradient is multiplied by ``-weight`` on the way back."""
    return _ReverseGrad.apply(x, float(weight))


def reversal_weight(progress: float, schedule: str = "dann", gamma: float = 10.0, max_weight: float = 1.0) -> float:
    """The reversal weight at training progress ``progress`` ∈ [0, 1].

    ``dann``: ``max_weight · (2 / (1 + exp(−γ·p)) − 1)`` (0 at the start, ~max_weight by p ≈ 0.5
    for γ = 10); ``linear``: ``max_weight · p``; ``constant``: ``max_weight``.
    """
    p = min(max(float(progress), 0.0), 1.0)
    if schedule == "dann":
        return max_weight * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)
    if schedule == "linear":
        return max_weight * p
    if schedule == "constant":
        return max_weight
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


class GradientReversal(nn.Module):
    """A gradient reversal layer whose weight follows a schedule over training progress.

    Args:
        schedule: ``dann`` (2/(1+exp(−γp))−1 ramp), ``linear`` or ``constant``.
        gamma: steepness of the ``dann`` ramp.
        max_weight: the weight the schedule ramps up to (and the ``constant`` weight).
    """

    def __init__(self, schedule: str = "dann", gamma: float = 10.0, max_weight: float = 1.0) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.schedule, self.gamma, self.max_weight = schedule, gamma, max_weight
        self.weight = reversal_weight(0.0, schedule, gamma, max_weight)

    def set_progress(self, progress: float) -> float:
        """Move the weight to training progress ``progress`` ∈ [0, 1]; returns the new weight."""
        self.weight = reversal_weight(progress, self.schedule, self.gamma, self.max_weight)
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        return reverse_gradient(x, self.weight)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}, gamma={self.gamma}, max_weight={self.max_weight}, weight={self.weight:.4g}"
