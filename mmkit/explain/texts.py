"""Caption batches as the models take them: a tensor of token ids [B, L] (open_clip
tokenizers) or a dict with ``input_ids`` and ``attention_mask`` (Hugging Face tokenizers).
The explanation code moves, indexes and reads both through these helpers."""

from __future__ import annotations

import torch
from torch import Tensor

Texts = Tensor | dict[str, Tensor]


def check_texts(texts) -> None:
    if isinstance(texts, Tensor):
        return
    if not isinstance(texts, dict) or not {"input_ids", "attention_mask"} <= set(texts):
        got = sorted(texts) if isinstance(texts, dict) else type(texts).__name__
        raise TypeError(f"texts must be a tensor of token ids or a dict with input_ids and attention_mask, got {got}")


def token_ids(texts: Texts) -> Tensor:
    return texts if isinstance(texts, Tensor) else texts["input_ids"]


def texts_to(texts: Texts, device: torch.device) -> Texts:
    return texts.to(device) if isinstance(texts, Tensor) else {k: v.to(device) for k, v in texts.items()}


def select_texts(texts: Texts, index: Tensor) -> Texts:
    """The captions at ``index`` (rows, repeats allowed)."""
    return texts[index] if isinstance(texts, Tensor) else {k: v[index] for k, v in texts.items()}
