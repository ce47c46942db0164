"""Access to the inside of a model's two towers that the explanation methods need: each
block's attention probabilities (kept in the autograd graph), the patch and token embeddings,
the patch grid, and which rows of the propagated relevance the pooled features read.

``towers_for(model)`` opens an open_clip model (``VisionTransformer`` image tower; open_clip
text transformer or a Hugging Face text encoder, ``text_hf_model``: ``open_clip_sides``,
``hf_sides``) or an ``HFTowers`` model (ViT-style vision model, BERT-style text encoder).
Anything else is refused with ``UnsupportedTowerError`` naming the tower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor

from mmkit.explain.errors import UnsupportedTowerError
from mmkit.explain.texts import Texts
from mmkit.models.dual_encoder import DualEncoder

__all__ = ["Towers", "UnsupportedTowerError", "towers_for"]


class Towers:
    """An image side and a text side (see ``open_clip_sides`` / ``hf_sides``) behind one interface."""

    def __init__(self, image, text) -> None:
        self.image, self.text = image, text

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.image.patch_size

    def grid(self, images: Tensor) -> tuple[int, int]:
        ph, pw = self.patch_size
        return images.shape[-2] // ph, images.shape[-1] // pw

    def valid_tokens(self, texts: Texts) -> Tensor:
        """[B, L] bool: the tokens the pooled text feature can depend on (padding excluded)."""
        return self.text.valid_tokens(texts)

    def patch_relevance(self, relevance: Tensor, images: Tensor) -> Tensor:
        """[B, gh, gw]: the pooled image feature's row of the propagated relevance [B, L, L]."""
        gh, gw = self.grid(images)
        return self.image.patch_row(relevance, gh * gw).reshape(-1, gh, gw)

    def token_relevance(self, relevance: Tensor, texts: Texts) -> Tensor:
        """[B, L]: the pooled text feature's row of the propagated relevance [B, L, L]."""
        return self.text.token_row(relevance, texts)

    def per_patch(self, contribution: Tensor, images: Tensor) -> Tensor:
        """[B, gh, gw] from an elementwise product with the patch embeddings."""
        return self.image.per_patch(contribution, self.grid(images))

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, list[Tensor]]]:
        """Within the block, every forward appends each block's attention probabilities
        [B, heads, L, L] to ``maps["image"]`` / ``maps["text"]`` (in layer order)."""
        maps: dict[str, list[Tensor]] = {"image": [], "text": []}
        with self.image.recording(maps["image"]), self.text.recording(maps["text"]):
            yield maps

    @contextlib.contextmanager
    def embeddings(self) -> Iterator[dict[str, Tensor]]:
        """Within the block, a forward stores the patch embeddings (``"image"``: open_clip's
        patchifying convolution output [B, D, gh, gw], a ViT's ``patch_embeddings`` output
        [B, patches, D]) and the token embeddings (``"text"``, [B, L, D]). They always require
        grad, so gradients reach them (and every later activation) even when the towers'
        weights are frozen."""
        found: dict[str, Tensor] = {}

        def keep(name: str):
            def hook(_module, _inputs, output):
                if not output.requires_grad:
                    output = output.detach().requires_grad_()
                found[name] = output
                return output
            return hook

        handles = [self.image.embedding_module.register_forward_hook(keep("image")),
                   self.text.embedding_module.register_forward_hook(keep("text"))]
        try:
            yield found
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def scaled_token_embeddings(self, keep: Tensor) -> Iterator[None]:
        """Within the block, token embeddings are multiplied by ``keep`` ([B, L]): 0 occludes a token."""
        handle = self.text.embedding_module.register_forward_hook(
            lambda _m, _i, out: out * keep[..., None].to(out.dtype))
        try:
            yield
        finally:
            handle.remove()


def towers_for(model: DualEncoder) -> Towers:
    """The towers of an ``OpenCLIPDualEncoder`` or ``HFDualEncoder``, checked once."""
    from mmkit.explain.hf_sides import HFImageSide, HFTextSide, open_clip_hf_text_side
    from mmkit.explain.open_clip_sides import OpenCLIPImageSide, OpenCLIPTextSide
    from mmkit.models.hf_model import HFDualEncoder

    if isinstance(model, HFDualEncoder):
        return Towers(HFImageSide(model.vision), HFTextSide(model.text, model.text_pooling))
    clip = getattr(model, "clip", None)
    if clip is None:
        raise UnsupportedTowerError(f"explanations support open_clip models (mmkit.models.OpenCLIP) and Hugging Face "
                                    f"towers (mmkit.models.HFTowers); got {type(model).__name__}")
    image = OpenCLIPImageSide(clip.visual)
    from open_clip.hf_model import HFTextEncoder

    if isinstance(getattr(clip, "text", None), HFTextEncoder):
        return Towers(image, open_clip_hf_text_side(clip.text))
    return Towers(image, OpenCLIPTextSide(clip))
