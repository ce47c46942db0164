"""Small benchmarks built on disk for tests: an ImageFolder and a Karpathy split file of
rendered SyntheticShapes images, and a tiny open_clip model to score."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mmkit.data.sources.synthetic import SyntheticShapes

TINY_ARCH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models", "tiny_test_arch.json")


def image_folder(root: Path, n: int = 23, seed: int = 5) -> Path:
    """``root/<shape>/<i>.png`` for n one-shape images."""
    shapes = SyntheticShapes(size=n, seed=seed, image_size=16, two_shapes_prob=0.0)
    for i in range(n):
        sample = shapes[i]
        folder = root / shapes.class_names[sample["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        sample["image"].save(folder / f"{i:03d}.png")
    return root


def karpathy_file(root: Path, n: int = 7, captions_per_image: int = 3, seed: int = 9) -> Path:
    """A Karpathy split file: n test images (and 2 train ones, not scored) with several captions each."""
    shapes = SyntheticShapes(size=n + 2, seed=seed, image_size=16)
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n + 2):
        image, caption, _ = shapes.generate(i)
        image.save(root / "images" / f"{i}.png")
        sentences = [{"raw": caption}] + [{"raw": f"{caption} number {k}"} for k in range(1, captions_per_image)]
        entries.append({"filepath": "images", "filename": f"{i}.png", "split": "test" if i < n else "train",
                        "sentences": sentences, "imgid": i})
    path = root / "dataset_shapes.json"
    path.write_text(json.dumps({"dataset": "shapes", "images": entries}))
    return path


def tiny_model(seed: int = 0):
    """A randomly initialised tiny open_clip dual encoder and its spec."""
    from mmkit.models.spec import OpenCLIP

    torch.manual_seed(seed)
    spec = OpenCLIP(arch=TINY_ARCH)
    return spec.build(), spec
