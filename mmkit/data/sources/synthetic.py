"""Procedural image–caption pairs: colored shapes and their spatial relation. No download.

This is the dataset every CPU test and demo runs on, so it must be (1) deterministic from
(seed, index) alone, so any worker or rank regenerates the same sample, and (2) learnable by a
tiny model in minutes: captions name color, size and shape of up to two objects plus their
relation, which makes most captions in a few hundred samples unique (5 shapes x 6 colors x 2
sizes per object, 4 relations), so retrieval Recall@1 is a meaningful signal.

Note for augmentation: a horizontal/vertical flip changes the truth of "left of"/"above"; use
crops/color jitter only.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from mmkit.config_checks import Range, check_settings
from mmkit.data.sample import make_sample

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (155, 60, 205),
    "orange": (250, 140, 20),
}
SIZES = {"small": (0.09, 0.12), "large": (0.17, 0.21)}  # radius as a fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
PROMPT_TEMPLATES = ("a {}", "a small {}", "a large {}")

_SUPERSAMPLE = 4  # draw large, then downsample: smooth edges keep small shapes recognizable


class SyntheticShapes(Dataset):
    """Seeded synthetic dataset of one or two colored shapes with a caption such as
    "a small red circle left of a large blue square".

    Args:
        size: Number of samples.
        seed: Samples are a pure function of (seed, index); different seeds give different data
            (use different seeds for train and val).
        image_size: Side of the square RGB images in pixels.
        two_shapes_prob: Probability that a sample has two shapes and a relation.
        label_attribute: What ``label`` holds for zero-shot tests: the class of the first (or only)
            shape's ``"shape"`` or its ``"color"``. Class names are in ``class_names``.
    """

    setting_ranges = {
        "size": Range(ge=0, integer=True),
        "seed": Range(ge=0, integer=True),
        "image_size": Range(ge=16, integer=True),  # smaller shapes are not recognisable
        "two_shapes_prob": Range(ge=0, le=1),
    }

    def __init__(
        self,
        size: int = 1024,
        seed: int = 0,
        image_size: int = 64,
        two_shapes_prob: float = 0.8,
        label_attribute: Literal["shape", "color"] = "shape",
    ) -> None:
        check_settings(self, locals(), SyntheticShapes.setting_ranges)
        if label_attribute not in ("shape", "color"):
            raise ValueError(f"SyntheticShapes: label_attribute must be 'shape' or 'color', got {label_attribute!r}")
        self.size = size
        self.seed = seed
        self.image_size = image_size
        self.two_shapes_prob = two_shapes_prob
        self.label_attribute = label_attribute
        self.class_names: list[str] = list(SHAPES if label_attribute == "shape" else COLORS)
        self.prompt_templates: list[str] = list(PROMPT_TEMPLATES)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"SyntheticShapes index {index} out of range [0, {self.size})")
        image, caption, objects = self.generate(index)
        first = objects[0]
        label = self.class_names.index(first["shape"] if self.label_attribute == "shape" else first["color"])
        return make_sample(image, caption, index, index, label)

    def boxes(self, index: int) -> list[dict[str, Any]]:
        """Where sample ``index``'s shapes are, for checks of where a model looks (the pointing
        game of ``mmkit.explain``); a side channel that leaves the samples themselves unchanged.
        One dict per shape, in caption order: ``phrase`` (e.g. "a small red circle"), ``shape``,
        ``color``, ``size`` and ``box``, the tight (x0, y0, x1, y1) pixel bounds of the drawn
        shape in the ``image_size`` image (before any model transform)."""
        if not 0 <= index < self.size:
            raise IndexError(f"SyntheticShapes index {index} out of range [0, {self.size})")
        _, _, objects = self.generate(index)
        return [{"phrase": _phrase(obj), "shape": obj["shape"], "color": obj["color"], "size": obj["size"],
                 "box": tuple(v / _SUPERSAMPLE for v in _shape_bounds(obj["shape"], obj["center"], obj["radius"]))}
                for obj in objects]

    def generate(self, index: int) -> tuple[Image.Image, str, list[dict[str, Any]]]:
        """The image, its caption and the drawn objects (shape, color, size, center, radius)."""
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size * _SUPERSAMPLE
        objects = [_random_object(rng)]
        relation = None
        if rng.random() < self.two_shapes_prob:
            second = _random_object(rng)
            while all(second[k] == objects[0][k] for k in ("shape", "color", "size")):
                second = _random_object(rng)
            objects.append(second)
            relation = RELATIONS[rng.integers(len(RELATIONS))]
        for obj in objects:
            lo, hi = SIZES[obj["size"]]
            obj["radius"] = rng.uniform(lo, hi) * s
        _place(objects, relation, s, rng)

        background = int(rng.integers(20, 70))
        canvas = Image.new("RGB", (s, s), (background,) * 3)
        draw = ImageDraw.Draw(canvas)
        for obj in objects:
            _draw_shape(draw, obj["shape"], obj["center"], obj["radius"], COLORS[obj["color"]])
        image = canvas.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS)
        # mild sensor-like noise so the model cannot match images by exact pixel values
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, size=(self.image_size, self.image_size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

        caption = _phrase(objects[0])
        if relation is not None:
            caption += f" {relation} {_phrase(objects[1])}"
        return image, caption, objects


def _random_object(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": list(COLORS)[rng.integers(len(COLORS))],
        "size": list(SIZES)[rng.integers(len(SIZES))],
    }


def _phrase(obj: dict[str, Any]) -> str:
    return f"a {obj['size']} {obj['color']} {obj['shape']}"


def _place(objects: list[dict[str, Any]], relation: str | None, s: int, rng: np.random.Generator) -> None:
    """Set each object's center; with a relation the first object lies wholly in the half of the
    image the relation names and the second in the other half, so the caption is unambiguous."""

    def coord(r: float, lo: float, hi: float) -> float:
        return float(rng.uniform(lo + r + 1, max(lo + r + 1, hi - r - 1)))

    if relation is None:
        r = objects[0]["radius"]
        objects[0]["center"] = (coord(r, 0, s), coord(r, 0, s))
        return
    first_low = relation in ("left of", "above")  # first object in the low-coordinate half
    halves = [(0, s / 2), (s / 2, s)] if first_low else [(s / 2, s), (0, s / 2)]
    horizontal = relation in ("left of", "right of")
    for obj, (lo, hi) in zip(objects, halves):
        r = obj["radius"]
        along, across = coord(r, lo, hi), coord(r, 0, s)
        obj["center"] = (along, across) if horizontal else (across, along)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, center: tuple[float, float], r: float, color) -> None:
    cx, cy = center
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        h = r * 0.85  # similar area to the circle so size words stay comparable across shapes
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=color)
    elif shape == "triangle":
        draw.polygon(_regular_points(cx, cy, r, 3), fill=color)
    elif shape == "cross":
        w = r * 0.34
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    elif shape == "star":
        outer = _regular_points(cx, cy, r, 5)
        inner = _regular_points(cx, cy, r * 0.42, 5, offset=math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=color)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def _shape_bounds(shape: str, center: tuple[float, float], r: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of what ``_draw_shape`` draws."""
    cx, cy = center
    if shape in ("triangle", "star"):
        xs, ys = zip(*_regular_points(cx, cy, r, 3 if shape == "triangle" else 5))
        return min(xs), min(ys), max(xs), max(ys)
    h = r * 0.85 if shape == "square" else r
    return cx - h, cy - h, cx + h, cy + h


def _regular_points(cx: float, cy: float, r: float, n: int, offset: float = 0.0) -> list[tuple[float, float]]:
    start = -math.pi / 2 + offset  # point up
    return [(cx + r * math.cos(start + 2 * math.pi * k / n), cy + r * math.sin(start + 2 * math.pi * k / n))
            for k in range(n)]
