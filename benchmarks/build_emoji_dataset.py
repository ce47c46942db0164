"""Build a small real image–text set from the Noto Color Emoji font: one PNG per emoji, captioned
with its Unicode name ("grinning face with smiling eyes").

    python benchmarks/build_emoji_dataset.py [--out benchmarks/_work/emoji] [--size 64]

Needs the Debian package (installed here if missing, as root):
    apt-get update && apt-get install -y fonts-noto-color-emoji

Writes ``<out>/images/*.png`` and ``<out>/train.csv`` / ``<out>/val.csv`` with columns
``filepath,title`` (open_clip_train's CSV defaults; paths absolute so any working directory
works), split by image with a seeded shuffle.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
# Code points that only join or modify other emoji; they have no picture of their own.
_JOINERS = {0x200D, 0xFE0E, 0xFE0F, 0x20E3}


def ensure_font(path: str) -> None:
    if os.path.exists(path):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        sys.exit(f"{path} missing: run `apt-get update && apt-get install -y fonts-noto-color-emoji` as root")
    subprocess.run(["apt-get", "update", "-q"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "fonts-noto-color-emoji"], check=True)


def font_codepoints(path: str) -> list[int]:
    # fontTools comes with matplotlib (an mmkit dependency); the cmap lists every code point
    # that has its own glyph. Multi-code-point sequences (ZWJ, flags, skin tones) live in GSUB
    # ligatures and are not enumerated: single code points already give ~1,400 distinct names.
    from fontTools.ttLib import TTFont

    return sorted(TTFont(path, lazy=True).getBestCmap())


def caption_of(seq: str) -> str | None:
    """Lower-cased Unicode name(s) of a sequence, joiners dropped; None if any part is unnamed."""
    names = []
    for ch in seq:
        if ord(ch) in _JOINERS:
            continue
        name = unicodedata.name(ch, None)
        if name is None:
            return None
        names.append(name.lower())
    return " ".join(names) or None


def render(font: ImageFont.FreeTypeFont, seq: str, size: int, background: tuple[int, int, int]) -> Image.Image | None:
    """The glyph on a square canvas, cropped to its ink and resized; None if it draws nothing."""
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), seq, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        return None
    glyph = canvas.crop(bbox)
    # Pad to a square so the aspect ratio survives the resize.
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    out = Image.new("RGB", (side, side), background)
    out.paste(square, mask=square.getchannel("A"))
    out = out.resize((size, size), Image.LANCZOS)
    lo, hi = out.convert("L").getextrema()
    return None if hi - lo < 8 else out  # ink too faint to tell apart from the background


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("_work") / "emoji"))
    ap.add_argument("--size", type=int, default=64, help="output side in pixels (mmkit-tiny: 64)")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--font", default=FONT)
    args = ap.parse_args()

    ensure_font(args.font)
    out = Path(args.out).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    font = ImageFont.truetype(args.font, 109)  # CBDT bitmap strikes exist only at 109 px

    rows, unnamed, empty = [], 0, 0
    for cp in font_codepoints(args.font):
        seq = chr(cp)
        caption = caption_of(seq)
        if caption is None or cp in _JOINERS or cp < 0x20:
            unnamed += 1
            continue
        img = render(font, seq, args.size, (255, 255, 255))
        if img is None:
            empty += 1
            continue
        path = out / "images" / f"u{cp:05x}.png"
        img.save(path)
        rows.append((str(path), caption))

    random.Random(args.seed).shuffle(rows)
    n_val = round(len(rows) * args.val_fraction)
    splits = {"val": sorted(rows[:n_val]), "train": sorted(rows[n_val:])}
    for name, split in splits.items():
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["filepath", "title"])
            w.writerows(split)
    print(
        f"emoji dataset in {out}: {len(rows)} pairs (train {len(splits['train'])}, val {len(splits['val'])}); "
        f"skipped {unnamed} code points without a name/picture of their own and {empty} empty renders"
    )


if __name__ == "__main__":
    main()
