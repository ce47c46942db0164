import math

import pytest
import torch

from mmkit.metrics.modality_gap import ModalityGap, modality_gap


def test_known_gaps():
    e = torch.eye(3)
    # All images on e0, all texts on e1 (scaled: inputs are normalised first): gap = √2.
    assert modality_gap(5 * e[[0, 0]], 0.1 * e[[1, 1, 1]]).item() == pytest.approx(math.sqrt(2))
    # Images symmetric around the origin have mean 0: the gap is the text mean's length, 1.
    assert modality_gap(torch.stack([e[0], -e[0]]), e[[1]]).item() == pytest.approx(1.0)
    assert modality_gap(e, e).item() == pytest.approx(0.0)


def test_metric_accumulates_like_the_function():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(20, 8, generator=g) + 1, torch.randn(13, 8, generator=g) - 1
    metric = ModalityGap()
    metric.update(img[:9], txt[:4])
    metric.update(img[9:], txt[4:])
    assert metric.compute().item() == pytest.approx(modality_gap(img, txt).item(), abs=1e-6)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(metric.compute())
