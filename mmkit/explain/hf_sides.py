"""The inside of Hugging Face transformer towers: a ViT-style vision model (``ViTModel`` and
models with the same ``embeddings.patch_embeddings``) and a BERT-style text encoder (``BertModel``,
MiniLM: ``embeddings.word_embeddings``), as ``mmkit.models.HFTowers`` builds them or as open_clip's
``HFTextEncoder`` wraps one.

Attention probabilities: while ``recording`` is active the model runs the eager attention
implementation (the fused SDPA / flash kernels never materialise the probabilities) and a
forward hook on each attention module (the class the model itself records for
``output_attentions=True``, ``_can_record_outputs["attentions"]``) keeps the weights it
returns, still in the autograd graph. The original implementation is restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from mmkit.explain.errors import UnsupportedTowerError


def _recorded_attention(cls: type) -> tuple[type, int] | None:
    target = (getattr(cls, "_can_record_outputs", None) or {}).get("attentions")
    if isinstance(target, list | tuple):
        target = target[0] if len(target) == 1 else None
    if isinstance(target, type):
        return target, 1
    if target is not None and isinstance(getattr(target, "target_class", None), type):
        return target.target_class, int(target.index)
    return None


def _attention_class(model: nn.Module, where: str) -> tuple[type, int]:
    """The attention module class whose output ``index`` holds the probabilities."""
    found = _recorded_attention(type(model))
    if found is not None:
        return found
    import transformers

    raise UnsupportedTowerError(f"{where}: {type(model).__name__} does not say which module returns its attention "
                                "probabilities (transformers' _can_record_outputs['attentions'], in models of "
                                f"transformers >= 4.54; installed: {transformers.__version__})")


@contextlib.contextmanager
def _eager(model: nn.Module, where: str) -> Iterator[None]:
    config = model.config
    original = config._attn_implementation
    if original != "eager":
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            config._attn_implementation = "eager"
        if config._attn_implementation != "eager":
            raise UnsupportedTowerError(f"{where}: {type(model).__name__} cannot switch to eager attention "
                                        f"(it runs {config._attn_implementation!r}), so its attention probabilities are not available")
    try:
        yield
    finally:
        if original != "eager":
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(original)
            else:
                config._attn_implementation = original


class _HFSide:
    def __init__(self, model: nn.Module, where: str) -> None:
        self.model, self.where = model, where
        self.attention_class, self.index = _attention_class(model, where)

    @contextlib.contextmanager
    def recording(self, store: list[Tensor]) -> Iterator[None]:
        def keep(_module, _inputs, output):
            weights = output[self.index]
            if weights is None:
                raise UnsupportedTowerError(f"{self.where}: the attention module returned no probabilities")
            store.append(weights)

        modules = [m for m in self.model.modules() if isinstance(m, self.attention_class)]
        with _eager(self.model, self.where):
            handles = [m.register_forward_hook(keep) for m in modules]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()


class HFImageSide(_HFSide):
    """A ViT-style vision model (``ViTModel``, CLIP's vision tower): prefix tokens (the class token)
    then the patch tokens; the pooled feature is the class token's (``pooler_output`` or
    ``last_hidden_state[:, 0]``)."""

    def __init__(self, model: nn.Module) -> None:
        embeddings = getattr(model, "embeddings", None)
        patches = getattr(embeddings, "patch_embeddings", None)  # ViT: output [B, patches, D]
        conv = getattr(embeddings, "patch_embedding", None)  # CLIP vision: a Conv2d, output [B, D, gh, gw]
        if patches is not None and hasattr(patches, "patch_size"):
            self.embedding_module, size, self.channels_first = patches, patches.patch_size, False
        elif isinstance(conv, nn.Conv2d):
            self.embedding_module, size, self.channels_first = conv, conv.kernel_size, True
        else:
            raise UnsupportedTowerError(
                f"image tower {type(model).__name__}: explanations need a ViT-style Hugging Face model "
                "(embeddings.patch_embeddings or a CLIP vision patch_embedding); convolutional backbones are not supported")
        if getattr(embeddings, "cls_token", None) is None and getattr(embeddings, "class_embedding", None) is None:
            # Swin-style towers: windowed attention and a mean-pooled output, no class token row to read
            raise UnsupportedTowerError(f"image tower {type(model).__name__}: explanations need a class token "
                                        "(embeddings.cls_token or class_embedding) that the tower pools")
        super().__init__(model, "image tower")
        self._patch_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def patch_size(self) -> tuple[int, int]:
        return self._patch_size

    def per_patch(self, contribution: Tensor, grid: tuple[int, int]) -> Tensor:
        if self.channels_first:
            return contribution.sum(dim=1)
        return contribution.sum(dim=-1).reshape(-1, *grid)

    def patch_row(self, relevance: Tensor, patches: int) -> Tensor:
        return relevance[:, 0, -patches:]  # the class token's row over the patch columns (after any prefix tokens)


class HFTextSide(_HFSide):
    """A BERT-style text encoder pooling the first token (``cls``) or the mean over the tokens the
    attention mask keeps (``mean``, sentence encoders such as MiniLM). Ids are padded where the
    mask is 0 (dict texts) or where they equal ``pad_id`` (open_clip's HF tokenizer)."""

    def __init__(self, model: nn.Module, pooling: str, pad_id: int | None = None) -> None:
        words = getattr(getattr(model, "embeddings", None), "word_embeddings", None)
        if words is None:
            raise UnsupportedTowerError(f"text tower {type(model).__name__}: explanations need a BERT-style "
                                        "Hugging Face encoder (embeddings.word_embeddings)")
        if pooling not in ("cls", "mean"):
            raise UnsupportedTowerError(f"text tower: pooling {pooling!r} is not supported (cls or mean)")
        super().__init__(model, "text tower")
        self.embedding_module, self.pool, self.pad_id = words, pooling, pad_id

    def valid_tokens(self, texts) -> Tensor:
        if isinstance(texts, dict):
            return texts["attention_mask"].bool()
        return texts != self.pad_id

    def token_row(self, relevance: Tensor, texts) -> Tensor:
        if self.pool == "cls":
            return relevance[:, 0]
        mask = self.valid_tokens(texts).to(relevance.dtype)  # mean pooling: the mean of the kept tokens' rows
        return (relevance * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1)


def open_clip_hf_text_side(encoder: nn.Module) -> HFTextSide:
    """The side of an open_clip ``HFTextEncoder`` (``text_hf_model``)."""
    from open_clip.hf_model import ClsLastHiddenStatePooler, ClsPooler, MeanPooler

    pooler = encoder.pooler
    if isinstance(pooler, MeanPooler):
        pooling = "mean"
    elif isinstance(pooler, ClsPooler | ClsLastHiddenStatePooler) and pooler.cls_token_position == 0:
        pooling = "cls"
    else:
        raise UnsupportedTowerError(f"text tower: open_clip pooler {type(pooler).__name__} is not supported "
                                    "(mean or first-token pooling only)")
    return HFTextSide(encoder.transformer, pooling, pad_id=encoder.config.pad_token_id)
