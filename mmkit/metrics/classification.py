"""Classification scores over a whole evaluation set: top-k accuracy and mean per-class recall."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def classification_scores(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, Tensor]:
    """``top{k}`` for every k below the number of classes (top-k over k or more classes is always 1,
    so it is left out), and ``mean_per_class_recall``: the top-1 recall of each class that has
    samples, averaged over those classes (balanced accuracy; equal to top-1 on balanced data).

    Args:
        logits: (N, C) scores of N samples for C classes.
        labels: (N,) true class of each sample, in [0, C).
        ks: the k of top-k accuracy.
    """
    n, num_classes = logits.shape
    labels = labels.to(logits.device).long().reshape(-1)
    if labels.numel() != n or n == 0:
        raise ValueError(f"need one label per row and at least one row, got {labels.numel()} labels for {n} rows")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    ks = [k for k in ks if k == 1 or k < num_classes]
    top = logits.topk(max(ks), dim=1).indices
    hits = top == labels[:, None]
    out = {f"top{k}": hits[:, :k].any(1).float().mean() for k in ks}
    correct = hits[:, 0].float()
    per_class = torch.zeros(num_classes, device=logits.device).index_add_(0, labels, correct)
    counts = torch.bincount(labels, minlength=num_classes).float()
    present = counts > 0
    out["mean_per_class_recall"] = (per_class[present] / counts[present]).mean()
    return out
