"""The interface a model's preprocessing must offer the data layer.

The model owns resolution, normalization and tokenizer (they are part of what it was trained
with); the datamodule only calls them. Defined as a Protocol so no model code is imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from PIL import Image


@runtime_checkable
class Preprocessing(Protocol):
    def image_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        """PIL RGB image -> float tensor [3, H, W]; ``train`` enables augmentation."""
        ...

    def tokenize(self, texts: list[str]) -> torch.Tensor | dict[str, torch.Tensor]:
        """Batch of captions -> LongTensor [B, L], or a dict of [B, L] tensors (HF tokenizers)."""
        ...
