"""Top-1 agreement of two models' rankings over an evaluation split (a distilled student and its
teacher).

For each caption of the split, the image it scores highest, and for each image the caption: the
student agrees with the teacher on a query when both pick the same item. Each model ranks in its
own embedding space (their widths may differ), so only the choices are compared. The rows are
gathered from every rank and deduplicated (by ``index``, and images by ``image_id``) before
ranking, as for Recall@K, so the value does not depend on the number of processes or the batch
size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkit.metrics.retrieval import RetrievalMetrics, _first_occurrence


def top1_choices(images: Tensor, texts: Tensor, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(image→text, text→image): for every image the row of its best-scoring text, and for every
    text the row of its best-scoring image (features L2-normalised), in query chunks."""
    i2t = torch.cat([(chunk @ texts.T).argmax(1) for chunk in images.split(chunk_size)]) if len(images) else images.new_empty(0, dtype=torch.long)
    t2i = torch.cat([(chunk @ images.T).argmax(1) for chunk in texts.split(chunk_size)]) if len(texts) else texts.new_empty(0, dtype=torch.long)
    return i2t, t2i


class TopOneAgreement(RetrievalMetrics):
    """Fraction of image and caption queries of the whole split on which the student's top-1
    choice is the teacher's, over both directions (NaN when no query was seen); the same on every
    rank and for any number of ranks."""

    _feature_states = ("image_features", "text_features", "teacher_image_features", "teacher_text_features")

    def __init__(self, chunk_size: int = 1024, **kwargs: Any) -> None:
        super().__init__(ks=(1,), chunk_size=chunk_size, **kwargs)
        for name in ("teacher_image_features", "teacher_text_features"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, student: dict[str, Tensor], teacher: dict[str, Tensor], image_id: Tensor, index: Tensor | None = None) -> None:  # type: ignore[override]
        """Add rows: ``image_features`` and ``text_features`` of the student and of the teacher,
        with the rows' ``image_id`` and (optional) ``index``."""
        super().update(student["image_features"], student["text_features"], image_id, index)
        device = student["image_features"].device
        for key in ("image_features", "text_features"):
            getattr(self, f"teacher_{key}").append(F.normalize(teacher[key].detach().float().to(device), dim=-1))

    def compute(self) -> Tensor:  # type: ignore[override]
        index = self._local("index", None)
        rows = _first_occurrence(index)[0] if (index >= 0).any() else torch.arange(index.numel(), device=index.device)
        gallery, _ = _first_occurrence(self._local("image_id", None)[rows])
        agree = total = 0
        choices = []
        for prefix in ("", "teacher_"):
            images = self._local(f"{prefix}image_features", 0)[rows][gallery]
            texts = self._local(f"{prefix}text_features", 0)[rows]
            choices.append(top1_choices(images, texts, self.chunk_size))
        (s_i2t, s_t2i), (t_i2t, t_t2i) = choices
        agree = int((s_i2t == t_i2t).sum()) + int((s_t2i == t_t2i).sum())
        total = s_i2t.numel() + s_t2i.numel()
        return torch.tensor(agree / total if total else float("nan"), device=self.device)
