"""Gradient-weighted attention relevance propagated through every layer (Chefer, Gur and Wolf
2021, "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers", the self-attention rule they use for CLIP's two towers).

Relevance starts as the identity (each token explains itself) and each layer mixes it by that
layer's attention, weighted by how much the score depends on each attention entry:
``R <- R + mean_heads(clamp(dscore/dA * A, min=0)) @ R``. The image's relevance is the row of
the token the tower pools (the class token; for average pooling the mean of the patch rows) over
the patch columns; the caption's is the row of the pooled token (end of text, or a BERT-style
encoder's first token) over its tokens, or for mean pooling the mean of the kept tokens' rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmkit.explain.scoring import PairScorer
from mmkit.explain.texts import Texts
from mmkit.explain.towers import Towers


def propagate_relevance(attentions: list[Tensor], gradients: list[Tensor]) -> Tensor:
    """[B, L, L] relevance after all layers, from each layer's attention probabilities and the
    score's gradient with respect to them (both [B, heads, L, L], in layer order)."""
    if not attentions or len(attentions) != len(gradients):
        raise ValueError(f"need one gradient per attention map, got {len(attentions)} maps and {len(gradients)} gradients")
    batch, _, length, _ = attentions[0].shape
    relevance = torch.eye(length, dtype=attentions[0].dtype, device=attentions[0].device).expand(batch, length, length)
    for attention, gradient in zip(attentions, gradients):
        weighted = (gradient * attention).clamp(min=0).mean(dim=1)
        relevance = relevance + weighted @ relevance
    return relevance


def attention_relevance(scorer: PairScorer, towers: Towers, images: Tensor, texts: Texts) -> tuple[Tensor, Tensor, Tensor]:
    """(patch relevance [B, gh, gw], token relevance [B, L], scores [B]) of each pair."""
    with torch.enable_grad(), towers.embeddings(), towers.recording() as maps:
        scores = scorer(images, texts)
        attentions = maps["image"] + maps["text"]
        gradients = torch.autograd.grad(scores.sum(), attentions)  # pairs are independent: one backward for all
    n_image = len(maps["image"])
    image_r = propagate_relevance(maps["image"], list(gradients[:n_image]))
    text_r = propagate_relevance(maps["text"], list(gradients[n_image:]))
    patches = towers.patch_relevance(image_r, images)
    tokens = towers.token_relevance(text_r, texts)
    return patches.detach(), tokens.detach(), scores.detach()
