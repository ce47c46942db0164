import re

import numpy as np

from mmkit.data import SyntheticShapes
from mmkit.data.sources.synthetic import COLORS, RELATIONS, SHAPES


def test_same_seed_same_bytes_and_caption():
    a, b = SyntheticShapes(size=20, seed=3), SyntheticShapes(size=20, seed=3)
    for i in (0, 7, 19):
        sa, sb = a[i], b[i]
        assert sa["image"].tobytes() == sb["image"].tobytes() and sa["caption"] == sb["caption"]
    # order of access does not matter: every sample is a function of (seed, index)
    assert a[5]["image"].tobytes() == SyntheticShapes(size=20, seed=3)[5]["image"].tobytes()
    other = SyntheticShapes(size=20, seed=4)
    assert any(other[i]["caption"] != a[i]["caption"] for i in range(20))


def test_captions_match_labels_and_objects():
    pattern = re.compile(
        rf"^a (small|large) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
        rf"(?: ({'|'.join(RELATIONS)}) a (small|large) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}))?$"
    )
    ds = SyntheticShapes(size=200, seed=0, image_size=48)
    assert ds.class_names == list(SHAPES) and all("{}" in t for t in ds.prompt_templates)
    two = 0
    for i in range(len(ds)):
        s = ds[i]
        m = pattern.match(s["caption"])
        assert m, s["caption"]
        assert ds.class_names[s["label"]] == m.group(3)
        assert s["image"].size == (48, 48) and s["index"] == s["image_id"] == i
        if m.group(4):
            two += 1
            _, _, objects = ds.generate(i)
            (x0, y0), (x1, y1) = objects[0]["center"], objects[1]["center"]
            relation = m.group(4)
            assert {"left of": x0 < x1, "right of": x0 > x1, "above": y0 < y1, "below": y0 > y1}[relation]
    assert 120 < two < 190  # two_shapes_prob=0.8


def test_captions_are_mostly_unique_and_color_is_drawn():
    ds = SyntheticShapes(size=300, seed=1)
    captions = [ds[i]["caption"] for i in range(300)]
    assert len(set(captions)) > 250
    by_color = SyntheticShapes(size=50, seed=1, label_attribute="color", two_shapes_prob=0.0)
    for i in range(10):
        s = by_color[i]
        pixels = np.asarray(s["image"]).reshape(-1, 3).astype(int)
        target = np.array(COLORS[by_color.class_names[s["label"]]])
        assert (np.abs(pixels - target).sum(1) < 40).sum() > 5  # the named color is really there
