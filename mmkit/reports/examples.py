"""What the model learnt, on a few validation pairs: the numbers behind the report's pictures.

``RunReport`` keeps the first rows of the first validation batches it sees (``take_rows``), and
at the end of training asks the module for their features (``DualEncoderModule.example_features``)
on rank 0. From them this file computes, with plain tensor operations:

- text→image retrieval: for a caption, the top-k images (each image once, by ``image_id``) and
  which of them is its own;
- image→text retrieval: for an image, the top-k captions and which of them describe it;
- the image × caption cosine-similarity matrix;
- the zero-shot confusion matrix (true class × predicted class) where the rows have labels;
- a map of the embedding space: images and captions on their two principal axes, with the
  modality gap of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class Examples:
    """Rows of a validation batch and what the model makes of them (row i: image i, caption i).

    ``similarity[i, j]`` is image i against caption j; ``predictions`` and ``class_names`` are
    None without a zero-shot classifier; ``labels`` are -1 for unlabelled rows.
    """

    images: np.ndarray  # (N, H, W, 3) uint8, for display
    captions: list[str]
    image_ids: np.ndarray  # (N,)
    similarity: np.ndarray  # (N, N)
    labels: np.ndarray  # (N,)
    class_names: list[str] | None = None
    predictions: np.ndarray | None = None  # (N,) zero-shot class per image
    image_features: np.ndarray | None = None  # (N, D) normalised, for the embedding map
    text_features: np.ndarray | None = None


def _rows(value: Any, n: int, size: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
        return value[:n].detach().cpu()
    if isinstance(value, dict):
        return {k: _rows(v, n, size) for k, v in value.items()}
    if isinstance(value, list) and len(value) == size:
        return list(value[:n])
    return None  # per-batch fields (num_skipped, skipped): not rows


def take_rows(batch: dict, n: int, kept: dict | None = None) -> dict:
    """``kept`` (rows taken before, or None) followed by the first rows of ``batch``, at most
    ``n`` rows in all, on the CPU. Per-batch fields (counts, reasons) are dropped."""
    size = int(batch["images"].shape[0])
    have = 0 if kept is None else int(kept["images"].shape[0])
    new = {k: v for k, v in ((k, _rows(v, max(0, n - have), size)) for k, v in batch.items()) if v is not None}
    if kept is None:
        return new
    return {k: _concat(kept[k], new[k]) for k in kept if k in new}


def _concat(a: Any, b: Any) -> Any:
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _concat(a[k], b[k]) for k in a}
    return list(a) + list(b)


def display_images(images: Tensor, mean=None, std=None) -> np.ndarray:
    """(N, H, W, 3) uint8 pictures of model-input images: the normalisation undone with the
    preprocessing's ``mean``/``std``, or without them each image stretched to [0, 1]."""
    x = images.detach().float().cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    else:
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        high = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - low) / (high - low).clamp_min(1e-8)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def unique_images(image_ids: np.ndarray) -> np.ndarray:
    """Row of the first occurrence of each image id, in row order (the retrieval gallery)."""
    _, first = np.unique(image_ids, return_index=True)
    return np.sort(first)


def text_to_image(similarity: np.ndarray, image_ids: np.ndarray, queries: list[int], k: int = 5) -> list[dict]:
    """For each caption row in ``queries``: ``top`` (the rows of its k most similar images, each
    image once, best first), ``correct`` (whether each is the caption's own image) and ``rank``
    (1-based rank of its own image among all images; ties count against it)."""
    gallery = unique_images(image_ids)
    out = []
    for q in queries:
        scores = similarity[gallery, q]
        order = np.argsort(-scores, kind="stable")
        top = gallery[order[:k]]
        own = scores[image_ids[gallery] == image_ids[q]].max()
        out.append({"query": int(q), "top": top.tolist(), "correct": (image_ids[top] == image_ids[q]).tolist(),
                    "scores": scores[order[:k]].tolist(), "rank": int((scores >= own).sum())})
    return out


def image_to_text(similarity: np.ndarray, image_ids: np.ndarray, queries: list[int], k: int = 5) -> list[dict]:
    """For each image row in ``queries``: ``top`` (its k most similar caption rows, best first),
    ``correct`` (whether each describes it) and ``rank`` (1-based rank of its best caption)."""
    out = []
    for q in queries:
        scores = similarity[q]
        order = np.argsort(-scores, kind="stable")
        top = order[:k]
        own = scores[image_ids == image_ids[q]].max()
        out.append({"query": int(q), "top": top.tolist(), "correct": (image_ids[top] == image_ids[q]).tolist(),
                    "scores": scores[top].tolist(), "rank": int((scores >= own).sum())})
    return out


def embedding_map(image_features: np.ndarray, text_features: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """2-D coordinates of the images and captions on the two principal axes of both together,
    and the modality gap of the rows (distance between the mean image and the mean caption)."""
    both = np.concatenate([image_features, text_features]).astype(np.float64)
    centred = both - both.mean(0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ axes[:2].T
    if xy.shape[1] < 2:  # one-dimensional embeddings
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    n = image_features.shape[0]
    gap = float(np.linalg.norm(image_features.mean(0) - text_features.mean(0)))
    return xy[:n], xy[n:], gap


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class; unlabelled rows (-1) left out."""
    keep = labels >= 0
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels[keep], predictions[keep]), 1)
    return counts


def compute_examples(features: dict[str, Any], rows: dict, mean=None, std=None) -> Examples:
    """The ``Examples`` of ``rows`` (from ``take_rows``) given their ``features`` (from
    ``DualEncoderModule.example_features``)."""
    image = features["image_features"].float().cpu()
    text = features["text_features"].float().cpu()
    labels = rows.get("label", torch.full((image.shape[0],), -1)).cpu().numpy()
    examples = Examples(
        images=display_images(rows["images"], mean, std),
        captions=list(rows.get("captions") or [f"caption {i}" for i in range(image.shape[0])]),
        image_ids=rows["image_id"].cpu().numpy(),
        similarity=(image @ text.T).numpy(),
        labels=labels,
        image_features=image.numpy(),
        text_features=text.numpy(),
    )
    classifier = features.get("classifier")
    if classifier is not None and (labels >= 0).any():
        examples.class_names = list(features["class_names"])
        examples.predictions = (image @ classifier.float().cpu().T).argmax(1).numpy()
    return examples
