"""CLIPPretrain: contrastive image–text pretraining (symmetric InfoNCE or SigLIP)."""

from __future__ import annotations

from torch import nn

from mmkit.losses.contrastive import ClipLoss
from mmkit.losses.protocol import as_loss
from mmkit.models.spec import ModelSpec
from mmkit.techniques.base import DualEncoderModule


class CLIPPretrain(DualEncoderModule):
    """Contrastive pretraining of a dual encoder.

    Args:
        model: the model spec (e.g. ``mmkit.models.OpenCLIP``).
        loss: ``mmkit.losses.ClipLoss`` (InfoNCE, default) or ``mmkit.losses.SigLipLoss`` (use a
            model spec with ``init_logit_bias: -10``); exact across ranks. Any loss of the loss
            protocol (``docs/losses.md``), or a list of them (summed), works: e.g. a hinge
            ``RankingLoss``, with which the unused temperature is frozen.
        **kwargs: optimisation and evaluation settings of ``DualEncoderModule``.
    """

    def __init__(self, model: ModelSpec, loss: nn.Module | list[nn.Module] | None = None, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.loss = as_loss(loss, default=ClipLoss)
