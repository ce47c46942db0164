"""CLIPPretrain: contrastive image–text pretraining (symmetric InfoNCE or SigLIP)."""

from __future__ import annotations

from torch import Tensor, nn

from mmkit.losses.contrastive import ClipLoss
from mmkit.models.spec import ModelSpec
from mmkit.techniques.base import DualEncoderModule


class CLIPPretrain(DualEncoderModule):
    """Contrastive pretraining of a dual encoder.

    Args:
        model: the model spec (e.g. ``mmkit.models.OpenCLIP``).
        loss: ``mmkit.losses.ClipLoss`` (InfoNCE, default) or ``mmkit.losses.SigLipLoss`` (use a
            model spec with ``init_logit_bias: -10``); exact across ranks.
        **kwargs: optimisation and evaluation settings of ``DualEncoderModule``.
    """

    def __init__(self, model: ModelSpec, loss: nn.Module | None = None, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.loss = loss if loss is not None else ClipLoss()

    def compute_loss(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        return self.loss(**outputs)
