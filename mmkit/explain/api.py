"""``explain_pairs``: relevance of each image patch and each caption token for the score of
image–caption pairs, by one of the methods (``METHODS``), in one batched call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mmkit.explain.attention_relevance import attention_relevance
from mmkit.explain.baselines import gradient_x_input, occlusion
from mmkit.explain.scoring import PairScorer
from mmkit.explain.texts import Texts, check_texts, texts_to, token_ids
from mmkit.explain.towers import towers_for
from mmkit.models.dual_encoder import DualEncoder

METHODS: dict[str, Callable] = {
    "attention": attention_relevance,  # Chefer et al. 2021, all layers
    "gradxinput": gradient_x_input,
    "occlusion": occlusion,
}


@dataclass
class Explanation:
    """Relevance of a batch of pairs. ``patches`` [B, gh, gw] and ``tokens`` [B, L] are raw
    (occlusion and gradient × input are signed; attention relevance is >= 0); ``tokens`` is 0
    outside ``valid_tokens`` (padding). ``scores`` [B] is the explained score."""

    method: str
    patches: Tensor
    tokens: Tensor
    scores: Tensor
    valid_tokens: Tensor

    def normalized_patches(self) -> Tensor:
        return normalize_relevance(self.patches)

    def to(self, device) -> Explanation:
        return Explanation(self.method, self.patches.to(device), self.tokens.to(device), self.scores.to(device),
                           self.valid_tokens.to(device))


def normalize_relevance(relevance: Tensor) -> Tensor:
    """Each map's positive part scaled to [0, 1] by its maximum (an all-non-positive map is 0):
    what a heatmap shows, evidence for the match."""
    flat = relevance.flatten(1).clamp(min=0)
    peak = flat.amax(dim=1, keepdim=True)
    return (flat / torch.where(peak > 0, peak, torch.ones_like(peak))).reshape(relevance.shape)


def explain_pairs(model: DualEncoder, images: Tensor, texts: Texts, method: str = "attention",
                  project: Callable[[dict], dict] | None = None) -> Explanation:
    """Explain the score of pair i = (images[i], texts[i]) for every i. ``images`` are the
    model's preprocessed pixels [B, 3, H, W], ``texts`` its tokenizer's output (token ids [B, L], or for Hugging Face text towers a dict
    with ``input_ids`` and ``attention_mask``); both are moved to
    the model's device. ``project``: the mmkit module's ``project`` hook, where there is one.
    The model is put in eval mode for the call (dropout would make maps random)."""
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {sorted(METHODS)}")
    towers = towers_for(model)
    check_texts(texts)
    scorer = PairScorer(model, project)
    device = scorer.device
    images, texts = images.to(device), texts_to(texts, device)
    if images.shape[0] != token_ids(texts).shape[0]:
        raise ValueError(f"explain_pairs: {images.shape[0]} images but {token_ids(texts).shape[0]} captions")
    was_training = model.training
    model.eval()
    try:
        patches, tokens, scores = METHODS[method](scorer, towers, images, texts)
    finally:
        model.train(was_training)
    valid = towers.valid_tokens(texts)
    return Explanation(method, patches, tokens * valid, scores, valid)
