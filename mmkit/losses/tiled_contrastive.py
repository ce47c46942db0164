"""Exact symmetric InfoNCE without the B×B similarity matrix.

The plain CLIP loss materialises ``logit_scale * image @ text.T`` and its softmaxes: several
B×B buffers, which at a global batch of 32k is tens of GiB. Here the matrix is visited in
tile×tile blocks: the forward keeps only a running log-sum-exp per row (and per column), the
backward recomputes each block from the saved features and LSEs and turns it straight into
feature gradients. Extra memory is O(B·tile + B·d); the result equals the plain loss up to
floating-point summation order. The idea is the online softmax of FlashAttention, applied to
the two cross-entropies of CLIP (as in Inf-CL, Cheng et al. 2024).

Notation used below: ``q`` rows (pre-multiplied by the scale), ``k`` columns, a block of logits
``L = q_I @ k_J.T`` and its softmax weights ``P = exp(L - lse)``. The gradient of
``sum_i lse_i - L[i, pos_i]`` is ``P - onehot(pos)``, so

    d/dq_rows = P @ k - k[pos],   d/dk = P.T @ q - scatter(q),   d/ds = <rows, P @ k - k[pos]>

(for unscaled rows); nothing larger than a block and a few B×d accumulators is ever alive.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def tiled_clip_loss(
    row_image: Tensor,
    row_text: Tensor,
    all_image: Tensor,
    all_text: Tensor,
    logit_scale: Tensor,
    row_offset: int = 0,
    tile_size: int = 2048,
) -> Tensor:
    """Sum over the given rows of the image→text plus text→image cross-entropy.

    Args:
        row_image: [b, d] image features of the rows this process scores.
        row_text: [b, d] text features of the same rows.
        all_image: [B, d] image features of the global batch (the text→image columns).
        all_text: [B, d] text features of the global batch (the image→text columns).
        logit_scale: scalar temperature, already exponentiated.
        row_offset: index of ``row_*[0]`` inside the global batch; the positive of row i is
            column ``row_offset + i``.
        tile_size: rows and columns per block; memory grows with B·tile_size.

    Returns:
        A scalar: ``sum_i CE(s·row_image[i]·all_text.T, row_offset+i)
        + sum_i CE(s·row_text[i]·all_image.T, row_offset+i)``, in float32 (float64 for
        float64 inputs), like ``F.cross_entropy`` under autocast.

    Label smoothing is not supported (``ClipLoss`` refuses it together with ``tile_size``).
    """
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    n_rows, n_all = row_image.shape[0], all_image.shape[0]
    if row_text.shape[0] != n_rows or all_text.shape[0] != n_all:
        raise ValueError("image and text features need the same number of rows")
    if not 0 <= row_offset <= n_all - n_rows:
        raise ValueError(f"rows [{row_offset}, {row_offset + n_rows}) are not inside the batch of {n_all}")
    device_type = all_image.device.type
    # Honour autocast as the plain loss's matmul would; the Function itself runs with autocast
    # off and explicit casts, so that forward and the recomputing backward agree exactly.
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(all_image.dtype, all_text.dtype)
    # Full mode (the rows are the whole batch): one block serves both directions, image→text
    # through its rows and text→image through its columns, halving the matmuls.
    symmetric = row_image is all_image and row_text is all_text and row_offset == 0
    return _TiledClipLoss.apply(
        row_image, row_text, all_image, all_text, logit_scale, row_offset, tile_size, dtype, symmetric
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax statistics and gradient accumulators in at least float32, whatever the matmul dtype.
    return torch.promote_types(dtype, torch.float32)


def _addmm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    # Fused multiply-accumulate when dtypes agree; a low-precision product is upcast first.
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


def _online_update(logits: Tensor, dim: int, run_max: Tensor, run_sum: Tensor, inplace: bool) -> None:
    """Fold one block into a running (max, sum of exp(logit - max)) along ``dim``: the online
    softmax rescales the sum whenever the max grows. ``inplace`` lets the block be the exp buffer."""
    new_max = torch.maximum(run_max, logits.amax(dim))
    run_sum.mul_((run_max - new_max).exp_())  # 0 on the first block: exp(-inf)
    shift = new_max.unsqueeze(dim)
    shifted = logits.sub_(shift) if inplace else logits - shift
    run_sum.add_(shifted.exp_().sum(dim))
    run_max.copy_(new_max)


def _take_diagonal(logits: Tensor, offset: int, out: Tensor, row0: int) -> None:
    # Row r of the block has its positive at block column r + offset (if inside the block).
    diag = logits.diagonal(offset)
    first = row0 + max(0, -offset)
    out[first : first + diag.numel()] = diag


def _forward_stats(q: Tensor, k: Tensor, tile: int, offset: int, with_cols: bool):
    """Softmax statistics of ``L = q @ k.T`` visited block by block.

    Returns the row max, the row log-sum-exp minus that max, the positive logit of each row
    (column ``offset + row``) and, if ``with_cols``, the column max and log-sum-exp minus max.
    The LSE is kept as (max, log-sum) because ``max`` is an exact logit: ``L - max`` and hence
    the probability of a confident positive lose nothing to rounding a large LSE, which would
    cost ~1e-4 relative accuracy in float32 gradients once the loss is small."""
    acc = _acc_dtype(q.dtype)
    full = lambda n, fill: torch.full((n,), fill, dtype=acc, device=q.device)  # noqa: E731
    row_max, row_sum, pos = full(q.shape[0], float("-inf")), full(q.shape[0], 0.0), full(q.shape[0], 0.0)
    col_max, col_sum = full(k.shape[0], float("-inf")), full(k.shape[0], 0.0)
    for i0 in range(0, q.shape[0], tile):
        q_i = q[i0 : i0 + tile]
        for j0 in range(0, k.shape[0], tile):
            logits = (q_i @ k[j0 : j0 + tile].T).to(acc)
            _take_diagonal(logits, offset + i0 - j0, pos, i0)
            rows, cols = slice(i0, i0 + tile), slice(j0, j0 + tile)
            _online_update(logits, 1, row_max[rows], row_sum[rows], inplace=not with_cols)
            if with_cols:
                _online_update(logits, 0, col_max[cols], col_sum[cols], inplace=True)
    cols = (col_max, col_sum.log_()) if with_cols else None
    return row_max, row_sum.log_(), pos, cols


def _grad_sym(q: Tensor, k: Tensor, row: tuple[Tensor, Tensor], col: tuple[Tensor, Tensor], tile: int):
    """``(G - 2I) @ k`` and ``(G - 2I).T @ q`` for ``G = softmax_rows(L) + softmax_cols(L)``,
    ``L = q @ k.T``: the gradient of both cross-entropies with respect to the logits."""
    acc = _acc_dtype(q.dtype)
    (row_max, row_log), (col_max, col_log) = row, col
    # exp(L - max - log_sum) = exp(L - max) / sum: a multiply instead of a second subtraction.
    row_inv, col_inv = (-row_log).exp()[:, None], (-col_log).exp()[None, :]
    row_max, col_max = row_max[:, None], col_max[None, :]
    g_k = torch.zeros(q.shape, dtype=acc, device=q.device)  # G @ k, per row
    g_q = torch.zeros(k.shape, dtype=acc, device=q.device)  # G.T @ q, per column
    for i0 in range(0, q.shape[0], tile):
        q_i, rows = q[i0 : i0 + tile], slice(i0, i0 + tile)
        for j0 in range(0, k.shape[0], tile):
            k_j, cols = k[j0 : j0 + tile], slice(j0, j0 + tile)
            logits = (q_i @ k_j.T).to(acc)
            # Both softmaxes of one block: the row one into a new buffer, the column one over
            # the logits themselves, summed by a fused multiply-add.
            weights = torch.sub(logits, row_max[rows]).exp_().mul_(row_inv[rows])
            weights.addcmul_(logits.sub_(col_max[:, cols]).exp_(), col_inv[:, cols])
            # The positives' -2 before rounding to the matmul dtype: a confident positive's
            # weight is ~2 - tiny, and bf16 keeps 3 digits, so subtracting after rounding (or
            # after the product) would lose the whole difference.
            weights.diagonal(i0 - j0).sub_(2.0)
            weights = weights.to(q.dtype)
            _addmm_(g_k[rows], weights, k_j)
            _addmm_(g_q[cols], weights.T, q_i)
    return g_k, g_q


def _grad_rows(q: Tensor, k: Tensor, row_max: Tensor, row_log: Tensor, tile: int, offset: int):
    """``(P - E) @ k`` and ``(P - E).T @ q`` for ``P = softmax_rows(q @ k.T)`` and ``E`` the
    positives (row r, column ``offset + r``): the gradient of the cross-entropy w.r.t. the logits."""
    acc = _acc_dtype(q.dtype)
    row_inv = (-row_log).exp()[:, None]
    p_k = torch.zeros(q.shape, dtype=acc, device=q.device)
    p_q = torch.zeros(k.shape, dtype=acc, device=q.device)
    for i0 in range(0, q.shape[0], tile):
        q_i, rows = q[i0 : i0 + tile], slice(i0, i0 + tile)
        for j0 in range(0, k.shape[0], tile):
            k_j = k[j0 : j0 + tile]
            weights = (q_i @ k_j.T).to(acc).sub_(row_max[rows, None]).exp_().mul_(row_inv[rows])
            # The positives' -1 before rounding to the matmul dtype (see _grad_sym).
            weights.diagonal(offset + i0 - j0).sub_(1.0)
            weights = weights.to(q.dtype)
            _addmm_(p_k[rows], weights, k_j)
            _addmm_(p_q[j0 : j0 + tile], weights.T, q_i)
    return p_k, p_q


def _scaled(features: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    # Scale in (at least) float32, then round once to the matmul dtype: rounding the scale
    # itself to bfloat16 would shift every logit by up to 0.4%.
    return (features.to(scale.dtype) * scale).to(dtype)


class _TiledClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, row_image, row_text, all_image, all_text, logit_scale, offset, tile, dtype, symmetric):  # type: ignore[override]
        with torch.autocast(all_image.device.type, enabled=False):
            s = logit_scale.to(_acc_dtype(dtype)).reshape(())
            if symmetric:
                q, y = _scaled(all_image, s, dtype), all_text.to(dtype)
                row_max, row_log, pos, (col_max, col_log) = _forward_stats(q, y, tile, 0, with_cols=True)
                stats = (row_max, row_log, col_max, col_log)
                # Per-row CE = log_sum - (positive - max), as F.cross_entropy rounds it; the
                # diagonal is the positive of row i and of column i alike.
                loss = (row_log - (pos - row_max)).sum() + (col_log - (pos - col_max)).sum()
            else:
                ai, at = all_image.to(dtype), all_text.to(dtype)
                it_max, it_log, it_pos, _ = _forward_stats(_scaled(row_image, s, dtype), at, tile, offset, False)
                ti_max, ti_log, ti_pos, _ = _forward_stats(_scaled(row_text, s, dtype), ai, tile, offset, False)
                stats = (it_max, it_log, ti_max, ti_log)
                loss = (it_log - (it_pos - it_max)).sum() + (ti_log - (ti_pos - ti_max)).sum()
        # Only the inputs and four vectors of B (or b) statistics survive until backward.
        ctx.save_for_backward(row_image, row_text, all_image, all_text, logit_scale, *stats)
        ctx.offset, ctx.tile, ctx.dtype, ctx.symmetric = offset, tile, dtype, symmetric
        return loss

    @staticmethod
    @once_differentiable  # the backward recomputes blocks outside autograd
    def backward(ctx, grad_out):  # type: ignore[override]
        row_image, row_text, all_image, all_text, logit_scale, *stats = ctx.saved_tensors
        dtype, tile, off = ctx.dtype, ctx.tile, ctx.offset
        acc = _acc_dtype(dtype)
        g = grad_out.to(acc)
        with torch.autocast(all_image.device.type, enabled=False):
            s_acc = logit_scale.to(acc).reshape(())
            if ctx.symmetric:
                x, y = all_image.to(dtype), all_text.to(dtype)
                g_y, g_x = _grad_sym(_scaled(all_image, s_acc, dtype), y, stats[:2], stats[2:], tile)
                x = x.to(acc)
                # d/dx = s·(G - 2I) @ y; d/dy = (G - 2I).T @ s·x; d/ds = <x, (G - 2I) @ y>. The
                # positives are subtracted inside the blocks, before any rounding.
                grad_s = (x * g_y).sum()
                grad_x = g_y.mul_(s_acc * g)
                grad_y = g_x.mul_(g)
                grads = (None, None, grad_x, grad_y, grad_s * g)
            else:
                ri, rt = row_image.to(dtype), row_text.to(dtype)
                ai, at = all_image.to(dtype), all_text.to(dtype)
                p_at, p_ri = _grad_rows(_scaled(row_image, s_acc, dtype), at, stats[0], stats[1], tile, off)  # image→text
                p_ai, p_rt = _grad_rows(_scaled(row_text, s_acc, dtype), ai, stats[2], stats[3], tile, off)  # text→image
                ri, rt = ri.to(acc), rt.to(acc)
                grad_s = (ri * p_at).sum() + (rt * p_ai).sum()
                grads = (s_acc * g * p_at, s_acc * g * p_ai, p_rt.mul_(g), p_ri.mul_(g), grad_s * g)
        inputs = (row_image, row_text, all_image, all_text, logit_scale)
        out = []
        for grad, inp, needed in zip(grads, inputs, ctx.needs_input_grad):
            out.append(grad.to(inp.dtype).reshape(inp.shape) if grad is not None and needed else None)
        return (*out, None, None, None, None)
