"""Image transforms and tokenizers that come from the chosen model (they implement the data
layer's ``mmkit.data.preprocessing.Preprocessing`` protocol).

The data module receives one of these objects (linked from the model at run time), so the
recipe never repeats image size, normalisation or context length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image


class OpenCLIPPreprocessing:
    """open_clip's own train/eval transforms and tokenizer for an architecture."""

    def __init__(self, train_transform, eval_transform, tokenizer) -> None:
        self._train = train_transform
        self._eval = eval_transform
        self._tokenizer = tokenizer

    @property
    def context_length(self) -> int:
        return int(self._tokenizer.context_length)

    def image_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        return self._train if train else self._eval

    def tokenize(self, texts: list[str]) -> torch.Tensor | dict[str, torch.Tensor]:
        return self._tokenizer(texts)


def _to_rgb(image: Image.Image) -> Image.Image:
    # A module-level function (not a lambda) so transforms pickle into spawned DataLoader workers.
    return image.convert("RGB")


class HFPreprocessing:
    """A Hugging Face tokenizer (padding to a fixed length keeps batches stackable across
    ranks) plus torchvision transforms built from the image processor's size and statistics."""

    def __init__(self, tokenizer, context_length: int, image_size: int, mean, std, train_scale=(0.9, 1.0)):
        from torchvision import transforms as T

        self._tokenizer = tokenizer
        self.context_length = context_length
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        norm = T.Normalize(mean=mean, std=std)
        rgb = T.Lambda(_to_rgb)
        self._train = T.Compose(
            [rgb, T.RandomResizedCrop(image_size, scale=train_scale, antialias=True), T.ToTensor(), norm]
        )
        self._eval = T.Compose(
            [rgb, T.Resize(image_size, antialias=True), T.CenterCrop(image_size), T.ToTensor(), norm]
        )

    def image_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        return self._train if train else self._eval

    def tokenize(self, texts: list[str]) -> torch.Tensor | dict[str, torch.Tensor]:
        enc = self._tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def save_pretrained(self, text_dir, vision_dir) -> None:
        """Write the tokenizer (``AutoTokenizer``) and an image processor (``AutoImageProcessor``)
        that reproduces the evaluation transform: shortest side resized (bilinear) to the image
        size, centre crop, the same mean/std."""
        from transformers import CLIPImageProcessor

        self._tokenizer.save_pretrained(text_dir)
        size = self.image_size
        CLIPImageProcessor(
            do_resize=True,
            size={"shortest_edge": size},
            resample=int(Image.Resampling.BILINEAR),  # torchvision's Resize default
            do_center_crop=True,
            crop_size={"height": size, "width": size},
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=list(self.mean),
            image_std=list(self.std),
            do_convert_rgb=True,
        ).save_pretrained(vision_dir)

    @classmethod
    def from_pretrained(cls, text_dir, vision_dir, context_length: int) -> HFPreprocessing:
        """The preprocessing ``save_pretrained`` wrote (an mmkit export's ``text/`` and ``vision/``)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        proc = AutoImageProcessor.from_pretrained(vision_dir)
        return cls(AutoTokenizer.from_pretrained(text_dir), context_length, int(proc.crop_size["height"]), proc.image_mean, proc.image_std)
