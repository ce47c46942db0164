"""MetricAlign: image–text alignment by metric learning (hinge ranking losses in a learned
embedding space, with hard-negative mining and an optional cross-batch memory).

The losses live in ``mmkit.losses.ranking`` and get the training step (for VSE++'s warm-up) and
the image ids (so another caption of the same image is never a negative) through the loss
protocol, as in every technique. This module owns the regularisers that act on the embeddings:
an optional projection head with dropout and an optional L2 penalty on embedding norms. Weight
decay is the base optimiser's ``weight_decay``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkit import distributed as D
from mmkit.config_checks import Range, check_settings
from mmkit.losses.protocol import as_loss
from mmkit.losses.ranking import RankingLoss
from mmkit.models.projection_head import ProjectionHead
from mmkit.models.spec import ModelSpec
from mmkit.techniques.base import DualEncoderModule


class MetricAlign(DualEncoderModule):
    """Metric-learning alignment of a dual encoder.

    Args:
        model: the model spec (e.g. ``mmkit.models.OpenCLIP``; similarity ``cosine``).
        loss: a loss of the loss protocol (``docs/losses.md``), or a list of them whose
            ``*_loss`` terms are summed: ``mmkit.losses.RankingLoss`` (pairwise contrastive with
            margin / VSE++ max-violation with warm-up), ``TripletLoss``, even ``ClipLoss``. Give
            each its own ``weight`` (or use ``mmkit.losses.LossSum`` with ``weights``) and, when
            two share a class, a distinct ``name``. Default: ``RankingLoss()`` (sum of hinges over
            all in-batch negatives).
        projection_head: put a projection head per modality on the towers' embeddings. It is
            used in training, validation, test and prediction (dropout off outside training) and
            saved in the Lightning checkpoint; ``mmkit export`` writes the towers only.
        head_hidden_dim: hidden width of a two-layer head (None: one linear layer starting at
            the identity).
        head_dropout: dropout on the head's input, in training.
        normalize: L2-normalise the head's output. ``False`` gives the losses un-normalised
            embeddings (for ``distance: euclidean`` and ``embedding_l2``); it needs
            ``projection_head``, since the towers themselves return unit vectors. Retrieval
            metrics always rank by cosine similarity.
        embedding_l2: weight of a penalty on the mean squared L2 norm of the embeddings (logged
            as ``embedding_norm_loss``, with the mean norm as ``embedding_norm``); needs
            ``normalize: false``.
        **kwargs: optimisation and evaluation settings of ``DualEncoderModule`` (``lr``,
            ``weight_decay``, ``accumulate_chunks``, ``zero_shot_classes``, ...).
    """

    setting_ranges = {
        "head_hidden_dim": Range(ge=1, integer=True, none="one linear layer"),
        "head_dropout": Range(ge=0, lt=1),
        "embedding_l2": Range(ge=0),
    }

    def __init__(
        self,
        model: ModelSpec,
        loss: nn.Module | list[nn.Module] | None = None,
        projection_head: bool = False,
        head_hidden_dim: int | None = None,
        head_dropout: float = 0.1,
        normalize: bool = True,
        embedding_l2: float = 0.0,
        **kwargs,
    ) -> None:
        check_settings(self, locals(), MetricAlign.setting_ranges)
        super().__init__(model, **kwargs)
        if not normalize and not projection_head:
            raise ValueError("MetricAlign: normalize=False needs projection_head=True (the towers return unit vectors)")
        if embedding_l2 and normalize:
            raise ValueError("MetricAlign: embedding_l2 acts on un-normalised embeddings: set normalize=False")
        self.loss = as_loss(loss, default=RankingLoss)
        self.projection_head = projection_head
        self.head_hidden_dim = head_hidden_dim
        self.head_dropout = head_dropout
        self.normalize = normalize
        self.embedding_l2 = embedding_l2
        self.image_head: ProjectionHead | None = None
        self.text_head: ProjectionHead | None = None

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        dim = self.model.embed_dim
        if self.projection_head and self.image_head is None:
            ref = next(self.model.parameters())
            self.image_head = ProjectionHead(dim, self.head_hidden_dim, self.head_dropout).to(ref.device, ref.dtype)
            self.text_head = ProjectionHead(dim, self.head_hidden_dim, self.head_dropout).to(ref.device, ref.dtype)

    def project(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.image_head is None:
            return outputs
        out = dict(outputs)
        for key, head in (("image_features", self.image_head), ("text_features", self.text_head)):
            if key in out:
                f = head(out[key])
                out[key] = F.normalize(f, dim=-1) if self.normalize else f
        return out

    # -- training ----------------------------------------------------------------------------
    def compute_loss(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        terms = super().compute_loss(outputs, batch)
        if self.embedding_l2:
            terms.update(self._embedding_penalty(outputs["image_features"], outputs["text_features"]))
        return terms

    def _embedding_penalty(self, image: Tensor, text: Tensor) -> dict[str, Tensor]:
        sq = torch.cat([image, text]).pow(2).sum(-1)
        # Global row count and norm sum, so N ranks with batch b match one with batch N·b.
        counts = D.all_reduce_sum(torch.stack([torch.tensor(float(sq.shape[0]), device=sq.device), sq.detach().sqrt().sum()]).double())
        n_global = float(counts[0])
        penalty = self.embedding_l2 * sq.sum() / D.mean_divisor(n_global)
        return {"embedding_norm_loss": penalty, "embedding_norm": (counts[1] / max(n_global, 1.0)).float()}
