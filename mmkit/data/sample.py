"""What a source hands to the collate function: a sample dict, or a ``BadSample`` marker.

Sources never raise for bad data (a missing file, undecodable bytes, an empty caption): one bad
row must not kill a long run. They return a marker with a reason instead, and the collate function
drops and counts it, so the decision of how much bad data is tolerable lives in one place.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class BadSample:
    """A sample that could not be built. ``reason`` names the file, the row/key and the problem."""

    reason: str


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
        with Image.open(fp) as img:
            return img.convert("RGB")  # convert() forces the full decode
    except UnidentifiedImageError:
        return f"image {name!r} cannot be decoded (UnidentifiedImageError)"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        return f"image {name!r} cannot be decoded ({type(e).__name__}: {str(e)[:120]})"


def clean_caption(caption: Any) -> str | None:
    """The caption as a stripped string, or None when there is no usable text."""
    if caption is None or not isinstance(caption, str):
        return None
    caption = caption.strip()
    return caption or None
