"""A minimal hand-written PyTorch CLIP training loop: the baseline of benchmark 2 (issue 5).

    python benchmarks/hand_written_loop.py --train-csv T.csv --val-csv V.csv --out-dir DIR \\
        [--arch mmkit-tiny --batch-size 64 --epochs 6 --lr 1e-3 --wd 0.1 --warmup 20 --seed 0 ...]

clip_vs_open_clip.py runs it next to ``mmkit fit`` and open_clip_train, in mmkit's venv, with the
same settings as open_clip_train: the open_clip model of an mmkit preset (pretrained=None, seeded
exactly as open_clip_train seeds before model creation, so the initial weights are the same),
open_clip's train/eval transforms and tokenizer, a plain CSV Dataset and DataLoader (shuffled with
the seed, drop_last, ``--workers`` workers), AdamW with open_clip_train's no-decay groups, warmup +
cosine set per step, grad-norm clipping, logit-scale clamp to ln(100), fp32 (or bf16 autocast with
``--precision bf16``; ``--compile`` compiles the model as open_clip_train's ``--torchcompile``). Nothing else: no
framework, no logging library, no callbacks; that is the point of the baseline.

Writes ``DIR/results.json`` (final val retrieval R@1/R@5 both ways, per-step samples/s) and
``DIR/checkpoint.pt`` (rolling, once per epoch, as the other two trainers do), plus the
bench_timing record at ``--timing-json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_timing import LoopTimer  # noqa: E402

PRESETS = HERE.parent / "mmkit" / "models" / "presets"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-csv", required=True)
    ap.add_argument("--val-csv", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--timing-json", default=None)
    ap.add_argument("--image-key", default="filepath")
    ap.add_argument("--caption-key", default="title")
    ap.add_argument("--arch", default="mmkit-tiny")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.98)
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: autocast of the forward and loss (open_clip_train's amp_bf16)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (open_clip_train's --torchcompile)")
    return ap.parse_args(argv)


class CsvPairs(Dataset):
    """Image–caption rows of a CSV; returns (image tensor, token ids) like open_clip's CsvDataset."""

    def __init__(self, path: str, image_key: str, caption_key: str, transform, tokenizer) -> None:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        self.images = [r[image_key] for r in rows]
        self.captions = [r[caption_key] for r in rows]
        self.transform, self.tokenizer = transform, tokenizer

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = Image.open(self.images[i]).convert("RGB")
        return self.transform(image), self.tokenizer([self.captions[i]])[0]


def param_groups(model, wd: float) -> list[dict]:
    """open_clip_train's split: gains, biases and the logit scale are not decayed."""
    exempt = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": wd},
    ]


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine to 0 (open_clip_train's ``cosine_lr``)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * base


def clip_loss(out: dict) -> torch.Tensor:
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def retrieval(model, loader) -> dict[str, float]:
    """R@1/R@5 image→text and text→image; row i's caption is the match of image i."""
    model.eval()
    images, texts = [], []
    with torch.no_grad():
        for x, t in loader:
            images.append(model.encode_image(x, normalize=True))
            texts.append(model.encode_text(t, normalize=True))
    sim = torch.cat(images) @ torch.cat(texts).T
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        rank = (s > s.diag()[:, None]).sum(1)  # items scored above the true match
        for k in (1, 5):
            out[f"{name}_R@{k}"] = float((rank < k).float().mean())
    return out


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    open_clip.add_model_config(PRESETS)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = LoopTimer(a.timing_json or str(out_dir / "timing.json"))

    # open_clip_train's random_seed(seed, 0) right before create_model_and_transforms
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    random.seed(a.seed)
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(a.arch, pretrained=None, output_dict=True)
    timer.init(model)
    tokenizer = open_clip.get_tokenizer(a.arch)

    train = CsvPairs(a.train_csv, a.image_key, a.caption_key, train_tf, tokenizer)
    val = CsvPairs(a.val_csv, a.image_key, a.caption_key, eval_tf, tokenizer)
    loader = DataLoader(train, batch_size=a.batch_size, shuffle=True, drop_last=True, num_workers=a.workers,
                        generator=torch.Generator().manual_seed(a.seed))
    opt = torch.optim.AdamW(param_groups(model, a.wd), lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps)
    # Compiled as open_clip_train does it: the whole model, called through the compiled wrapper.
    forward = torch.compile(model) if a.compile else model
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16")  # noqa: E731
    steps_per_epoch = len(loader)
    total = steps_per_epoch * a.epochs
    per_step = []
    start = time.perf_counter()

    for epoch in range(a.epochs):
        model.train()
        timer.epoch_start()
        last = time.perf_counter()
        for i, (images, texts) in enumerate(loader):
            lr = lr_at(epoch * steps_per_epoch + i, a.lr, a.warmup, total)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = clip_loss(forward(images, texts))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            timer.batch_end(images.shape[0])
            now = time.perf_counter()
            rate = images.shape[0] / (now - last)  # like open_clip's per-step samples/s (data time included)
            value = loss.item()  # open_clip_train also reads the loss every step with --log-every-n-steps 1
            per_step.append({"epoch": epoch, "step": i + 1, "samples_per_sec": rate, "loss": value, "lr": lr})
            print(f"epoch {epoch} step {i + 1}/{steps_per_epoch} loss {value:.4f} lr {lr:.2e} {rate:.1f} samples/s",
                  flush=True)
            last = now
        timer.epoch_end()
        torch.save({"epoch": epoch + 1, "state_dict": model.state_dict(), "optimizer": opt.state_dict()},
                   out_dir / "checkpoint.pt")

    val_loader = DataLoader(val, batch_size=a.batch_size, shuffle=False, num_workers=a.workers)
    metrics = retrieval(model, val_loader)
    print(f"val {json.dumps(metrics)}", flush=True)
    (out_dir / "results.json").write_text(json.dumps(
        {"metrics": metrics, "per_step": per_step, "steps": len(per_step), "wall_s": time.perf_counter() - start,
         "args": vars(a)}, indent=1))


if __name__ == "__main__":
    main()
