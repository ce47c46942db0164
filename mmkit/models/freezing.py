"""Locking a tower, fully or all but its last N layers (LiT-style fine-tuning).

Works on any tower by finding its main stack of layers (the longest ``nn.ModuleList``), so the
same knob serves open_clip ViTs/text transformers and Hugging Face encoders.
"""

from __future__ import annotations

from torch import nn


def _layer_stack(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    best = None
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and (best is None or len(child) > len(best[1])):
            best = (name, child)
    return best


def lock_tower(tower: nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze ``tower``; then unfreeze its last ``unlocked_layers`` layers and everything that
    comes after the layer stack (final norm, pooling, projection).

    Frozen modules are also put in eval mode whenever training starts (see ``keep_frozen_eval``).
    """
    for p in tower.parameters():
        p.requires_grad_(False)
    if unlocked_layers <= 0:
        return
    found = _layer_stack(tower)
    if found is None:
        raise ValueError(f"cannot find a stack of layers in {type(tower).__name__} to leave unlocked")
    stack_name, stack = found
    if unlocked_layers > len(stack):
        raise ValueError(f"unlocked_layers={unlocked_layers} but the tower has only {len(stack)} layers")
    for layer in list(stack)[-unlocked_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    # Modules registered after the stack in definition order are its head (norm, proj, pooler).
    names = [n for n, _ in tower.named_children()]
    top = stack_name.split(".")[0]
    if top in names:
        for n in names[names.index(top) + 1 :]:
            for p in getattr(tower, n).parameters():
                p.requires_grad_(True)
    for name, p in tower.named_parameters(recurse=False):
        # Bare parameters of the tower (e.g. open_clip ViT's `proj`) belong to the head.
        if name in ("proj", "text_projection"):
            p.requires_grad_(True)


def is_fully_frozen(module: nn.Module) -> bool:
    return all(not p.requires_grad for p in module.parameters())
