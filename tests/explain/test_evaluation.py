"""Pointing game, box areas and deletion/insertion curves on hand-made inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmkit.data.sources.synthetic import COLORS, SyntheticShapes
from mmkit.explain.evaluation import (
    box_area_fraction,
    curve_steps,
    deletion_insertion,
    pointing_hits,
    random_order,
    relevance_order,
)
from mmkit.explain.scoring import PairScorer
from mmkit.explain.towers import towers_for


def test_pointing_hits_follow_the_maximum_of_the_upsampled_map():
    maps = torch.zeros(3, 2, 2)
    maps[0, 0, 1] = 1.0  # top-right quarter of a 16×16 image
    maps[1, 1, 0] = 1.0  # bottom-left
    maps[2, 1, 1] = 1.0  # bottom-right
    boxes = [(8, 0, 16, 8), (8, 0, 16, 8), (9, 9, 16, 16)]
    assert pointing_hits(maps, boxes, (16, 16)).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="3 maps but 2 boxes"):
        pointing_hits(maps, boxes[:2], (16, 16))


def test_box_area_fraction_counts_pixel_centres():
    assert box_area_fraction((0, 0, 16, 16), (16, 16)) == 1.0
    assert box_area_fraction((0, 0, 8, 4), (16, 16)) == 8 * 4 / 256
    assert box_area_fraction((0.4, 0.4, 0.6, 0.6), (16, 16)) == 1 / 256  # only pixel (0, 0)'s centre
    assert box_area_fraction((0.6, 0.6, 1.4, 1.4), (16, 16)) == 0.0  # between centres


def test_shape_boxes_bound_the_drawn_shapes():
    ds = SyntheticShapes(size=40, seed=5, image_size=64, two_shapes_prob=0.0)
    for i in range(40):
        (obj,) = ds.boxes(i)
        assert obj["phrase"] == ds[i]["caption"]
        pixels = np.asarray(ds[i]["image"], dtype=np.int32)
        colour = np.array(COLORS[obj["color"]])
        is_shape = np.abs(pixels - colour).max(-1) < 25  # the noise is ±6, the background grey
        ys, xs = np.nonzero(is_shape)
        assert len(xs) > 0
        x0, y0, x1, y1 = obj["box"]
        assert xs.min() + 0.5 >= x0 - 1 and xs.max() + 0.5 <= x1 + 1  # one pixel of resampling blur
        assert ys.min() + 0.5 >= y0 - 1 and ys.max() + 0.5 <= y1 + 1
        assert (x1 - x0) < 1.5 * (xs.max() - xs.min() + 1) + 2  # tight: not a loose square around it
    two = SyntheticShapes(size=5, seed=1, image_size=32, two_shapes_prob=1.0)
    assert [len(two.boxes(i)) for i in range(5)] == [2] * 5
    assert " ".join([two.boxes(0)[0]["phrase"], "X", two.boxes(0)[1]["phrase"]]).split(" X ")[0] in two[0]["caption"]
    with pytest.raises(IndexError):
        two.boxes(5)


def test_curve_steps_and_orders():
    assert curve_steps(4) == [0, 1, 2, 3, 4]
    steps = curve_steps(196, max_steps=32)
    assert steps[0] == 0 and steps[-1] == 196 and len(steps) == 33
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.5]]])
    assert relevance_order(maps).tolist() == [[1, 2, 3, 0]]
    assert sorted(random_order(2, 4).flatten().tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(random_order(2, 4, seed=1), random_order(2, 4, seed=1))


def test_deletion_and_insertion_curves_end_where_they_must(tiny, tiny_batch):
    model, _ = tiny
    images, texts = tiny_batch
    scorer, towers = PairScorer(model), towers_for(model)
    order = relevance_order(torch.rand(4, 2, 2))
    curves = deletion_insertion(scorer, towers, images, texts, order)
    with torch.no_grad():
        text_f = F.normalize(model.encode_text(texts), dim=-1)
        full = (F.normalize(model.encode_image(images), dim=-1) * text_f).sum(-1)
        blank = (F.normalize(model.encode_image(torch.zeros_like(images)), dim=-1) * text_f).sum(-1)
        first = order[:, 0]
        one_removed = images.clone()
        for b in range(4):
            r, c = divmod(first[b].item(), 2)
            one_removed[b, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 0
        after_one = (F.normalize(model.encode_image(one_removed), dim=-1) * text_f).sum(-1)
    assert curves["fraction"].tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert torch.allclose(curves["deletion"][:, 0], full, atol=1e-5)
    assert torch.allclose(curves["deletion"][:, 1], after_one, atol=1e-5)
    assert torch.allclose(curves["deletion"][:, -1], blank, atol=1e-5)
    assert torch.allclose(curves["insertion"][:, 0], blank, atol=1e-5)
    assert torch.allclose(curves["insertion"][:, -1], full, atol=1e-5)
    expected_auc = torch.tensor([np.trapezoid(row, curves["fraction"].numpy()) for row in curves["deletion"].numpy()])
    assert torch.allclose(curves["deletion_auc"], expected_auc.float(), atol=1e-5)
