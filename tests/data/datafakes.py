"""Small stand-ins shared by the data tests: a preprocessing object and data-file writers.

Module-level (not fixtures) so that spawned test processes can import them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile

import numpy as np
import torch
from PIL import Image

IMAGE_SIDE = 32
TEXT_LEN = 24


def tokenize(texts: list[str]) -> torch.Tensor:
    """Character-level stand-in for a tokenizer: byte values, zero-padded to TEXT_LEN."""
    out = torch.zeros((len(texts), TEXT_LEN), dtype=torch.long)
    for i, t in enumerate(texts):
        codes = list(t.encode("utf-8"))[:TEXT_LEN]
        out[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
    return out


class ResizeToTensor:
    """PIL image -> float [3, IMAGE_SIDE, IMAGE_SIDE] in [0, 1]. Plain numpy rather than
    torchvision keeps spawned test processes quick to start."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image.convert("RGB").resize((IMAGE_SIDE, IMAGE_SIDE)), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class FakePreprocessing:
    """Fulfils mmkit.data.Preprocessing without any model code."""

    def image_transform(self, train: bool):
        return ResizeToTensor()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return tokenize(texts)


class DictTokenizerPreprocessing(FakePreprocessing):
    """Like a Hugging Face tokenizer: returns input_ids and attention_mask."""

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = tokenize(texts)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def image_bytes(color=(200, 30, 30), fmt: str = "JPEG", side: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buf, format=fmt)
    return buf.getvalue()


def write_images(folder, names, fmt: str = "JPEG") -> None:
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(image_bytes((10 * i % 255, 100, 50), fmt))


def write_csv(path, rows: list[dict], delimiter: str = ",") -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)


def write_jsonl(path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_shard_tarfile(path, samples: list[dict[str, bytes | str]]) -> None:
    """A WebDataset shard written with the standard library; each sample needs a "__key__"."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, value in sorted(s.items()):
                if ext == "__key__":
                    continue
                data = value.encode() if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_shard_webdataset(path, samples: list[dict[str, bytes | str]]) -> None:
    """The same, written by the webdataset package's own TarWriter."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(dict(s))


def shard_samples(shard: int, n: int, start_label: int = 0) -> list[dict]:
    """n valid samples for shard number ``shard``; captions name shard and position."""
    return [
        {"__key__": f"{shard:03d}{i:04d}", "jpg": image_bytes((i * 20 % 255, shard * 40 % 255, 9)),
         "txt": f"shard {shard} item {i}", "cls": str((start_label + i) % 3)}
        for i in range(n)
    ]


def make_shards(folder, counts: list[int], prefix: str = "shard", writer=write_shard_tarfile) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s, n in enumerate(counts):
        p = os.path.join(folder, f"{prefix}-{s:03d}.tar")
        writer(p, shard_samples(s, n))
        paths.append(p)
    return paths
