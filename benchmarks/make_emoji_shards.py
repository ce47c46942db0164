"""The emoji training set as WebDataset tar shards plus a matching CSV, for data_loading.py.

    python benchmarks/make_emoji_shards.py [--copies 4] [--shards 8] [--force]

Reads benchmarks/_work/emoji/train.csv (benchmarks/build_emoji_dataset.py) and writes, under
benchmarks/_work/emoji_loading/:

- ``train_x{copies}.csv``: the train rows repeated ``copies`` times (same image files), so one
  epoch is long enough to time a fixed number of batches after a warm-up;
- ``shards/train-{000000..}.tar``: the same rows in the same order, split into ``shards``
  contiguous, equally sized shards (enough for 2+ loader workers), each sample ``KEY.png`` (the
  file's bytes, unchanged) + ``KEY.txt`` (the caption, UTF-8);
- ``shards/sizes.json`` (samples per shard, which open_clip_train reads) and ``stamp.json``.

Both pipelines therefore decode the same PNG bytes. Nothing is rewritten when the stamp matches.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "_work" / "emoji" / "train.csv"
OUT = HERE / "_work" / "emoji_loading"


def build(source: Path = SOURCE, out: Path = OUT, copies: int = 4, shards: int = 8, force: bool = False) -> dict:
    """Write the CSV and shards (unless up to date); return the stamp describing them."""
    if not source.exists():
        raise SystemExit(f"{source} missing: run benchmarks/build_emoji_dataset.py first")
    stamp_path = out / "stamp.json"
    wanted = {"source": str(source), "source_mtime": source.stat().st_mtime, "copies": copies, "shards": shards}
    if not force and stamp_path.exists():
        stamp = json.loads(stamp_path.read_text())
        if {k: stamp.get(k) for k in wanted} == wanted:
            return stamp

    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    image_key, caption_key = fields[0], fields[1]  # filepath, title
    samples = [(c, r) for c in range(copies) for r in rows]

    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"train_x{copies}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r for _, r in samples)

    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    for old in shard_dir.glob("train-*.tar"):
        old.unlink()
    sizes = {}
    per, extra = divmod(len(samples), shards)
    start = 0
    for s in range(shards):
        chunk = samples[start : start + per + (s < extra)]
        start += len(chunk)
        name = f"train-{s:06d}.tar"
        with tarfile.open(shard_dir / name, "w") as tar:
            for copy, row in chunk:
                key = f"c{copy}_{Path(row[image_key]).stem}"  # no dot: the key ends at the first dot
                _add(tar, f"{key}.png", Path(row[image_key]).read_bytes())
                _add(tar, f"{key}.txt", row[caption_key].encode("utf-8"))
        sizes[name] = len(chunk)
    (shard_dir / "sizes.json").write_text(json.dumps(sizes, indent=1))

    stamp = {
        **wanted, "csv": str(csv_path), "num_samples": len(samples),
        "shard_pattern": str(shard_dir / f"train-{{000000..{shards - 1:06d}}}.tar"),
    }
    stamp_path.write_text(json.dumps(stamp, indent=1))
    return stamp


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=SOURCE)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    print(json.dumps(build(a.source, a.out, a.copies, a.shards, a.force), indent=1))


if __name__ == "__main__":
    main()
