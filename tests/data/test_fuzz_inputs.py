"""Fuzz-style inputs through the whole data path with a real model's transforms and tokenizer.

Every kind of bad or unusual input named in the reliability issue goes into one manifest and one
set of shards; nothing may crash, every unusable sample is skipped with a reason and counted, the
usable unusual ones (odd image modes, odd captions) come out as normal tensors, and a real fit over
them finishes and reports the counts at epoch end.
"""

from __future__ import annotations

import io
import os
import random
import tarfile

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from mmkit import CLIPPretrain
from mmkit.callbacks.bad_samples import BadSampleCallback
from mmkit.data import BadSample, ImageTextCollate, ImageTextDataModule, ManifestDataset, WebDatasetShards
from mmkit.data.sample import decode_image
from mmkit.models import OpenCLIP
from datafakes import write_csv, write_shard_tarfile


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (12, 12), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    return img


# Images that are unusual but valid: each must decode to an RGB image with the right content.
UNUSUAL_IMAGES = {
    "cmyk.jpg": lambda: _png(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
    "gray16.png": lambda: _png(Image.fromarray((np.arange(256).reshape(16, 16) * 256).astype(np.uint16))),
    "palette_alpha.png": lambda: _png(_palette_with_transparency(), transparency=0),
    "one_pixel.png": lambda: _png(Image.new("RGB", (1, 1), (0, 200, 0))),
    "float.tiff": lambda: _png(Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)), "TIFF"),
    "la.png": lambda: _png(Image.new("LA", (9, 9), (128, 255))),
}
# Inputs no image can be made of: each must be skipped with a reason naming the file.
BAD_IMAGES = {
    "random_bytes.jpg": lambda: random.Random(0).randbytes(500),
    "zero_bytes.jpg": lambda: b"",
    "truncated.png": lambda: _png(Image.new("RGB", (64, 64), (5, 5, 5)))[:60],
    # 108 megapixels in a few kB: over PIL's bomb limit, where PIL itself would only warn
    "huge.png": lambda: _png(Image.new("1", (12000, 9000))),
}
CAPTIONS_OK = {
    "very long": "a picture of " + "many " * 1900 + "things",  # just under MAX_CAPTION_CHARS
    "chinese": "一只红色的猫坐在窗台上",
    "arabic": "قطة حمراء تجلس على النافذة",
    "emoji": "🐱 on a 🪟 ✨",
    "control chars": "tab\tand\u200bzero width\u0000nul",
    "rtl mixed": "abc \u202e xyz",
}
CAPTIONS_BAD = {"empty": "", "whitespace": " \t\n  ", "over the length bound": "x" * 60_000}


def _fuzz_manifest(folder) -> tuple[str, int, int]:
    """A CSV with every case; returns (path, number of good rows, number of bad rows)."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for name, make in {**UNUSUAL_IMAGES, **BAD_IMAGES}.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(make())
        rows.append({"image": name, "caption": f"an image stored as {name}"})
    ok = os.path.join(folder, "ok.png")
    with open(ok, "wb") as f:
        f.write(_png(Image.new("RGB", (20, 20), (10, 20, 30))))
    rows += [{"image": "ok.png", "caption": c} for c in CAPTIONS_OK.values()]
    rows += [{"image": "ok.png", "caption": c} for c in CAPTIONS_BAD.values()]
    rows.append({"image": "does_not_exist.jpg", "caption": "missing file"})
    rows.append({"image": "", "caption": "no path"})
    path = os.path.join(folder, "fuzz.csv")
    write_csv(path, rows)
    n_bad = len(BAD_IMAGES) + len(CAPTIONS_BAD) + 2
    return path, len(rows) - n_bad, n_bad


TINY_ARCH = os.path.join(os.path.dirname(__file__), os.pardir, "models", "tiny_test_arch.json")


@pytest.fixture(scope="module")
def preprocessing():
    return OpenCLIP(TINY_ARCH, image_size=16).preprocessing


def test_unusual_image_modes_decode_to_faithful_rgb():
    gray16 = np.asarray(decode_image(UNUSUAL_IMAGES["gray16.png"](), "gray16"))
    # Plain convert("RGB") would clip every 16-bit value above 255 to white.
    assert gray16.min() == 0 and 200 < gray16.max() <= 255 and len(np.unique(gray16)) > 100
    assert np.asarray(decode_image(UNUSUAL_IMAGES["float.tiff"](), "float")).mean() == pytest.approx(127, abs=1)
    palette = np.asarray(decode_image(UNUSUAL_IMAGES["palette_alpha.png"](), "palette"))
    assert palette[..., 0].max() == 255  # the red palette entry survives
    cmyk = np.asarray(decode_image(UNUSUAL_IMAGES["cmyk.jpg"](), "cmyk"))
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60  # CMYK (0,255,255,0) is red
    for name, make in UNUSUAL_IMAGES.items():
        img = decode_image(make(), name)
        assert isinstance(img, Image.Image) and img.mode == "RGB", name


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_gives_a_reason_naming_it(name):
    reason = decode_image(BAD_IMAGES[name](), name)
    assert isinstance(reason, str) and name in reason


def test_fuzzed_manifest_skips_and_counts_every_bad_row(tmp_path, preprocessing):
    path, n_good, n_bad = _fuzz_manifest(tmp_path)
    ds = ManifestDataset(path)
    collate = ImageTextCollate(preprocessing.image_transform(train=True), preprocessing.tokenize, max_reasons=100)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["num_skipped"] == n_bad
    assert batch["images"].shape == (n_good, 3, 16, 16) and torch.isfinite(batch["images"]).all()
    assert batch["texts"].shape[0] == n_good  # very long captions truncated to the context length
    reasons = "\n".join(batch["skipped"])
    for name in BAD_IMAGES:
        assert name in reasons
    assert "does_not_exist.jpg" in reasons and reasons.count("empty or missing caption") == len(CAPTIONS_BAD) - 1
    assert "caption of 60,000 characters, above the limit of 10,000" in reasons
    assert all(f"{path} row" in r for r in batch["skipped"])  # each names the file and row


def test_random_bytes_never_crash_decoding():
    # Bit-flipped valid files reach deeper into the decoders than pure noise does.
    rng = random.Random(1)
    seeds = [_png(Image.new("RGB", (24, 24), (rng.randrange(256), 0, 0)), fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP")]
    outcomes = {"decoded": 0, "skipped": 0}
    for trial in range(200):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data))]
        result = decode_image(bytes(data), f"fuzz{trial}")
        assert isinstance(result, (Image.Image, str))
        outcomes["decoded" if isinstance(result, Image.Image) else "skipped"] += 1
    assert outcomes["decoded"] > 0 and outcomes["skipped"] > 0  # both paths were exercised


def _fuzz_shards(folder) -> tuple[str, int, int]:
    ok = _png(Image.new("RGB", (20, 20), (90, 10, 10)))
    samples = [{"__key__": f"u{i}", "png": make(), "txt": f"unusual {name}"} for i, (name, make) in enumerate(UNUSUAL_IMAGES.items())]
    samples += [{"__key__": f"b{i}", "jpg": make(), "txt": f"bad {name}"} for i, (name, make) in enumerate(BAD_IMAGES.items())]
    samples += [{"__key__": f"c{i}", "png": ok, "txt": c} for i, c in enumerate(CAPTIONS_OK.values())]
    samples += [{"__key__": f"e{i}", "png": ok, "txt": c} for i, c in enumerate(CAPTIONS_BAD.values())]
    first = os.path.join(folder, "fuzz-000.tar")
    write_shard_tarfile(first, samples)
    # A second shard cut off in the middle of its second sample.
    whole = os.path.join(folder, "whole.tar")
    write_shard_tarfile(whole, [{"__key__": f"w{i}", "png": ok, "txt": f"whole {i}"} for i in range(4)])
    with tarfile.open(whole) as t:
        cut_at = t.getmember("w1.png").offset_data + 5
    with open(whole, "rb") as f, open(os.path.join(folder, "fuzz-001.tar"), "wb") as g:
        g.write(f.read()[:cut_at])
    os.remove(whole)
    n_good = len(UNUSUAL_IMAGES) + len(CAPTIONS_OK) + 1  # + the intact first sample of the cut shard
    n_bad = len(BAD_IMAGES) + len(CAPTIONS_BAD) + 1  # + the cut sample
    return os.path.join(folder, "fuzz-{000..001}.tar"), n_good, n_bad


def test_fuzzed_shards_skip_and_count(tmp_path, preprocessing):
    pattern, n_good, n_bad = _fuzz_shards(tmp_path)
    items = list(WebDatasetShards(pattern, shuffle_shards=False))
    collate = ImageTextCollate(preprocessing.image_transform(train=False), preprocessing.tokenize, max_reasons=100)
    batch = collate(items)
    assert batch["images"].shape[0] == n_good
    assert batch["num_skipped"] == n_bad == sum(isinstance(s, BadSample) for s in items)
    assert any("fuzz-001.tar" in r for r in batch["skipped"])


def test_fit_on_fuzzed_data_finishes_and_reports_counts(tmp_path, preprocessing, tiny_arch, caplog):
    path, n_good, n_bad = _fuzz_manifest(tmp_path / "data")
    torch.manual_seed(0)
    module = CLIPPretrain(OpenCLIP(tiny_arch, image_size=16), warmup_steps=1, export_dir="")
    dm = ImageTextDataModule(train=ManifestDataset(path), batch_size=4, num_workers=1,
                             preprocessing=module.preprocessing, max_bad_fraction=1.0)
    callback = BadSampleCallback(check_every_n_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        use_distributed_sampler=False, callbacks=[callback])
    trainer.fit(module, datamodule=dm)
    assert trainer.current_epoch == 2
    # Two epochs meet every row twice: the counts are of the file's rows, not of visits.
    assert callback.tracker.skipped == n_bad and callback.tracker.seen == n_good + n_bad
    # Reported when bad rows are first met: the count and the first reasons with file and row.
    reports = [r.getMessage() for r in caplog.records if "rows skipped so far" in r.getMessage()]
    assert len(reports) == 1 and f"{n_bad} of {n_good + n_bad} rows skipped" in reports[0]
    assert f"{path} row" in reports[0]


def test_costly_samples_are_skipped_before_they_cost(tmp_path, monkeypatch):
    """Bounds before the expensive step, each skip naming file and row: a caption past
    MAX_CAPTION_CHARS (before tokenizing; a CSV cell over csv's 128 KiB field limit too), an image
    whose aspect ratio would explode its resize, a tar member over MAX_MEMBER_BYTES (not read)."""
    import csv
    import io
    import tarfile

    from mmkit.data import ManifestDataset, WebDatasetShards
    from mmkit.data.sources import shards as shards_module

    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "ok.png")
    Image.new("L", (1, 30_000)).save(tmp_path / "strip.png")
    rows = [{"image": "ok.png", "caption": "fine"}, {"image": "ok.png", "caption": "x" * 200_000},
            {"image": "strip.png", "caption": "a strip"}]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    ds = ManifestDataset(str(tmp_path / "m.csv"))  # used to fail here: "field larger than field limit"
    assert ds[0]["caption"] == "fine"
    assert isinstance(ds[1], BadSample) and "row 1 (line 3): caption of 200,000 characters, above the limit of 10,000" in ds[1].reason
    assert isinstance(ds[2], BadSample) and "'strip.png' is 1×30000 pixels, an aspect ratio above 20:1" in ds[2].reason

    monkeypatch.setattr(shards_module, "MAX_MEMBER_BYTES", 1000)
    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, format="PNG", compress_level=0)
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in (("a.png", buf.getvalue()), ("a.txt", b"big image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (item,) = list(WebDatasetShards(str(tmp_path / "s.tar")))
    assert isinstance(item, BadSample) and f"a.png is {len(buf.getvalue()):,} bytes, above the limit of 1,000; not read" in item.reason
