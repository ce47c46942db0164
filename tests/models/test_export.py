"""Exports load where they are read (open_clip), at the trained resolution, with the trained
tokenizer: the loaded model gives mmkit's embeddings for the same PIL images and captions."""

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from mmkit.models import OpenCLIP
from mmkit.models.open_clip_model import build_open_clip

CAPTIONS = ["a small red circle", "two large blue squares left of a zebra", "star"]
ATOL = 1e-5


def _images() -> list[Image.Image]:
    # Not square and not at the model's size: resizing and cropping are part of what must agree.
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((30, 47), (64, 40), (16, 16))]


def _mmkit_embeddings(pre, model):
    with torch.no_grad():
        images = model.encode_image(torch.stack([pre.image_transform(train=False)(i) for i in _images()]))
        texts = model.encode_text(pre.tokenize(CAPTIONS))
    return images, texts


def _open_clip_embeddings(model, preprocess, tokenizer):
    model.eval()
    with torch.no_grad():
        images = model.encode_image(torch.stack([preprocess(i) for i in _images()]), normalize=True)
        texts = model.encode_text(tokenizer(CAPTIONS), normalize=True)
    return images, texts


def _assert_same(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.allclose(g, w, atol=ATOL), (g - w).abs().max()


# -- open_clip ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"image_size": 32},  # the default recipe's model
        {"image_size": 32, "init_logit_bias": -5.0},
    ],
    ids=["image_size", "image_size+logit_bias"],
)
def test_open_clip_export_loads_in_open_clip_as_trained(overrides, tmp_path):
    torch.manual_seed(0)
    spec = OpenCLIP("mmkit-tiny", **overrides)  # the preset is 64 px
    model = spec.build().eval()
    export = model.export(tmp_path / "export")

    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")

    assert json.loads((export / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert loaded.visual.image_size == (32, 32)
    assert preprocess(_images()[0]).shape == (3, 32, 32)
    _assert_same(_open_clip_embeddings(loaded, preprocess, tokenizer), _mmkit_embeddings(spec.preprocessing, model))
    assert torch.equal(loaded.logit_scale, model.clip.logit_scale)
    if "init_logit_bias" in overrides:
        assert loaded.logit_bias.item() == model.clip.logit_bias.item() == -5.0


@pytest.mark.parametrize("image_size", [None, 32])
def test_open_clip_preprocessing_and_build_agree_on_size(image_size, tmp_path):
    img = _images()[0]
    specs = [OpenCLIP("mmkit-tiny", image_size=image_size)]
    specs[0].build().export(tmp_path / "export")
    specs.append(OpenCLIP(f"local-dir:{tmp_path / 'export'}"))  # an export keeps the trained size
    for spec in specs:
        model, (_, eval_tf), _ = build_open_clip(
            spec.arch, spec.pretrained, spec.text_hf_model, spec.init_logit_bias, spec.init_temperature,
            spec.similarity, spec.image_size,
        )
        pixels = spec.preprocessing.image_transform(train=False)(img)
        size = image_size or 64
        assert pixels.shape == (3, size, size) and model.clip.visual.image_size == (size, size), spec.arch
        assert torch.equal(eval_tf(img), pixels)
        assert tuple(model.preprocess_cfg["size"]) == (size, size)
