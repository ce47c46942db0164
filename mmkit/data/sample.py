"""What a source hands to the collate function: a sample dict, or a ``BadSample`` marker.

Sources never raise for bad data (a missing file, undecodable bytes, an empty caption): one bad
row must not kill a long run. They return a marker with a reason instead, and the collate function
drops and counts it, so the decision of how much bad data is tolerable lives in one place.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError


# Bounds on what one sample may cost before it is skipped (and counted, with its reason).
# A caption is cut to the model's context length by the tokenizer anyway; tokenizing a
# 60,000-letter "word" first takes seconds. CLIP-style towers see images through a resize of
# the short side: a 1×300,000-pixel strip (a 1 kB PNG) would become a 32×9.6M-pixel tensor.
MAX_CAPTION_CHARS = 10_000
MAX_ASPECT_RATIO = 20.0


@dataclass(frozen=True)
class BadSample:
    """A sample that could not be built. ``reason`` names the file, the row/key and the problem;
    ``index`` is the ``index`` the sample would have had (None where unknown), so that a bad row met
    again (another epoch, padding, a resume) is counted once."""

    reason: str
    index: int | None = None


def make_sample(image: Image.Image, caption: str, index: int, image_id: int, label: int = -1) -> dict[str, Any]:
    return {"image": image, "caption": caption, "index": int(index), "image_id": int(image_id), "label": int(label)}


def decode_image(source: str | os.PathLike | bytes, name: str) -> Image.Image | str:
    """Fully decode an image to RGB, or return a short reason why it cannot be.

    Decoding happens here (not lazily in the transform) so a truncated file is caught while we
    still know which row it came from. ``name`` is how the reason refers to the image.
    """
    try:
        if isinstance(source, (bytes, bytearray)):
            if len(source) == 0:
                return f"image {name!r} is empty (0 bytes)"
            fp: Any = io.BytesIO(source)
        else:
            if not os.path.exists(source):
                return f"image {name!r} not found (looked for {os.fspath(source)})"
            if os.path.getsize(source) == 0:
                return f"image {name!r} is empty (0 bytes)"
            fp = source
        with warnings.catch_warnings():
            # Between PIL's limit and twice it PIL only warns: a 100-megapixel image would cost
            # hundreds of MB per worker to decode just to be resized, so it is skipped as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                w, h = img.size  # from the header: nothing decoded yet
                if min(w, h) == 0 or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
                    return (f"image {name!r} is {w}×{h} pixels, an aspect ratio above {MAX_ASPECT_RATIO:g}:1 "
                            "(resizing its short side to the model's size would make it huge)")
                return to_rgb(img)  # forces the full decode
    except UnidentifiedImageError:
        return f"image {name!r} cannot be decoded (UnidentifiedImageError)"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        return f"image {name!r} cannot be decoded ({type(e).__name__}: {str(e)[:120]})"


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode. Plain ``convert("RGB")`` clips 16-bit and 32-bit integer
    pixels at 255 (a white image) and truncates float pixels in [0, 1] to 0 (a black one)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(img).astype(np.int64)
        peak = int(pixels.max(initial=0))
        if peak > 255:  # rescale the used bit depth (16-bit scans, 12-bit medical images) to 8 bits
            pixels = pixels * 255 // (65535 if peak > 4095 else 4095)
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        pixels = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if pixels.size and pixels.max() <= 1.0:
            pixels = pixels * 255.0
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL's recommended route for palette transparency (no warning)
    return img.convert("RGB")


def caption_too_long(caption: str) -> str | None:
    """Why ``caption`` is skipped for its length, or None."""
    if len(caption) > MAX_CAPTION_CHARS:
        return f"caption of {len(caption):,} characters, above the limit of {MAX_CAPTION_CHARS:,}"
    return None


def clean_caption(caption: Any) -> str | None:
    """The caption as a stripped string, or None when there is no usable text."""
    if caption is None or not isinstance(caption, str):
        return None
    caption = caption.strip()
    return caption or None
