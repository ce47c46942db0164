"""The pointing game on a small model trained for a minute: its maps point at the shape the
caption names well above chance and above a random map; occlusion maps of the same architecture
with its initial weights do not (they depend on what the model learnt: Adebayo et al.'s check)."""

import json
import time

import pytest
import torch
import torch.nn.functional as F

from mmkit.data.sources.synthetic import SyntheticShapes
from mmkit.explain.evaluation import pointing_game, shape_queries
from mmkit.models.spec import OpenCLIP

ARCH = {"embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
METHODS = ["attention", "gradxinput", "occlusion"]


def _train(model, preprocessing, steps: int, batch: int) -> None:
    data = SyntheticShapes(size=steps * batch, seed=0, image_size=32, two_shapes_prob=0.5)
    transform = preprocessing.image_transform(False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        rows = [data[i] for i in range(step * batch, (step + 1) * batch)]
        out = model(torch.stack([transform(r["image"]) for r in rows]), preprocessing.tokenize([r["caption"] for r in rows]))
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        target = torch.arange(batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.slow
def test_trained_maps_point_at_the_named_shape(tmp_path):
    (tmp_path / "arch.json").write_text(json.dumps(ARCH))
    torch.manual_seed(0)
    spec = OpenCLIP(arch=str(tmp_path / "arch.json"))
    model, pre = spec.build().eval(), spec.preprocessing
    val = SyntheticShapes(size=60, seed=1, image_size=32, two_shapes_prob=0.0)
    queries = shape_queries(val, range(60))
    before = pointing_game(model, pre, val, queries, ["occlusion"])
    start = time.time()
    _train(model, pre, steps=60, batch=32)
    after = pointing_game(model, pre, val, queries, METHODS)
    print(f"trained in {time.time() - start:.0f} s;", {m: round(r["accuracy"], 3) for m, r in after.items()},
          "untrained occlusion", round(before["occlusion"]["accuracy"], 3))
    floor = max(after["chance"]["accuracy"], after["random"]["accuracy"])
    for method in METHODS:
        assert after[method]["accuracy"] > floor + 0.1, (method, after)
    assert after["occlusion"]["accuracy"] > before["occlusion"]["accuracy"] + 0.1
