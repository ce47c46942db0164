"""The dual-encoder contract shared by every tower family.

``forward(images, texts)`` returns ``image_features``, ``text_features`` (L2-normalised),
``logit_scale`` (already exponentiated) and, for SigLIP-style models, ``logit_bias``; with the
MLP similarity head it also returns ``pair_logits``, which losses use instead of the scaled dot
product.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkit.models.attention_kernels import attention_kernels, image_tokens, text_tokens
from mmkit.models.freezing import is_fully_frozen, lock_tower
from mmkit.models.heads import MLPSimilarityHead

# CLIP clamps the learnable inverse temperature at 100 so the logits cannot blow up.
MAX_LOGIT_SCALE = 100.0


class DualEncoder(nn.Module):
    """Base class: subclasses provide ``image_tower``/``text_tower`` and the raw encoders."""

    image_tower: nn.Module
    text_tower: nn.Module

    def __init__(self, embed_dim: int, similarity: str = "cosine") -> None:
        super().__init__()
        self.embed_dim = embed_dim
        if similarity not in ("cosine", "mlp"):
            raise ValueError(f"similarity must be 'cosine' or 'mlp', got {similarity!r}")
        self.similarity_head = MLPSimilarityHead(embed_dim) if similarity == "mlp" else None

    # -- subclasses --------------------------------------------------------------------------
    def _encode_image(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _encode_text(self, texts) -> Tensor:
        raise NotImplementedError

    def log_scale_parameter(self) -> nn.Parameter:
        """The learnable log inverse temperature (clamped by the training step, logged)."""
        raise NotImplementedError

    def bias_parameter(self) -> Tensor | None:
        """SigLIP's learnable logit bias, or None when the model has none."""
        return None

    def export(self, out_dir: str | Path) -> Path:
        """Write weights in a format the tower family's own library loads (safetensors)."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        # Weights may be in bf16/fp16 without autocast (DeepSpeed's bf16, a low-precision teacher)
        # while pixels arrive in another float type (or the reverse): feed the weights' type.
        weight = next(self.parameters(), None)
        if weight is not None and images.is_floating_point() and images.dtype != weight.dtype:
            images = images.to(weight.dtype)
        with attention_kernels(image_tokens(self.image_tower, images), weight):
            f = self._encode_image(images)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, texts, normalize: bool = True) -> Tensor:
        with attention_kernels(text_tokens(texts), next(self.parameters(), None)):
            f = self._encode_text(texts)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, images: Tensor | None, texts=None) -> dict[str, Tensor]:
        """Both towers' normalised features; a tower whose input is None is skipped (e.g. the
        zero-shot classifier's prompts). Calling the model itself, rather than ``encode_*``, is
        what lets FSDP2 gather the root's weights."""
        out: dict = {"logit_scale": self.log_scale_parameter().exp()}
        if images is not None:
            out["image_features"] = self.encode_image(images)
        if texts is not None:
            out["text_features"] = self.encode_text(texts)
        bias = self.bias_parameter()
        if bias is not None:
            out["logit_bias"] = bias
        if self.similarity_head is not None:
            out["pair_logits"] = self.similarity_head
        return out

    def compile_towers(self, **options) -> None:
        """Compile both encoders with ``torch.compile(**options)``, in place and idempotent.

        The encode methods are compiled, not the modules wrapped: the module tree, and so the
        state-dict keys of checkpoints and exports, stay those of the eager model (no
        ``_orig_mod.``). Compilation happens at the first call, after any sharding of the towers.
        """
        if getattr(self, "_compiled_towers", None) is not None:
            return
        self._compiled_towers = options
        # Instance attributes shadow the class's methods; the subclasses' encoders stay untouched.
        self._encode_image = torch.compile(self._encode_image, **options)
        self._encode_text = torch.compile(self._encode_text, **options)

    def __getstate__(self):
        # A copy (deepcopy, pickle) must not keep the compiled encoders: they are bound to this
        # model's weights. The copy runs eagerly; compile it again if wanted.
        state = dict(self.__dict__)
        for key in ("_encode_image", "_encode_text", "_compiled_towers"):
            state.pop(key, None)
        return state

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = MAX_LOGIT_SCALE) -> None:
        self.log_scale_parameter().clamp_(0, math.log(max_scale))

    def lock(self, lock_image: bool, image_unlocked_layers: int, lock_text: bool, text_unlocked_layers: int):
        if lock_image:
            lock_tower(self.image_tower, image_unlocked_layers)
        if lock_text:
            lock_tower(self.text_tower, text_unlocked_layers)

    def train(self, mode: bool = True):
        super().train(mode)
        # A fully locked tower stays in eval mode: no dropout noise, no BatchNorm drift.
        for tower in (self.image_tower, self.text_tower):
            if mode and is_fully_frozen(tower):
                tower.eval()
        return self
