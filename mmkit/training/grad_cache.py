"""Exact gradient accumulation for batch-level losses (GradCache-style feature caching).

Lightning's ``accumulate_grad_batches`` sums gradients of k separate small-batch losses, so each
micro-batch only sees its own negatives: for a contrastive loss that is a different (weaker)
objective, not a memory-saving version of the large batch. Here the large batch is split into
k chunks instead:

1. encode every chunk without autograd and cache the features (cheap in memory);
2. compute the loss on the full cached batch and take its gradient w.r.t. the features;
3. re-encode each chunk with autograd and back-propagate the cached feature gradient.

Peak activation memory is that of one chunk, and the parameter gradient equals the one of the
full batch. RNG state is replayed per chunk so dropout masks match between steps 1 and 3.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor

_FEATURES = ("image_features", "text_features")


class _RngState:
    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _split(texts, sizes: list[int]):
    if isinstance(texts, dict):
        parts = {k: v.split(sizes) for k, v in texts.items()}
        return [{k: parts[k][i] for k in parts} for i in range(len(sizes))]
    return list(texts.split(sizes))


def chunked_backward(
    forward: Callable[[Tensor, object], dict],
    loss_fn: Callable[..., dict[str, Tensor]],
    images: Tensor,
    texts,
    num_chunks: int,
    backward: Callable[[Tensor], None],
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    params: Sequence[Tensor] = (),
) -> dict[str, Tensor]:
    """Back-propagate ``loss_fn(forward(images, texts))`` through ``num_chunks`` chunks.

    Returns the (detached) loss terms of the full batch. ``backward`` is the strategy-aware
    backward (e.g. ``LightningModule.manual_backward``); ``no_sync`` suppresses the DDP gradient
    all-reduce for every chunk but the last. ``params`` are trainable tensors the loss itself
    uses besides the features (e.g. a loss's learned projection); they get their full-batch
    gradient as well (ones the loss does not use are left alone).
    """
    n = images.shape[0]
    num_chunks = max(1, min(num_chunks, n))
    sizes = [n // num_chunks + (1 if i < n % num_chunks else 0) for i in range(num_chunks)]
    image_chunks, text_chunks = images.split(sizes), _split(texts, sizes)

    rng_states, cached = [], []
    with torch.no_grad():
        for im, tx in zip(image_chunks, text_chunks):
            rng_states.append(_RngState())
            cached.append(forward(im, tx))
    if "pair_logits" in cached[0]:
        raise ValueError("chunked (exact) accumulation needs the cosine similarity head, not the MLP head")

    leaves = {k: torch.cat([c[k] for c in cached]).detach().requires_grad_() for k in _FEATURES}
    # Scalars shared by the batch (temperature, logit bias) come from the model too.
    scalars = {k: v.detach().requires_grad_() for k, v in cached[0].items() if k not in _FEATURES}
    with torch.enable_grad():
        terms = loss_fn(**leaves, **scalars)
        total = sum(v for k, v in terms.items() if k.endswith("_loss"))  # other keys: statistics
        wrt = list(leaves.values()) + list(scalars.values())
        params = [p for p in params if p.requires_grad]
        # A loss may ignore some outputs (a hinge loss has no temperature): their gradient is zero.
        raw = torch.autograd.grad(total, wrt + params, allow_unused=True)
        grads = {k: torch.zeros_like(t) if g is None else g for k, t, g in zip(list(leaves) + list(scalars), wrt, raw)}
        param_grads = [(p, g) for p, g in zip(params, raw[len(wrt) :]) if g is not None]
    del cached

    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    # Restore the RNG state after the no-grad pass so later randomness does not depend on k.
    rng_after = _RngState()
    for i, (im, tx) in enumerate(zip(image_chunks, text_chunks)):
        rng_states[i].restore()
        last = i == num_chunks - 1
        with contextlib.nullcontext() if last else no_sync():
            out = forward(im, tx)
            lo, hi = offsets[i], offsets[i + 1]
            surrogate = sum((out[k] * grads[k][lo:hi].to(out[k].dtype)).sum() for k in _FEATURES)
            # Each chunk carries 1/k of the scalars' gradient, so they are used in every backward
            # (DDP without find_unused_parameters requires that) and sum to the full gradient.
            for k in scalars:
                surrogate = surrogate + (out[k] * grads[k] / num_chunks).sum()
            # The loss's own parameters: the same 1/k share per chunk, for the same reason.
            for p, g in param_grads:
                surrogate = surrogate + (p * g / num_chunks).sum()
            backward(surrogate)
    rng_after.restore()
    return {k: v.detach() for k, v in terms.items()}
