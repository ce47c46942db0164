"""One trained tower of a dual encoder, the student of ``KDStudent`` with ``student_towers: image|text``."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from mmkit.models.dual_encoder import DualEncoder


class SingleTowerStudent(DualEncoder):
    """One trained tower of a dual encoder. ``forward`` returns zeros as the other modality's
    features (a placeholder without gradient); ``KDStudent`` puts the teacher's features there."""

    def __init__(self, student: DualEncoder, tower: str) -> None:
        super().__init__(student.embed_dim)
        self.student = student
        self.tower = tower
        unused = student.text_tower if tower == "image" else student.image_tower
        unused.requires_grad_(False)  # never run: kept out of the optimizer and of DDP

    @property
    def image_tower(self) -> nn.Module:  # type: ignore[override]
        return self.student.image_tower

    @property
    def text_tower(self) -> nn.Module:  # type: ignore[override]
        return self.student.text_tower

    def _encode_image(self, images: Tensor) -> Tensor:
        return self.student._encode_image(images)

    def _encode_text(self, texts) -> Tensor:
        return self.student._encode_text(texts)

    def log_scale_parameter(self):
        return self.student.log_scale_parameter()

    def bias_parameter(self):
        return self.student.bias_parameter()

    def forward(self, images: Tensor, texts) -> dict[str, Tensor]:
        if self.tower == "image":
            image = self.encode_image(images)
            text = image.new_zeros(image.shape).detach()
        else:
            text = self.encode_text(texts)
            image = text.new_zeros(text.shape).detach()
        out = {"image_features": image, "text_features": text, "logit_scale": self.log_scale_parameter().exp()}
        bias = self.bias_parameter()
        if bias is not None:
            out["logit_bias"] = bias
        return out

    def export(self, out_dir: str | Path) -> Path:
        return self.student.export(out_dir)
