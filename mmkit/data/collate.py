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
    ``label`` (LongTensor [B]), ``captions`` (the B caption strings, for reports), ``num_skipped``
    (int), ``skipped`` (first reasons) and ``skipped_index`` (the index of every skipped sample, None
    where its source gave none). A batch whose
    samples were all bad has B = 0 but still carries its counts. Each extra view ``name`` adds
    ``<name>_images`` and ``<name>_texts`` (e.g. a distillation teacher's own inputs).

    Args:
        image_transform: PIL image -> float tensor [3,H,W].
        tokenize: list of captions -> LongTensor [B,L] or dict of tensors.
        max_reasons: How many skip reasons a batch carries (the count is always exact).
        extra_views: ``{name: (image_transform, tokenize)}`` for models that need their own
            inputs. A view's transform or tokenizer equal to the main one reuses its tensors.
    """

    def __init__(
        self,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenize: Callable[[list[str]], torch.Tensor | dict[str, torch.Tensor]],
        max_reasons: int = 5,
        extra_views: dict[str, tuple[Callable, Callable]] | None = None,
    ) -> None:
        self.image_transform = image_transform
        self.tokenize = tokenize
        self.max_reasons = max_reasons
        self.extra_views = dict(extra_views or {})
        self._view_shapes: dict[str, tuple[int, ...]] = {}
        self._image_shape: tuple[int, ...] | None = None  # for empty batches, learnt from the last good one

    def __call__(self, samples: list[dict[str, Any] | BadSample]) -> dict[str, Any]:
        reasons: list[str] = []
        skipped_index: list[int | None] = []  # the rows skipped, so trackers count a row met twice once
        images, captions, keep = [], [], []
        view_images: dict[str, list[torch.Tensor]] = {name: [] for name in self.extra_views}
        for s in samples:
            if isinstance(s, BadSample):
                reasons.append(s.reason)
                skipped_index.append(s.index)
                continue
            try:
                image = self.image_transform(s["image"])
                extra = self._view_images(s["image"])
            except Exception as e:  # one unusual image must not kill the worker
                reasons.append(f"sample {s['index']}: image transform failed ({type(e).__name__}: {e})")
                skipped_index.append(s["index"])
                continue
            images.append(image)
            for name, view_image in extra.items():
                view_images[name].append(view_image)
            captions.append(s["caption"])
            keep.append(s)

        if images:
            images_t = torch.stack(images)
            self._image_shape = tuple(images_t.shape[1:])
        else:
            images_t = torch.empty((0, *(self._image_shape or (3, 0, 0))))
        texts = self._tokenize(captions)
        batch = {
            "images": images_t,
            "texts": texts,
            "index": torch.tensor([s["index"] for s in keep], dtype=torch.long),
            "image_id": torch.tensor([s["image_id"] for s in keep], dtype=torch.long),
            "label": torch.tensor([s["label"] for s in keep], dtype=torch.long),
            "captions": captions,
            "num_skipped": len(reasons),
            "skipped": reasons[: self.max_reasons],
            "skipped_index": skipped_index,
        }
        for name, (transform, tokenize) in self.extra_views.items():
            batch[f"{name}_images"] = images_t if transform == self.image_transform else self._stack(name, view_images[name])
            batch[f"{name}_texts"] = texts if tokenize == self.tokenize else self._tokenize(captions, tokenize)
        return batch

    def _view_images(self, image: Image.Image) -> dict[str, torch.Tensor]:
        # Only views with a transform of their own cost a second transform.
        return {
            name: transform(image)
            for name, (transform, _) in self.extra_views.items()
            if transform != self.image_transform
        }

    def _stack(self, name: str, images: list[torch.Tensor]) -> torch.Tensor:
        if images:
            out = torch.stack(images)
            self._view_shapes[name] = tuple(out.shape[1:])
            return out
        return torch.empty((0, *self._view_shapes.get(name, (3, 0, 0))))

    def _tokenize(self, captions: list[str], tokenize: Callable | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        tokenize = tokenize or self.tokenize
        if captions:
            return tokenize(captions)
        try:  # some tokenizers reject an empty list; the batch is skipped downstream anyway
            return tokenize([])
        except Exception:
            return torch.empty((0, 0), dtype=torch.long)
