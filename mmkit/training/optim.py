"""Optimizer parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

# Parameters that should not be pulled towards zero: norms' gains, biases, the temperature /
# logit bias, and embedding tables (positional, class and token embeddings).
_NO_DECAY_NAME_PARTS = ("bias", "logit_scale", "logit_bias", "embedding", "ln_", "norm", ".bn", "positional")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))
        for p in m.parameters(recurse=False)
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # locked towers never reach the optimizer
        exempt = (
            p.ndim < 2
            or id(p) in embedding_params
            or id(p) in norm_params
            or any(part in name for part in _NO_DECAY_NAME_PARTS)
        )
        (no_decay if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# Devices with torch's fused AdamW kernel.
_FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu")


def fused_adamw_supported(groups: list[dict]) -> bool | None:
    """True when torch's fused AdamW kernel can take every parameter (floating point, on a device
    it supports; DTensors too): it updates all parameters in one kernel instead of looping over
    them in Python, the same AdamW arithmetic. Measured on this project's CPU machine: 26 ms vs
    106 ms per step for an 8 M-parameter model (single-tensor loop, torch's CPU default); on GPUs
    it also beats torch's default there (foreach). None (torch's default) otherwise."""
    params = [p for g in groups for p in g["params"]]
    if params and all(p.is_floating_point() and p.device.type in _FUSED_ADAMW_DEVICES for p in params):
        return True
    return None


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: float, min_lr_ratio: float = 0.0) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based): linear warmup from ~0 to
    1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``total_steps``, held there
    after it. A schedule of unknown length (``total_steps`` infinite) stays at 1 after the warmup."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not math.isfinite(total_steps):
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ~0 to the base LR over ``warmup_steps`` optimizer steps, then cosine
    decay to ``min_lr_ratio`` × base LR at ``total_steps`` (``warmup_cosine_factor``)."""
    total_steps = max(total_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_lr_ratio)
    )
