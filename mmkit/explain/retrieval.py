"""The top-k images of a folder for a text query: the pairs ``mmkit explain --query`` explains."""

from __future__ import annotations

import torch

from mmkit.explain.loading import ExplainableModel
from mmkit.explain.pairs import Pair, _load, folder_images
from mmkit.explain.scoring import PairScorer
from mmkit.explain.texts import texts_to


@torch.no_grad()
def top_k_pairs(loaded: ExplainableModel, query: str, folder: str, k: int, batch_size: int = 64) -> list[Pair]:
    """The ``k`` images of ``folder`` that score highest with ``query``, best first, paired with it."""
    if k < 1:
        raise ValueError(f"--top_k must be >= 1, got {k}")
    paths = folder_images(folder)
    scorer = PairScorer(loaded.model, loaded.project)
    device = scorer.device
    transform = loaded.preprocessing.image_transform(False)
    text_f = scorer.features(texts=texts_to(loaded.preprocessing.tokenize([query]), device))["text_features"]
    images, scores = [], []
    for start in range(0, len(paths), batch_size):
        part = [_load(p, f"--images {folder}") for p in paths[start:start + batch_size]]
        images += part
        pix = torch.stack([transform(im) for im in part]).to(device)
        image_f = scorer.features(images=pix)["image_features"]
        scores.append(scorer.score(image_f, text_f.expand(len(part), -1)))
    best = torch.cat(scores).topk(min(k, len(paths))).indices.tolist()
    return [Pair(str(paths[i]), images[i], query) for i in best]
