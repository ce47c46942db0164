"""The image–text score every explanation method explains: the similarity the model ranks
pairs by (cosine of the normalised features, or the learned MLP head's score), after the
module's ``project`` hook where the model is part of an mmkit module (MetricAlign's head)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkit.models.dual_encoder import DualEncoder


class PairScorer:
    """``scorer(images, texts)`` -> [B] score of pair i (image i with text i)."""

    def __init__(self, model: DualEncoder, project: Callable[[dict], dict] | None = None) -> None:
        self.model = model
        self.project = project

    def features(self, images: Tensor | None = None, texts: Tensor | None = None) -> dict[str, Tensor]:
        out = self.model(images, texts)
        if self.project is not None:
            out = self.project(out)
        return {k: F.normalize(out[k], dim=-1) for k in ("image_features", "text_features") if k in out}

    def score(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        head = self.model.similarity_head
        if head is None:
            return (image_features * text_features).sum(dim=-1)
        i, t = image_features, text_features  # the head's features for each pair only, not all B² pairs
        return head.net(torch.cat([i, t, i * t, (i - t).abs()], dim=-1)).squeeze(-1)

    def __call__(self, images: Tensor, texts: Tensor) -> Tensor:
        f = self.features(images, texts)
        return self.score(f["image_features"], f["text_features"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
