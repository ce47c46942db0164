"""Two simple relevance methods to compare the attention relevance against.

- gradient × input: the score's gradient times the patch embeddings (the patchifying
  convolution's output, or a ViT's patch_embeddings output) or token embeddings, summed over
  channels; signed.
- occlusion: the score drop when one patch (a cell of the model's own patch grid) is set to the
  fill value (0, the dataset mean after normalisation), or one token's embedding to zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmkit.explain.scoring import PairScorer
from mmkit.explain.texts import Texts, select_texts, token_ids
from mmkit.explain.towers import Towers


def gradient_x_input(scorer: PairScorer, towers: Towers, images: Tensor, texts: Texts) -> tuple[Tensor, Tensor, Tensor]:
    """(patch relevance [B, gh, gw], token relevance [B, L], scores [B])."""
    with torch.enable_grad(), towers.embeddings() as emb:
        scores = scorer(images, texts)
        patch_grad, token_grad = torch.autograd.grad(scores.sum(), [emb["image"], emb["text"]])
    patches = towers.per_patch(patch_grad * emb["image"], images)  # [B, gh, gw]
    tokens = (token_grad * emb["text"]).sum(dim=-1)
    return patches.detach(), tokens.detach(), scores.detach()


def occlude_patch(images: Tensor, patch_size: tuple[int, int], row: int, col: int, fill: float = 0.0) -> Tensor:
    """A copy of ``images`` with grid cell (row, col) set to ``fill``."""
    ph, pw = patch_size
    out = images.clone()
    out[..., row * ph:(row + 1) * ph, col * pw:(col + 1) * pw] = fill
    return out


@torch.no_grad()
def occlusion(scorer: PairScorer, towers: Towers, images: Tensor, texts: Texts,
              chunk: int = 256, fill: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(patch relevance [B, gh, gw], token relevance [B, L], scores [B]): score minus the score
    with that patch (token) occluded. Image and text features are each computed once; only the
    occluded side is re-encoded, ``chunk`` variants at a time."""
    batch = images.shape[0]
    gh, gw = towers.grid(images)
    feats = scorer.features(images, texts)
    image_f, text_f = feats["image_features"], feats["text_features"]
    scores = scorer.score(image_f, text_f)

    cells = [(r, c) for r in range(gh) for c in range(gw)]
    patch_drop = torch.empty(batch, len(cells), device=images.device, dtype=scores.dtype)
    variants = [(b, k) for b in range(batch) for k in range(len(cells))]
    for start in range(0, len(variants), chunk):
        part = variants[start:start + chunk]
        occluded = torch.stack([occlude_patch(images[b], towers.patch_size, *cells[k], fill) for b, k in part])
        b_idx = torch.tensor([b for b, _ in part], device=images.device)
        k_idx = torch.tensor([k for _, k in part], device=images.device)
        occluded_scores = scorer.score(scorer.features(images=occluded)["image_features"], text_f[b_idx])
        patch_drop[b_idx, k_idx] = scores[b_idx] - occluded_scores

    ids = token_ids(texts)
    length = ids.shape[1]
    token_drop = torch.zeros(batch, length, device=ids.device, dtype=scores.dtype)
    valid = towers.valid_tokens(texts)
    variants = [(b, p) for b in range(batch) for p in range(length) if valid[b, p]]
    for start in range(0, len(variants), chunk):
        part = variants[start:start + chunk]
        b_idx = torch.tensor([b for b, _ in part], device=ids.device)
        p_idx = torch.tensor([p for _, p in part], device=ids.device)
        keep = torch.ones(len(part), length, device=ids.device)
        keep[torch.arange(len(part), device=ids.device), p_idx] = 0.0
        with towers.scaled_token_embeddings(keep):
            occluded_text = scorer.features(texts=select_texts(texts, b_idx))["text_features"]
        token_drop[b_idx, p_idx] = scores[b_idx] - scorer.score(image_f[b_idx], occluded_text)
    return patch_drop.reshape(batch, gh, gw), token_drop, scores

