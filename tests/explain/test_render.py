"""Heatmap overlays, highlighted captions and the report's explained-retrievals figure."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmkit.explain.render import (
    heatmap_overlay,
    highlighted_text,
    model_pixels_to_image,
    token_strings,
)
from mmkit.explain.report_figure import explained_retrievals_figure


def test_overlay_puts_the_hot_colour_where_the_relevance_is():
    image = Image.new("RGB", (16, 16), (128, 128, 128))
    relevance = torch.zeros(2, 2)
    relevance[1, 0] = 1.0  # bottom-left
    out = np.asarray(heatmap_overlay(image, relevance, side=64), dtype=np.int32)
    assert out.shape == (64, 64, 3)
    hot, cold = out[56, 8], out[8, 56]  # jet: red at 1, blue at 0
    assert hot[0] > hot[2] and cold[2] > cold[0]
    with pytest.raises(ValueError, match=r"must be \[gh, gw\]"):
        heatmap_overlay(image, torch.zeros(1, 2, 2))


def test_model_pixels_round_trip_to_the_image():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    pixels = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert np.array_equal(np.asarray(model_pixels_to_image(pixels, mean, std)), rgb)


def test_highlighted_text_colours_the_relevant_token():
    picture = highlighted_text(["a", "red", "circle"], [0.0, 1.0, 0.0], width=400)
    arr = np.asarray(picture, dtype=np.int32)
    reds = ((arr[..., 0] > 120) & (arr[..., 1] < 60)).sum()  # the dark-red background of "red"
    assert picture.size[0] == 400 and reds > 100
    plain = np.asarray(highlighted_text(["a", "red", "circle"], [0.0, 0.0, 0.0], width=400), dtype=np.int32)
    assert ((plain[..., 0] > 120) & (plain[..., 1] < 60)).sum() == 0
    with pytest.raises(ValueError, match="2 tokens but 3 relevance values"):
        highlighted_text(["a", "b"], [0.1, 0.2, 0.3])
    long = highlighted_text(["word"] * 60, [0.5] * 60, width=300)
    assert long.size[1] > 5 * 30  # wrapped onto several lines


def test_token_strings_decode_each_id(tiny):
    _, pre = tiny
    ids = pre.tokenize(["a red circle"])[0][:5].tolist()
    assert token_strings(pre._tokenizer, ids) == ["<start_of_text>", "a", "red", "circle", "<end_of_text>"]


def test_explained_retrievals_figure(tmp_path, tiny_arch, tiny, tiny_batch):
    from mmkit import CLIPPretrain
    from mmkit.explain.report_figure import _decode
    from mmkit.models.spec import OpenCLIP

    model, _ = tiny
    images, texts = tiny_batch
    path = explained_retrievals_figure(model, {"images": images, "texts": texts}, tmp_path / "fig.png",
                                       captions=["one", "two", "three", "four"], num_queries=3, top_k=2)
    assert Image.open(path).size == (int((2.2 * 2 + 0.4) * 100), int(2.5 * 3 * 100))
    # an mmkit module: its model, and captions decoded with its tokenizer (cut to the 8-token context)
    module = CLIPPretrain(OpenCLIP(arch=tiny_arch), export_dir="")
    module.configure_model()
    texts = module.preprocessing.tokenize(["a red circle", "a large blue star", "x", "y"])
    assert _decode(module, texts)[:2] == ["a red circle", "a large blue star"]
    out = explained_retrievals_figure(module, {"images": images, "texts": texts}, tmp_path / "sub" / "fig2.png", top_k=10)
    assert Image.open(out).size == (int((2.2 * 4 + 0.4) * 100), int(2.5 * 4 * 100))  # top_k capped at the batch
