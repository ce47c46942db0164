"""The inside of open_clip towers: the ``VisionTransformer`` image tower and the text
transformer (the explanation methods reach them through ``mmkit.explain.towers.Towers``).

open_clip's ``ResidualAttentionBlock`` calls ``nn.MultiheadAttention`` with
``need_weights=False`` (the fused kernel), so the probabilities never exist as a tensor. While
``recording`` is active each block's ``attention`` is replaced by the same computation written
out (same weights, same mask), which keeps the softmax output as a tensor whose gradient
``torch.autograd.grad`` can take. timm trunks, attentional pooling and CoCa's class token are
refused with ``UnsupportedTowerError``.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkit.explain.errors import UnsupportedTowerError


def _blocks(transformer: nn.Module, where: str) -> list[nn.Module]:
    from open_clip.transformer import ResidualAttentionBlock

    blocks = list(getattr(transformer, "resblocks", []))
    if not blocks or not all(type(b) is ResidualAttentionBlock for b in blocks):
        kinds = sorted({type(b).__name__ for b in blocks}) or ["no resblocks"]
        raise UnsupportedTowerError(
            f"{where}: explanations need open_clip ResidualAttentionBlocks, found {', '.join(kinds)}")
    for b in blocks:
        mha = b.attn
        if mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedTowerError(f"{where}: attention with separate k/v projections or extra k/v tokens is not supported")
    return blocks


@contextlib.contextmanager
def _recording_blocks(blocks: list[nn.Module], store: list[Tensor]) -> Iterator[None]:
    for block in blocks:
        block.attention = types.MethodType(_attention_keeping_weights(store), block)
    try:
        yield
    finally:
        for block in blocks:
            del block.attention  # the class's own method again


class OpenCLIPImageSide:
    """An open_clip ``VisionTransformer``: class token first, then the patch tokens."""

    def __init__(self, visual: nn.Module) -> None:
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise UnsupportedTowerError(
                f"image tower {type(visual).__name__} is not an open_clip VisionTransformer (timm and ResNet "
                "trunks are not supported)")
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise UnsupportedTowerError("image tower: attentional pooling is not supported (pool 'tok' or 'avg' only)")
        self.visual = visual
        self.pool_type = visual.pool_type
        self.blocks = _blocks(visual.transformer, "image tower")
        self.embedding_module = visual.conv1  # output [B, D, gh, gw]

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.visual.conv1.kernel_size)  # type: ignore[return-value]

    def recording(self, store: list[Tensor]):
        return _recording_blocks(self.blocks, store)

    def per_patch(self, contribution: Tensor, grid: tuple[int, int]) -> Tensor:
        """[B, gh, gw]: an elementwise product with the patch embeddings, summed over channels."""
        return contribution.sum(dim=1)

    def patch_row(self, relevance: Tensor, patches: int) -> Tensor:
        """[B, patches]: the pooled feature's relevance over the patch tokens."""
        if self.pool_type == "tok":
            return relevance[:, 0, 1:]
        return relevance[:, 1:, 1:].mean(dim=1)  # 'avg': the pooled feature is the mean of the patch tokens


class OpenCLIPTextSide:
    """An open_clip text transformer (causal), pooling one token: end of text, first or last."""

    def __init__(self, clip: nn.Module) -> None:
        if hasattr(clip, "text"):  # CustomTextCLIP
            from open_clip.transformer import TextTransformer

            text = clip.text
            if not isinstance(text, TextTransformer):
                raise UnsupportedTowerError(f"text tower {type(text).__name__} is not an open_clip TextTransformer "
                                            "or Hugging Face text encoder")
            if text.cls_emb is not None:
                raise UnsupportedTowerError("text tower: an appended class token (CoCa) is not supported")
            self.embedding_module, self.pool = text.token_embedding, text.pool_type
            self.eos_id = getattr(text, "eos_id", None)
            self.blocks = _blocks(text.transformer, "text tower")
        else:  # plain CLIP keeps its text parts on the model itself
            self.embedding_module, self.pool = clip.token_embedding, clip.text_pool_type
            self.eos_id = getattr(clip, "text_eos_id", None)
            self.blocks = _blocks(clip.transformer, "text tower")
        if self.pool not in ("argmax", "eos", "last", "first"):
            raise UnsupportedTowerError(f"text tower: pooling {self.pool!r} is not supported")

    def recording(self, store: list[Tensor]):
        return _recording_blocks(self.blocks, store)

    def pooled_token(self, texts: Tensor) -> Tensor:
        """[B] index of the token whose output the text tower pools."""
        if self.pool == "argmax":
            return texts.argmax(dim=-1)
        if self.pool == "eos":
            return (texts == self.eos_id).int().argmax(dim=-1)
        fill = 0 if self.pool == "first" else texts.shape[1] - 1
        return torch.full((texts.shape[0],), fill, dtype=torch.long, device=texts.device)

    def token_row(self, relevance: Tensor, texts: Tensor) -> Tensor:
        return relevance[torch.arange(texts.shape[0], device=texts.device), self.pooled_token(texts)]

    def valid_tokens(self, texts: Tensor) -> Tensor:
        """Up to and including the pooled token when it is the end of text (a causal tower's
        pooled output cannot depend on the padding after it)."""
        positions = torch.arange(texts.shape[1], device=texts.device)
        if self.pool in ("argmax", "eos"):
            return positions[None, :] <= self.pooled_token(texts)[:, None]
        return torch.ones_like(texts, dtype=torch.bool)


def _attention_keeping_weights(store: list[Tensor]):
    """``ResidualAttentionBlock.attention`` written out: q/k/v projection, scaled dot product,
    additive mask, softmax (appended to ``store``), weighted sum, output projection."""

    def attention(block, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                  attn_mask: Tensor | None = None) -> Tensor:
        if k_x is not None or v_x is not None:
            raise UnsupportedTowerError("cross-attention blocks are not supported")
        mha: nn.MultiheadAttention = block.attn
        x = q_x if mha.batch_first else q_x.transpose(0, 1)
        batch, length, width = x.shape
        heads = mha.num_heads
        q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).split(width, dim=-1)
        q, k, v = (t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=logits.dtype).masked_fill(attn_mask, float("-inf"))
            mask = attn_mask.to(logits.dtype)
            logits = logits + (mask.reshape(batch, heads, length, length) if mask.dim() == 3 else mask)
        weights = logits.softmax(dim=-1)
        store.append(weights)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, width)
        out = mha.out_proj(out)
        return out if mha.batch_first else out.transpose(0, 1)

    return attention
