"""Turns a list of samples into a batch: drops bad samples (keeping count and reasons),
transforms images, and tokenizes captions in one call.

Filtering lives here, not in the sources, so every source reports bad data the same way and the
counts travel with the batch to the main process, where the tracker adds them up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from mmkit.data.sample import BadSample


class ImageTextCollate:
    """Collate function producing the batch dict every mmkit module consumes.

    Keys: ``images`` [B,3,H,W], ``texts`` ([B,L] or dict of [B,L]), ``index``, ``image_id``,
    ``label`` (LongTensor [B]), ``num_skipped`` (int) and ``skipped`` (first reasons). A batch whose
    samples were all bad has B = 0 but still carries its counts.

    Args:
        image_transform: PIL image -> float tensor [3,H,W].
        tokenize: list of captions -> LongTensor [B,L] or dict of tensors.
        max_reasons: How many skip reasons a batch carries (the count is always exact).
    """

    def __init__(
        self,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenize: Callable[[list[str]], torch.Tensor | dict[str, torch.Tensor]],
        max_reasons: int = 5,
    ) -> None:
        self.image_transform = image_transform
        self.tokenize = tokenize
        self.max_reasons = max_reasons
        self._image_shape: tuple[int, ...] | None = None  # for empty batches, learnt from the last good one

    def __call__(self, samples: list[dict[str, Any] | BadSample]) -> dict[str, Any]:
        reasons: list[str] = []
        images, captions, keep = [], [], []
        for s in samples:
            if isinstance(s, BadSample):
                reasons.append(s.reason)
                continue
            try:
                image = self.image_transform(s["image"])
            except Exception as e:  # one unusual image must not kill the worker
                reasons.append(f"sample {s['index']}: image transform failed ({type(e).__name__}: {e})")
                continue
            images.append(image)
            captions.append(s["caption"])
            keep.append(s)

        if images:
            images_t = torch.stack(images)
            self._image_shape = tuple(images_t.shape[1:])
        else:
            images_t = torch.empty((0, *(self._image_shape or (3, 0, 0))))
        return {
            "images": images_t,
            "texts": self._tokenize(captions),
            "index": torch.tensor([s["index"] for s in keep], dtype=torch.long),
            "image_id": torch.tensor([s["image_id"] for s in keep], dtype=torch.long),
            "label": torch.tensor([s["label"] for s in keep], dtype=torch.long),
            "num_skipped": len(reasons),
            "skipped": reasons[: self.max_reasons],
        }

    def _tokenize(self, captions: list[str]) -> torch.Tensor | dict[str, torch.Tensor]:
        if captions:
            return self.tokenize(captions)
        try:  # some tokenizers reject an empty list; the batch is skipped downstream anyway
            return self.tokenize([])
        except Exception:
            return torch.empty((0, 0), dtype=torch.long)
