"""Similarity heads that can replace the default cosine similarity with temperature."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLPSimilarityHead(nn.Module):
    """A learned similarity s(i, t) = MLP([i, t, i*t, |i-t|]) scored for every image–text pair.

    Cost: B² MLP evaluations per batch (memory and time grow with the square of the global
    batch), against one B×B matrix product for cosine similarity. Useful for small batches and
    studies; the cosine head is the choice for large-batch pretraining.
    """

    def __init__(self, embed_dim: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4 * embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        n_i, n_t = image.shape[0], text.shape[0]
        i = image[:, None, :].expand(n_i, n_t, -1)
        t = text[None, :, :].expand(n_i, n_t, -1)
        pair = torch.cat([i, t, i * t, (i - t).abs()], dim=-1)
        return self.net(pair).squeeze(-1)
