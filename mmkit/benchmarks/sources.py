"""Benchmark data as plain lists read once: labelled images for zero-shot classification, and
images with their captions for retrieval. No caption is needed for classification.

- classification: an ImageFolder-style directory (one subfolder per class, label i = the i-th
  subfolder in sorted order, as torchvision's ``ImageFolder``), or a CSV/TSV/JSONL manifest
  with an image column and a label column.
- retrieval: Karpathy's split file (``dataset_coco.json``, ``dataset_flickr30k.json``:
  ``images[].filename``, optional ``filepath``, ``split``, ``sentences[].raw``), or a CSV/TSV/JSONL
  manifest with one row per caption (rows sharing an image path are one image with several
  captions; a JSONL caption field may hold a list).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmkit.data.sample import clean_caption, decode_image
from mmkit.data.sources._columns import require_columns
from mmkit.data.sources.manifest import ManifestDataset, _encode_labels

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageFiles:
    """Images on disk, decoded in full when loaded (a broken file is named, not half-read)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image | str:
        """The RGB image, or the reason it cannot be read."""
        return decode_image(self.paths[i], self.paths[i])


class ShapesImages:
    """The images of ``mmkit.data.SyntheticShapes`` (rendered on demand: nothing on disk)."""

    def __init__(self, shapes) -> None:
        self.shapes = shapes

    def __len__(self) -> int:
        return len(self.shapes)

    def load(self, i: int) -> Image.Image | str:
        return self.shapes.generate(i)[0]


@dataclass
class LabelledImages:
    images: ImageFiles | ShapesImages
    labels: list[int]  # index into class_names
    class_names: list[str]  # in label order


@dataclass
class CaptionedImages:
    images: ImageFiles | ShapesImages  # each image once
    captions: list[str]
    caption_image: list[int]  # for each caption, its image's index in ``images``


def image_folder(root: str, class_names: list[str] | None) -> LabelledImages:
    """Every image under ``root/<class>/`` (recursively); ``class_names`` (label order) replaces
    the folder names, one per subfolder. Default names: the folder names with ``_`` as spaces."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder benchmark: {root!r} is not a folder")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise ValueError(f"image folder benchmark: {root!r} has no class subfolders")
    if class_names is not None and len(class_names) != len(folders):
        raise ValueError(
            f"image folder benchmark: {root!r} has {len(folders)} class subfolders ({folders[:5]}...) but "
            f"class_names lists {len(class_names)} names; label i is the i-th subfolder in sorted order"
        )
    paths, labels = [], []
    for label, folder in enumerate(folders):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, name))
                    labels.append(label)
    if not paths:
        raise ValueError(f"image folder benchmark: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
    names = list(class_names) if class_names is not None else [f.replace("_", " ") for f in folders]
    return LabelledImages(ImageFiles(paths), labels, names)


def _resolve(path: str, root: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def classification_manifest(
    path: str, image_column: str, label_column: str, image_root: str | None, class_names: list[str] | None
) -> LabelledImages:
    """Rows of (image, label) from a manifest; integer labels index ``class_names``, text labels
    are class names (default order: sorted). Rows without a label are an error naming the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classification manifest benchmark: {path!r} does not exist")
    columns, records = ManifestDataset._read(path)
    require_columns(path, columns, image_column=image_column, label_column=label_column)
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    paths, raw, lines = [], [], []
    for line, rec in records:
        if rec is None:
            raise ValueError(f"{path} line {line}: not a JSON object")
        image, label = rec.get(image_column), rec.get(label_column)
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{path} line {line}: empty or missing {image_column!r}")
        if label is None or str(label).strip() == "":
            raise ValueError(f"{path} line {line}: empty or missing {label_column!r}")
        paths.append(_resolve(image.strip(), root))
        raw.append(label)
        lines.append(line)
    if not paths:
        raise ValueError(f"classification manifest benchmark: {path} has no rows")
    labels, names = _encode_labels(raw, class_names, f"{path} column {label_column!r}", lines)
    if names is None:
        raise ValueError(
            f"{path}: column {label_column!r} holds integer labels; give class_names (a built-in set, a file "
            "or a list) to name them"
        )
    return LabelledImages(ImageFiles(paths), labels, names)


def karpathy_json(path: str, split: str | None, image_root: str | None) -> CaptionedImages:
    """The images of ``split`` (None: all) of a Karpathy split file, each with its captions.
    ``image_root`` defaults to the file's folder; an image is ``root/filepath/filename``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Karpathy retrieval benchmark: {path!r} does not exist")
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise TypeError(f"{path}: not a Karpathy split file (expected an object with an 'images' list)")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    paths: list[str] = []
    out = CaptionedImages(ImageFiles(paths), [], [])
    splits = set()
    for i, entry in enumerate(data["images"]):
        splits.add(entry.get("split"))
        if split is not None and entry.get("split") != split:
            continue
        if not isinstance(entry.get("filename"), str):
            raise TypeError(f"{path}: images[{i}] has no 'filename' string")
        captions = [clean_caption(s.get("raw") if isinstance(s, dict) else None) for s in entry.get("sentences") or []]
        captions = [c for c in captions if c]
        if not captions:
            raise ValueError(f"{path}: images[{i}] ({entry['filename']}) has no caption in 'sentences[].raw'")
        out.caption_image += [len(paths)] * len(captions)
        out.captions += captions
        paths.append(_resolve(os.path.join(entry.get("filepath") or "", entry["filename"]), root))
    if not paths:
        raise ValueError(f"{path}: no image in split {split!r}; splits present: {sorted(map(str, splits))}")
    return out


def retrieval_manifest(path: str, image_column: str, caption_column: str, image_root: str | None) -> CaptionedImages:
    """Images and captions from a manifest with one caption per row (or a list in JSONL)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"retrieval manifest benchmark: {path!r} does not exist")
    columns, records = ManifestDataset._read(path)
    require_columns(path, columns, image_column=image_column, caption_column=caption_column)
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    paths: list[str] = []
    out = CaptionedImages(ImageFiles(paths), [], [])
    index: dict[str, int] = {}
    for line, rec in records:
        if rec is None:
            raise ValueError(f"{path} line {line}: not a JSON object")
        image = rec.get(image_column)
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{path} line {line}: empty or missing {image_column!r}")
        value = rec.get(caption_column)
        captions = [clean_caption(c) for c in (value if isinstance(value, list) else [value])]
        if not all(captions):
            raise ValueError(f"{path} line {line}: empty or missing {caption_column!r}")
        full = os.path.normpath(_resolve(image.strip(), root))
        slot = index.setdefault(full, len(paths))
        if slot == len(paths):
            paths.append(full)
        out.captions += captions
        out.caption_image += [slot] * len(captions)
    if not paths:
        raise ValueError(f"retrieval manifest benchmark: {path} has no rows")
    return out


def shapes_classification(shapes, class_names: list[str] | None) -> LabelledImages:
    """``mmkit.data.SyntheticShapes`` as a classification benchmark (its ``label_attribute``)."""
    labels = [shapes[i]["label"] for i in range(len(shapes))]
    names = list(class_names) if class_names is not None else list(shapes.class_names)
    if len(names) != len(shapes.class_names):
        raise ValueError(f"SyntheticShapes benchmark: {len(shapes.class_names)} classes {shapes.class_names}, "
                         f"but class_names lists {len(names)}")
    return LabelledImages(ShapesImages(shapes), labels, names)


def shapes_retrieval(shapes) -> CaptionedImages:
    """``mmkit.data.SyntheticShapes`` as a retrieval benchmark: one caption per image."""
    captions = [shapes.generate(i)[1] for i in range(len(shapes))]
    return CaptionedImages(ShapesImages(shapes), captions, list(range(len(shapes))))
