"""Contrastive image–text losses: symmetric InfoNCE (CLIP) and pairwise sigmoid (SigLIP).

Both follow the model→loss contract: they take the model's output dict as keyword arguments
and return named ``*_loss`` terms. Gathering across ranks happens here, through
``mmkit.distributed``, so that N processes with per-rank batch b give the same value (averaged
over ranks) and the same gradients (after DDP's averaging) as one process with batch N·b.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkit import distributed as D
from mmkit.config_checks import Range, check_settings
from mmkit.losses.protocol import PairedLoss


def _pair_logits(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor,
    pair_logits: Callable[[Tensor, Tensor], Tensor] | None,
) -> Tensor:
    # A learned similarity head (O(B²) MLP evaluations) replaces the scaled dot product.
    if pair_logits is not None:
        return pair_logits(image, text)
    return logit_scale * image @ text.T


class ClipLoss(PairedLoss):
    """Symmetric InfoNCE over the global batch.

    Args:
        local_loss: each rank computes only the rows of its own samples against the global
            batch (O(b·B) instead of O(B²) per rank); same value and gradients as the full loss.
        gather: gather features across ranks (turn off only to study per-rank negatives).
        label_smoothing: label smoothing of the cross-entropy terms.
        tile_size: if set, compute the loss in row/column tiles of this size without ever
            materialising the B×B similarity matrix (exact; see ``tiled_contrastive``).
    """

    setting_ranges = {
        "label_smoothing": Range(ge=0, le=1),
        "tile_size": Range(ge=1, integer=True, none="no tiling"),
    }

    def __init__(
        self,
        local_loss: bool = False,
        gather: bool = True,
        label_smoothing: float = 0.0,
        tile_size: int | None = None,
    ) -> None:
        check_settings(self, locals(), ClipLoss.setting_ranges)
        super().__init__()
        if tile_size is not None and label_smoothing:
            raise ValueError("ClipLoss: label_smoothing is not supported with tile_size (the tiled loss is exact InfoNCE)")
        self.local_loss = local_loss
        self.gather = gather
        self.label_smoothing = label_smoothing
        self.tile_size = tile_size

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        pair_logits: Callable[[Tensor, Tensor], Tensor] | None = None,
        **_: object,
    ) -> dict[str, Tensor]:
        n_local = image_features.shape[0]
        if self.gather:
            all_image, offset = D.all_gather_with_grad(image_features)
            all_text, _ = D.all_gather_with_grad(text_features)
        else:
            all_image, all_text, offset = image_features, text_features, 0
        n_global = all_image.shape[0]

        if self.tile_size is not None:
            from mmkit.losses.tiled_contrastive import tiled_clip_loss

            if pair_logits is not None:
                raise ValueError("tile_size needs the cosine similarity head, not a learned MLP head")
            loss = tiled_clip_loss(
                image_features if self.local_loss else all_image,
                text_features if self.local_loss else all_text,
                all_image,
                all_text,
                logit_scale,
                row_offset=offset if self.local_loss else 0,
                tile_size=self.tile_size,
            )
        elif self.local_loss:
            labels = torch.arange(n_local, device=image_features.device) + offset
            logits_i = _pair_logits(image_features, all_text, logit_scale, pair_logits)
            logits_t = _pair_logits(all_image, text_features, logit_scale, pair_logits).T
            loss = self._ce_sum(logits_i, labels) + self._ce_sum(logits_t, labels)
        else:
            labels = torch.arange(n_global, device=image_features.device)
            logits = _pair_logits(all_image, all_text, logit_scale, pair_logits)
            loss = self._ce_sum(logits, labels) + self._ce_sum(logits.T, labels)

        # The full loss is replicated on every rank, the local loss partitioned over the ranks.
        denom = D.mean_divisor(n_global, partitioned=self.local_loss and self.gather)
        return {"contrastive_loss": loss / (2 * denom)}

    def _ce_sum(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=self.label_smoothing)


class SigLipLoss(PairedLoss):
    """Pairwise sigmoid loss (SigLIP): every image–text pair is an independent binary problem.

    Each rank scores its own images against the texts of the whole global batch; the loss is
    normalised by the global number of images, as in the paper.
    """

    uses_logit_bias = True

    def __init__(self, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        pair_logits: Callable[[Tensor, Tensor], Tensor] | None = None,
        **_: object,
    ) -> dict[str, Tensor]:
        if self.gather:
            all_text, offset = D.all_gather_with_grad(text_features)
        else:
            all_text, offset = text_features, 0
        logits = _pair_logits(image_features, all_text, logit_scale, pair_logits)
        if logit_bias is not None:
            logits = logits + logit_bias
        n_local = image_features.shape[0]
        signs = -torch.ones_like(logits)
        rows = torch.arange(n_local, device=logits.device)
        signs[rows, rows + offset] = 1.0
        # Each rank scores its own images: partitioned (as many images as texts per rank).
        loss = -F.logsigmoid(signs * logits).sum() / D.mean_divisor(all_text.shape[0], partitioned=self.gather)
        return {"sigmoid_loss": loss}
