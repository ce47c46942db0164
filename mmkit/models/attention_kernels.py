"""Which attention kernel a tower's forward uses on the CPU in bfloat16.

torch's fused CPU attention kernel (the default of ``scaled_dot_product_attention``) is slow in
bfloat16 for the short sequences of CLIP towers: measured on this project's CPU (2 cores, AVX-512
BF16), forward + backward of one attention call, flash kernel vs the math kernel (a matmul, a
softmax, a matmul): 17 tokens 13.3 vs 2.5 ms, 50 tokens 48.9 vs 28.3 ms, 77 tokens 71.8 vs 40.4 ms,
but 197 tokens 79.7 vs 96.6 ms and 577 tokens 206 vs 306 ms; in float32 the fused kernel is as fast
or faster at every length. So a tower running in bfloat16 on the CPU (autocast, or bf16 weights)
with at most ``MATH_MAX_TOKENS`` tokens runs its attention with the math kernel; everything else
keeps torch's choice. A whole mmkit-tiny training step in bf16: 430 → 311 ms
(benchmarks/attention_kernels.py, results in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

MATH_MAX_TOKENS = 128  # measured crossover between 77 (math faster) and 197 tokens (fused faster)


def attention_kernels(tokens: int | None, weight: torch.Tensor | None):
    """A context for one tower's forward with ``tokens`` per sequence (None: unknown) and
    ``weight`` one of its parameters (its device and dtype)."""
    if tokens is None or weight is None or tokens > MATH_MAX_TOKENS or weight.device.type != "cpu":
        return contextlib.nullcontext()
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if not (autocast_bf16 or weight.dtype == torch.bfloat16):
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def image_tokens(tower: torch.nn.Module, images: torch.Tensor) -> int | None:
    """Tokens per image of a ViT-style tower (patches + one class token), from its patch size;
    None for a tower without one (a convolutional network)."""
    patch = getattr(tower, "patch_size", None) or getattr(getattr(tower, "config", None), "patch_size", None)
    if isinstance(patch, (tuple, list)):
        patch = patch[0]
    if not isinstance(patch, int) or images.dim() != 4:
        return None
    return (images.shape[-2] // patch) * (images.shape[-1] // patch) + 1


def text_tokens(texts) -> int | None:
    """Tokens per caption of a tokenized batch ([B, L] ids, or a dict holding ``input_ids``)."""
    ids = texts.get("input_ids") if isinstance(texts, dict) else texts
    return int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
