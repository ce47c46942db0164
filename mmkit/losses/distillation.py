"""Distillation losses: a student dual encoder learns from a frozen teacher's embeddings.

Every term follows the model→loss contract: the student's output dict plus the teacher's, with
keys prefixed ``teacher_`` (``teacher_image_features``, ``teacher_text_features``,
``teacher_logit_scale``), as keyword arguments; each returns named ``*_loss`` terms.

All terms are exact across ranks, normalised the way ``ClipLoss(local_loss=True)`` is: each rank
computes the rows of its own samples against the gathered global batch and divides by the
global batch size over the world size, so the mean over ranks (DDP's averaging) is the global
mean, and student features are gathered with ``all_gather_with_grad`` (whose backward sums the
gradient over ranks). Teacher features carry no gradient; they are gathered all the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkit import distributed as D
from mmkit.config_checks import Range, check_settings
from mmkit.losses.contrastive import ClipLoss
from mmkit.losses.protocol import PairedLoss, as_loss, call_loss, scale_terms, uses_logit_scale


def _gather(x: Tensor) -> tuple[Tensor, int, float]:
    """Global rows, this rank's offset, and the per-rank normaliser (global batch / world)."""
    rows, offset = D.all_gather_with_grad(x)
    return rows, offset, D.mean_divisor(rows.shape[0])


def _upcast(x: Tensor) -> Tensor:
    # Softmax / distances in at least float32 (features may be bf16 under mixed precision).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_dims(student: Tensor, teacher: Tensor, term: str) -> None:
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"{term}: student features have {student.shape[-1]} dims, the teacher's {teacher.shape[-1]}; "
            "project the student first (DistillationLoss does this with its learned projection)"
        )


class SimilarityDistillLoss(PairedLoss):
    """KL(teacher ‖ student) between the image→text and text→image softmax distributions over the
    global batch, averaged over both directions and all rows, times ``temperature²`` (so the
    gradient scale does not shrink as the temperature grows, as in Hinton et al.).

    Each side's logits are its own ``logit_scale · image @ text.T``, divided by ``temperature``.
    Only similarities are compared, so student and teacher may have different widths.

    Args:
        temperature: softening of both distributions (1: the models' own temperatures).
        teacher_logit_scale: use this fixed inverse temperature for the teacher instead of its
            own (needed for pre-computed embeddings written without one).
    """

    setting_ranges = {
        "temperature": Range(gt=0),
        "teacher_logit_scale": Range(gt=0, none="the teacher's own"),
    }

    def __init__(self, temperature: float = 1.0, teacher_logit_scale: float | None = None) -> None:
        check_settings(self, locals(), SimilarityDistillLoss.setting_ranges)
        super().__init__()
        self.temperature = temperature
        self.teacher_logit_scale = teacher_logit_scale

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        teacher_image_features: Tensor,
        teacher_text_features: Tensor,
        teacher_logit_scale: Tensor | None = None,
        **_: object,
    ) -> dict[str, Tensor]:
        t_scale = teacher_logit_scale if self.teacher_logit_scale is None else self.teacher_logit_scale
        if t_scale is None:
            raise ValueError(
                "SimilarityDistillLoss needs the teacher's logit scale: the teacher embeddings carry none; "
                "write them with KDStudent(predict_with='teacher') or set teacher_logit_scale"
            )
        all_text, _, denom = _gather(text_features)
        all_image, _, _ = _gather(image_features)
        all_t_text, _, _ = _gather(teacher_text_features)
        all_t_image, _, _ = _gather(teacher_image_features)
        tau = self.temperature
        # This rank's rows of both directions, against the global batch.
        student_i2t = logit_scale * image_features @ all_text.T / tau
        student_t2i = logit_scale * text_features @ all_image.T / tau
        teacher_i2t = t_scale * teacher_image_features @ all_t_text.T / tau
        teacher_t2i = t_scale * teacher_text_features @ all_t_image.T / tau
        kl = self._kl_sum(student_i2t, teacher_i2t) + self._kl_sum(student_t2i, teacher_t2i)
        return {"similarity_kd_loss": kl * tau**2 / (2 * denom)}

    @staticmethod
    def _kl_sum(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        log_q = F.log_softmax(_upcast(student_logits), dim=-1)
        log_p = F.log_softmax(_upcast(teacher_logits), dim=-1).to(log_q.dtype)
        return F.kl_div(log_q, log_p, reduction="sum", log_target=True)


class FeatureDistillLoss(PairedLoss):
    """Per-sample distance between the student's and the teacher's normalised embeddings, for
    image and text, averaged over the global batch and both modalities.

    Args:
        kind: ``cosine`` (1 − cos) or ``mse`` (squared L2 distance, summed over dimensions; on
            unit vectors it is 2 − 2 cos, the same direction with twice the scale).
    """

    uses_logit_scale = False

    def __init__(self, kind: str = "cosine") -> None:
        super().__init__()
        if kind not in ("cosine", "mse"):
            raise ValueError(f"FeatureDistillLoss: kind must be 'cosine' or 'mse', got {kind!r}")
        self.kind = kind

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        teacher_image_features: Tensor,
        teacher_text_features: Tensor,
        **_: object,
    ) -> dict[str, Tensor]:
        _check_dims(image_features, teacher_image_features, "FeatureDistillLoss")
        denom = D.global_mean_divisor(image_features.shape[0], image_features.device)
        total = self._sum(image_features, teacher_image_features) + self._sum(text_features, teacher_text_features)
        return {"feature_kd_loss": total / (2 * denom)}

    def _sum(self, student: Tensor, teacher: Tensor) -> Tensor:
        student = F.normalize(_upcast(student), dim=-1)
        teacher = F.normalize(_upcast(teacher), dim=-1).to(student.dtype)
        if self.kind == "mse":
            return (student - teacher).pow(2).sum()
        return (1.0 - (student * teacher).sum(-1)).sum()


class InteractiveContrastiveLoss(PairedLoss):
    """InfoNCE across models: each student image against the teacher's texts of the global batch,
    and each student text against the teacher's images, with the student's logit scale. The
    student learns to be scored by the teacher's other tower.
    """

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        teacher_image_features: Tensor,
        teacher_text_features: Tensor,
        **_: object,
    ) -> dict[str, Tensor]:
        _check_dims(image_features, teacher_text_features, "InteractiveContrastiveLoss")
        all_t_text, offset, denom = _gather(teacher_text_features.to(text_features.dtype))
        all_t_image, _, _ = _gather(teacher_image_features.to(image_features.dtype))
        labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
        i2t = F.cross_entropy(logit_scale * image_features @ all_t_text.T, labels, reduction="sum")
        t2i = F.cross_entropy(logit_scale * text_features @ all_t_image.T, labels, reduction="sum")
        return {"interactive_kd_loss": (i2t + t2i) / (2 * denom)}


class DistillationLoss(PairedLoss):
    """The weighted sum of the student's own contrastive loss and the distillation terms; a
    weight of 0 disables (and skips) a term. Each weighted term is returned under its own name.

    When the student's embedding width differs from the teacher's, a learned linear projection
    (student → teacher width, no bias; a parameter of this loss, optimised with the student) maps
    the student's features into the teacher's space for the feature and interactive terms. The
    projection exists once ``setup_dims`` has been called (``KDStudent.configure_model`` does).

    Args:
        contrastive: weight of the student's own loss (``student_loss``).
        similarity: weight of ``SimilarityDistillLoss``.
        feature: weight of ``FeatureDistillLoss``.
        interactive: weight of ``InteractiveContrastiveLoss``.
        temperature: softening temperature of the similarity distillation.
        feature_kind: ``cosine`` or ``mse`` for the feature distillation.
        teacher_logit_scale: fixed teacher inverse temperature for the similarity term (default:
            the teacher's own).
        student_loss: the student's own loss (default ``ClipLoss()``; e.g. ``SigLipLoss``), or a
            list of losses (summed, as a technique's ``loss:``); it gets the training context
            (``step``, ``image_ids``) like any loss.

    The base module's ``setup`` hook reaches the student loss (e.g. a memory queue); the
    projection needs the teacher's width too and is made by ``setup_dims``.
    """

    setting_ranges = {
        "contrastive": Range(ge=0),
        "similarity": Range(ge=0),
        "feature": Range(ge=0),
        "interactive": Range(ge=0),
        "temperature": Range(gt=0),
        "teacher_logit_scale": Range(gt=0, none="the teacher's own"),
    }

    def __init__(
        self,
        contrastive: float = 1.0,
        similarity: float = 1.0,
        feature: float = 0.0,
        interactive: float = 0.0,
        temperature: float = 1.0,
        feature_kind: str = "cosine",
        teacher_logit_scale: float | None = None,
        student_loss: nn.Module | list[nn.Module] | None = None,
    ) -> None:
        check_settings(self, locals(), DistillationLoss.setting_ranges)
        super().__init__()
        self.weights = {"contrastive": contrastive, "similarity": similarity, "feature": feature, "interactive": interactive}
        if not any(self.weights.values()):
            raise ValueError(f"DistillationLoss: weights must be >= 0 and not all 0, got {self.weights}")
        self.student_loss = as_loss(student_loss, default=ClipLoss)
        self.similarity = SimilarityDistillLoss(temperature, teacher_logit_scale)
        self.feature = FeatureDistillLoss(feature_kind)
        self.interactive = InteractiveContrastiveLoss()
        self.projection: nn.Linear | None = None

    @property
    def uses_logit_scale(self) -> bool:  # type: ignore[override]
        # The similarity and interactive terms read the student's temperature.
        w = self.weights
        return bool(w["similarity"] or w["interactive"] or (w["contrastive"] and uses_logit_scale(self.student_loss)))

    @property
    def uses_logit_bias(self) -> bool:  # type: ignore[override]
        return bool(self.weights["contrastive"]) and self.student_loss.uses_logit_bias

    @property
    def needs_teacher_space(self) -> bool:
        return bool(self.weights["feature"] or self.weights["interactive"])

    def setup_dims(self, student_dim: int, teacher_dim: int) -> None:
        """Create the student → teacher projection if the widths differ (idempotent)."""
        if student_dim == teacher_dim or not self.needs_teacher_space:
            return
        if self.projection is None or tuple(self.projection.weight.shape) != (teacher_dim, student_dim):
            # Seeded off the global stream: the same on every rank, and a run with the projection
            # draws the same student initialisation and data augmentation as one without.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.projection = nn.Linear(student_dim, teacher_dim, bias=False)

    def student_terms(self, **outputs) -> dict[str, Tensor]:
        """The student's own loss alone (weighted), e.g. for evaluation without a teacher."""
        return scale_terms(call_loss(self.student_loss, outputs), self.weights["contrastive"])

    def forward(self, **outputs) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if self.weights["contrastive"]:
            terms.update(self.student_terms(**outputs))
        if self.weights["similarity"]:
            terms["similarity_kd_loss"] = self.weights["similarity"] * self.similarity(**outputs)["similarity_kd_loss"]
        if self.needs_teacher_space:
            projected = {**outputs, **self._to_teacher_space(outputs)}
            if self.weights["feature"]:
                terms["feature_kd_loss"] = self.weights["feature"] * self.feature(**projected)["feature_kd_loss"]
            if self.weights["interactive"]:
                value = self.interactive(**projected)["interactive_kd_loss"]
                terms["interactive_kd_loss"] = self.weights["interactive"] * value
        return terms

    def _to_teacher_space(self, outputs: dict) -> dict[str, Tensor]:
        image, text = outputs["image_features"], outputs["text_features"]
        if image.shape[-1] == outputs["teacher_image_features"].shape[-1]:
            return {}
        if self.projection is None:
            raise ValueError(
                f"DistillationLoss: student width {image.shape[-1]} != teacher width "
                f"{outputs['teacher_image_features'].shape[-1]} and no projection: call setup_dims first"
            )
        # One projection for both modalities keeps the student's two towers in one space.
        proj = self.projection
        return {
            "image_features": F.normalize(proj(image.to(proj.weight.dtype)), dim=-1),
            "text_features": F.normalize(proj(text.to(proj.weight.dtype)), dim=-1),
        }
