"""Pictures of an explanation: the patch relevance as a heatmap over the image the model saw,
and the caption with each token highlighted by its relevance."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from mmkit.explain.evaluation import upsample
from mmkit.reports.examples import display_images

# open_clip's (OpenAI's) statistics, for models whose config does not say
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


def model_pixels_to_image(pixels: Tensor, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> Image.Image:
    """The image the model saw (after its resize and crop), from its normalised pixels [3, H, W]."""
    return Image.fromarray(display_images(pixels[None], mean, std)[0], "RGB")


def _colormap(values: np.ndarray, name: str = "jet") -> np.ndarray:
    """[..., 3] uint8 colours of ``values`` in [0, 1]."""
    from matplotlib import colormaps

    return (colormaps[name](np.clip(values, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def heatmap_overlay(image: Image.Image, relevance: Tensor, side: int = 256, alpha: float = 0.5) -> Image.Image:
    """``image`` enlarged to ``side`` pixels (pixel art stays sharp) with ``relevance`` [gh, gw],
    in [0, 1], upsampled bilinearly and blended over it in the jet colormap."""
    if relevance.dim() != 2:
        raise ValueError(f"heatmap_overlay: relevance must be [gh, gw], got shape {tuple(relevance.shape)}")
    base = np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.NEAREST), dtype=np.float32)
    heat = upsample(relevance[None].detach().float().cpu(), (side, side))[0].numpy()
    blended = (1 - alpha) * base + alpha * _colormap(heat).astype(np.float32)
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), "RGB")


def highlighted_text(tokens: list[str], relevance: list[float], width: int = 720, font_size: int = 22,
                     title: str | None = None) -> Image.Image:
    """The tokens laid out as text, each on a background whose colour shows its relevance (in
    [0, 1]; white: none, dark red: the most), wrapped at ``width`` pixels."""
    if len(tokens) != len(relevance):
        raise ValueError(f"highlighted_text: {len(tokens)} tokens but {len(relevance)} relevance values")
    font = ImageFont.load_default(size=font_size)
    pad, line_h = 8, font_size + 12
    colours = _colormap(np.asarray(relevance, dtype=np.float32) * 0.85, "Reds") if tokens else []
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x, y, placed = pad, pad + (line_h if title else 0), []
    for token, colour in zip(tokens, colours):
        w = int(measure.textlength(token, font=font)) + 6
        if x + w > width - pad and x > pad:
            x, y = pad, y + line_h
        placed.append((x, y, w, token, tuple(int(c) for c in colour)))
        x += w + 4
    canvas = Image.new("RGB", (width, y + line_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=(60, 60, 60), font=font)
    for x, y, w, token, colour in placed:
        draw.rectangle([x, y, x + w, y + line_h - 4], fill=colour)
        dark = sum(colour) < 3 * 140
        draw.text((x + 3, y + 3), token, fill="white" if dark else "black", font=font)
    return canvas


def hf_tokenizer(tokenizer):
    """A Hugging Face tokenizer, itself or wrapped (open_clip's ``HFTokenizer.tokenizer``), else None."""
    for candidate in (tokenizer, getattr(tokenizer, "tokenizer", None)):
        if hasattr(candidate, "convert_ids_to_tokens"):
            return candidate
    return None


def special_token_ids(tokenizer) -> set[int]:
    """Ids that are not the caption's own words (start/end of text, CLS, SEP, padding)."""
    hf = hf_tokenizer(tokenizer)
    if hf is not None:
        return set(hf.all_special_ids)
    return {getattr(tokenizer, n, None) for n in ("sot_token_id", "eot_token_id")} - {None}


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token id as text: a Hugging Face tokenizer's own token strings (word pieces keep
    their ``##``); open_clip's tokenizer decodes one id at a time; others: the id."""
    hf = hf_tokenizer(tokenizer)
    if hf is not None:
        return [t or "␣" for t in hf.convert_ids_to_tokens([int(i) for i in ids])]
    decode = getattr(tokenizer, "decode", None)
    if decode is None:
        return [str(i) for i in ids]
    return [decode([int(i)]).strip() or "␣" for i in ids]
