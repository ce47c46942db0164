"""Image–caption pairs to explain, from the command line, a CSV or JSONL file, or the top-k
images of a folder for a text query."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmkit.data.sample import decode_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass
class Pair:
    image_path: str
    image: Image.Image
    caption: str


def _load(path: Path, where: str) -> Image.Image:
    image = decode_image(path, str(path))
    if isinstance(image, Image.Image):
        return image
    raise ValueError(f"{where}: {image}")  # decode_image's reason: missing, empty, undecodable


def one_pair(image: str, caption: str) -> list[Pair]:
    if not caption.strip():
        raise ValueError("--caption is empty")
    return [Pair(image, _load(Path(image), "--image"), caption.strip())]


def read_pairs(path: str) -> list[Pair]:
    """Pairs from a ``.csv`` (header with ``image`` and ``caption`` columns) or ``.jsonl`` (one
    ``{"image": ..., "caption": ...}`` object a line). Image paths are relative to the file's folder."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--pairs {path}: no such file")
    if file.suffix.lower() == ".csv":
        with file.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: needs columns 'image' and 'caption'; header has {reader.fieldnames} "
                                 f"(missing {sorted(missing)})")
            rows = [(f"{path} row {n}", r["image"], r["caption"]) for n, r in enumerate(reader, start=2)]
    elif file.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            problem, record = None, None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problem = e.msg  # raised below, outside the handler: the error is this message, not the decoder's
            if problem is not None:
                raise ValueError(f"{where}: not JSON ({problem})")
            if not isinstance(record, dict) or not {"image", "caption"} <= set(record):
                raise ValueError(f"{where}: expected an object with 'image' and 'caption', got {line[:80]!r}")
            rows.append((where, record["image"], record["caption"]))
    else:
        raise ValueError(f"--pairs {path}: expected a .csv or .jsonl file")
    pairs = []
    for where, image, caption in rows:
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{where}: column 'caption' is empty")
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{where}: column 'image' is empty")
        image_path = file.parent / image
        pairs.append(Pair(str(image_path), _load(image_path, f"{where}, column 'image'"), caption.strip()))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def folder_images(folder: str) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"--images {folder}: not a folder")
    found = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ValueError(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return found
