"""Gradient reversal: identity forward, negated and scaled gradient backward; its schedules."""

import math

import pytest
import torch

from mmkit.models import GradientReversal
from mmkit.models.gradient_reversal import reversal_weight, reverse_gradient


@pytest.mark.parametrize("weight", [1.0, 0.3, 0.0])
def test_reversal_negates_and_scales_the_gradient(weight):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64)
    plain = torch.autograd.grad(((x * w).sum(-1) ** 2).sum(), x)[0]
    y = reverse_gradient(x, weight)
    assert torch.equal(y, x)
    reversed_ = torch.autograd.grad(((y * w).sum(-1) ** 2).sum(), x)[0]
    assert torch.allclose(reversed_, -weight * plain)


def test_layer_reverses_only_what_lies_below_it():
    # features → GRL → head: the head gets its ordinary gradient, the features the reversed one.
    feat = torch.randn(5, 2, requires_grad=True)
    head = torch.nn.Linear(2, 1)
    grl = GradientReversal(schedule="constant", max_weight=0.5)
    head(grl(feat)).sum().backward()
    head_grad, feat_grad = head.weight.grad.clone(), feat.grad.clone()
    head.zero_grad()
    feat.grad = None
    head(feat).sum().backward()
    assert torch.allclose(head.weight.grad, head_grad)
    assert torch.allclose(feat_grad, -0.5 * feat.grad)


def test_schedules():
    assert reversal_weight(0.0, "dann") == 0.0
    assert reversal_weight(0.5, "dann", gamma=10) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert reversal_weight(1.0, "dann", gamma=10, max_weight=0.2) == pytest.approx(0.2 * (2 / (1 + math.exp(-10)) - 1))
    assert reversal_weight(0.25, "linear", max_weight=2.0) == pytest.approx(0.5)
    assert reversal_weight(0.25, "constant", max_weight=2.0) == 2.0
    assert reversal_weight(3.0, "linear") == 1.0  # progress is clamped to [0, 1]
    grl = GradientReversal("linear", max_weight=0.1)
    assert grl.weight == 0.0 and grl.set_progress(0.5) == pytest.approx(0.05) and grl.weight == pytest.approx(0.05)
    with pytest.raises(ValueError):
        GradientReversal("cosine")
