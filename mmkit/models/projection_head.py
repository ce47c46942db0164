"""A per-modality projection head on a dual encoder's embeddings (used by ``MetricAlign``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """Dropout, then a linear map initialised to the identity (training starts from the towers'
    own embedding), or a two-layer MLP when ``hidden_dim`` is given.

    Args:
        dim: embedding width (in and out).
        hidden_dim: hidden width of a two-layer head (None: one linear layer).
        dropout: dropout probability on the head's input.
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        if hidden_dim is None:
            self.net = nn.Linear(dim, dim)
            with torch.no_grad():
                self.net.weight.copy_(torch.eye(dim))
                self.net.bias.zero_()
        else:
            self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.dropout(x))
