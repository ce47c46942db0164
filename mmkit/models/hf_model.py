"""Hugging Face towers: any vision and text ``AutoModel`` from a local folder, with linear
projection heads into a shared embedding space.

An export is a folder with ``vision/`` (the tower, plus an image processor reproducing mmkit's
evaluation transform), ``text/`` (the tower and its tokenizer), ``heads.safetensors`` (projections,
temperature, bias) and ``mmkit_dual_encoder.json`` (width, text pooling, context length).
``load_hf_export`` reads it back; docs/models.md shows the same with plain transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmkit.models.dual_encoder import DualEncoder
from mmkit.models.preprocessing import HFPreprocessing


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-6)


class HFDualEncoder(DualEncoder):
    def __init__(
        self,
        vision: nn.Module,
        text: nn.Module,
        embed_dim: int,
        text_pooling: str = "mean",
        init_temperature: float = 0.07,
        init_logit_bias: float | None = None,
        similarity: str = "cosine",
        preprocessing: HFPreprocessing | None = None,
    ) -> None:
        super().__init__(embed_dim, similarity)
        self.vision = vision
        self.text = text
        self.text_pooling = text_pooling
        # The tokenizer and image settings the towers were trained with: an export carries them.
        self.preprocessing = preprocessing
        self.image_proj = nn.Linear(_hidden_size(vision.config), embed_dim, bias=False)
        self.text_proj = nn.Linear(_hidden_size(text.config), embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None

    @property
    def image_tower(self) -> nn.Module:  # type: ignore[override]
        return self.vision

    @property
    def text_tower(self) -> nn.Module:  # type: ignore[override]
        return self.text

    def _encode_image(self, images: Tensor) -> Tensor:
        out = self.vision(pixel_values=images)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        elif pooled.dim() > 2:  # conv backbones pool to [B, C, 1, 1]
            pooled = pooled.flatten(1)
        return self.image_proj(pooled)

    def _encode_text(self, texts: dict[str, Tensor]) -> Tensor:
        out = self.text(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"])
        if self.text_pooling == "cls":
            pooled = out.last_hidden_state[:, 0]
        else:
            pooled = _mean_pool(out.last_hidden_state, texts["attention_mask"])
        return self.text_proj(pooled)

    def log_scale_parameter(self):
        return self.logit_scale

    def bias_parameter(self):
        return self.logit_bias

    def export(self, out_dir: str | Path) -> Path:
        """Each tower as a transformers folder (``AutoModel.from_pretrained``) with its tokenizer
        or image processor, plus the heads (see the module docstring)."""
        if self.preprocessing is None:
            raise ValueError(
                "HFDualEncoder.export needs the model's preprocessing (tokenizer and image settings): "
                "build the model with HFTowers(...).build() or load_hf_export(), or pass preprocessing="
            )
        out = Path(out_dir)
        self.vision.save_pretrained(out / "vision", safe_serialization=True)
        self.text.save_pretrained(out / "text", safe_serialization=True)
        self.preprocessing.save_pretrained(out / "text", out / "vision")
        heads = {
            "image_proj.weight": self.image_proj.weight,
            "text_proj.weight": self.text_proj.weight,
            "logit_scale": self.logit_scale,
        }
        if self.logit_bias is not None:
            heads["logit_bias"] = self.logit_bias
        save_file({k: v.detach().contiguous().cpu() for k, v in heads.items()}, str(out / "heads.safetensors"))
        meta = {
            "embed_dim": self.embed_dim,
            "text_pooling": self.text_pooling,
            "context_length": self.preprocessing.context_length,
        }
        (out / "mmkit_dual_encoder.json").write_text(json.dumps(meta, indent=2))
        return out


def load_hf_export(path: str | Path) -> tuple[HFDualEncoder, HFPreprocessing]:
    """An ``HFTowers`` export as an mmkit model (in eval mode) and its preprocessing:
    ``model.encode_image(torch.stack([pre.image_transform(train=False)(img) ...]))``,
    ``model.encode_text(pre.tokenize(captions))``."""
    from transformers import AutoModel

    folder = Path(path)
    missing = [
        name
        for name in ("mmkit_dual_encoder.json", "heads.safetensors", "vision/preprocessor_config.json", "text/tokenizer_config.json")
        if not (folder / name).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete HFTowers export: missing {missing} (exports written before "
            "mmkit saved tokenizers and image processors lack the last two; re-export from the checkpoint)"
        )
    meta = json.loads((folder / "mmkit_dual_encoder.json").read_text())
    heads = load_file(str(folder / "heads.safetensors"))
    preprocessing = HFPreprocessing.from_pretrained(folder / "text", folder / "vision", int(meta["context_length"]))
    model = HFDualEncoder(
        AutoModel.from_pretrained(folder / "vision"),
        AutoModel.from_pretrained(folder / "text"),
        int(meta["embed_dim"]),
        meta["text_pooling"],
        init_logit_bias=0.0 if "logit_bias" in heads else None,  # the value comes from the heads
        preprocessing=preprocessing,
    )
    # The towers are loaded already: the file must hold exactly the heads.
    result = model.load_state_dict(heads, strict=False)
    missing_heads = [k for k in result.missing_keys if not k.startswith(("vision.", "text."))]
    if result.unexpected_keys or missing_heads:
        raise ValueError(f"{folder}/heads.safetensors: unexpected {result.unexpected_keys}, missing {missing_heads}")
    return model.eval(), preprocessing


def _hidden_size(config) -> int:
    # The width of pooler_output / last_hidden_state: hidden_size before projection_dim, which
    # CLIP's tower configs also carry (512) though their towers output hidden_size (768).
    for attr in ("hidden_size", "dim", "d_model", "projection_dim"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    if getattr(config, "hidden_sizes", None):  # ResNet/ConvNeXt-style backbones
        return int(config.hidden_sizes[-1])
    raise ValueError(f"cannot tell the output width of {type(config).__name__}")
