"""Modality gap (Liang et al., 2022, "Mind the Gap"): the Euclidean distance between the mean
L2-normalised image embedding and the mean L2-normalised text embedding.

Only running sums and counts are kept, so the metric accumulates over a split in O(D) memory.
Rows are weighted as given: with several captions per image, a repeated image row counts once
per caption, matching the paired samples the gap is usually measured on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from mmkit import distributed as D


def modality_gap(image_features: Tensor, text_features: Tensor) -> Tensor:
    """‖mean(normalise(images)) − mean(normalise(texts))‖₂ for (N, D) and (M, D) embeddings."""
    img = F.normalize(image_features.float(), dim=-1).mean(0)
    txt = F.normalize(text_features.float(), dim=-1).mean(0)
    return torch.linalg.vector_norm(img - txt)


class ModalityGap(Metric):
    """Accumulating :func:`modality_gap`; under DDP every rank gets the gap of the whole split.

    Key: returns a scalar tensor (log it as e.g. ``val/modality_gap``).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The embedding width is unknown until the first update; empty sums stand for "nothing yet".
        self.add_state("image_sum", default=torch.zeros(0), dist_reduce_fx="sum")
        self.add_state("text_sum", default=torch.zeros(0), dist_reduce_fx="sum")
        self.add_state("image_count", default=torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("text_count", default=torch.zeros(()), dist_reduce_fx="sum")

    @staticmethod
    def _add(total: Tensor, features: Tensor) -> Tensor:
        part = F.normalize(features.detach().float(), dim=-1).sum(0)
        return part if total.numel() == 0 else total + part

    def update(self, image_features: Tensor, text_features: Tensor) -> None:
        """Add (N, D) image and (M, D) text embeddings (N and M may differ)."""
        self.image_sum = self._add(self.image_sum, image_features)
        self.text_sum = self._add(self.text_sum, text_features)
        self.image_count += image_features.shape[0]
        self.text_count += text_features.shape[0]

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        # A rank that saw no rows holds empty sums; pad them to the width of the others first.
        if process_group is not None:
            raise NotImplementedError("ModalityGap reduces over the default process group only")
        for name in ("image_sum", "text_sum"):
            local = getattr(self, name)
            width = max(D.gather_sizes(local.numel(), self.device))
            if local.numel() == 0:
                local = torch.zeros(width, device=self.device)
            setattr(self, name, D.all_reduce_sum(local))
        self.image_count = D.all_reduce_sum(self.image_count)
        self.text_count = D.all_reduce_sum(self.text_count)

    def compute(self) -> Tensor:
        if self.image_count == 0 or self.text_count == 0:
            return torch.tensor(float("nan"), device=self.device)
        return torch.linalg.vector_norm(self.image_sum / self.image_count - self.text_sum / self.text_count)
