"""Negative selection for hinge (ranking) losses: which candidates each anchor is ranked against.

Every strategy sees, for one direction (e.g. image anchors against text candidates):

- ``scores`` (A, C): how close each candidate is to each anchor, higher = closer (a negated
  distance);
- ``positive`` (A,): each anchor's score with its own positive;
- ``valid`` (A, C): which candidates may serve as that anchor's negatives (not its positive, not
  another caption of the same image);

and returns a boolean selection of the same shape. Selections are made on detached scores: the
choice is not differentiated, the hinge of each chosen pair is. They only read values, so the
same rows select the same negatives whichever process computes them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

NegativeStrategy = Literal["all", "hardest", "semi_hard", "top_k", "random"]


def select_negatives(
    scores: Tensor,
    positive: Tensor,
    valid: Tensor,
    strategy: NegativeStrategy,
    k: int = 1,
    keys: Tensor | None = None,
) -> Tensor:
    """Boolean (A, C) selection of negatives (see the module docstring).

    Args:
        scores: (A, C) anchor–candidate scores, higher = closer.
        positive: (A,) each anchor's score with its positive.
        valid: (A, C) candidates allowed as negatives.
        strategy: ``all`` valid negatives; ``hardest`` (the closest one); ``semi_hard`` (the
            closest one that is still farther than the positive, FaceNet; an anchor with none
            takes its least-hard negative instead, as in TensorFlow Addons); ``top_k`` (the k
            closest); ``random`` (k uniformly drawn, using ``keys``).
        k: negatives per anchor for ``top_k`` and ``random`` (fewer when fewer are valid).
        keys: (A, C) i.i.d. uniform keys for ``random`` (``random_keys``); the k valid candidates with the
            largest keys are taken (sampling without replacement).
    """
    scores, positive = scores.detach(), positive.detach()
    if strategy == "all":
        return valid.clone()
    if strategy == "hardest":
        return _top(scores, valid, 1)
    if strategy == "top_k":
        return _top(scores, valid, k)
    if strategy == "semi_hard":
        farther = valid & (scores < positive[:, None])
        # Hardest of the semi-hard ones; without any, the easiest of those at least as close as
        # the positive (the mildest violation): every anchor with a valid negative keeps a term.
        fallback = ~farther.any(1, keepdim=True)
        keyed = torch.where(fallback, -scores, scores)
        return _top(keyed, torch.where(fallback, valid, farther), 1)
    if strategy == "random":
        if keys is None:
            raise ValueError("strategy 'random' needs keys")
        return _top(keys.to(scores.device), valid, k)
    raise ValueError(f"unknown negative strategy {strategy!r}")


def _top(keys: Tensor, allowed: Tensor, k: int) -> Tensor:
    """The ``k`` allowed entries of each row with the largest keys (fewer if fewer are allowed)."""
    k = min(k, keys.shape[1])
    if k <= 0:
        return torch.zeros_like(allowed)
    masked = keys.masked_fill(~allowed, float("-inf"))
    idx = masked.topk(k, dim=1).indices
    chosen = torch.zeros_like(allowed).scatter_(1, idx, True)
    return chosen & allowed  # rows with fewer than k allowed picked some -inf entries: drop them


def random_keys(
    seed: int, step: int, direction: int, row_offset: int, n_rows: int, n_cols: int, device: torch.device | None = None
) -> Tensor:
    """Uniform keys in [0, 1) for the ``random`` strategy, for global anchor rows
    ``row_offset : row_offset + n_rows`` and ``n_cols`` candidates.

    Each key is a hash of (seed, step, direction, global row, column), so a process computes
    only its own rows, on its own device, and one process with batch N·b draws exactly the
    negatives that N processes with batch b do.
    """
    base = _mix(seed, step, direction)
    rows = torch.arange(row_offset, row_offset + n_rows, dtype=torch.int64, device=device)
    cols = torch.arange(n_cols, dtype=torch.int64, device=device)
    row_h = _hash32(rows ^ (base & _M32))[:, None]
    col_h = _hash32(cols ^ (base >> 32))[None, :]
    return _hash32(row_h ^ col_h).double() / 2.0**32


_M32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    # An integer mixing function on 32-bit values held in int64; the odd multipliers are below
    # 2**31, so no product leaves the int64 range.
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x6C8E9CF5) & _M32
    return x ^ (x >> 16)


def _mix(*parts: int) -> int:
    # A fixed (not per-process, unlike hash()) combination of the parts into a 63-bit seed.
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
