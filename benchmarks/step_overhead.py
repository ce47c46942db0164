"""Per-step overhead of mmkit's training step (issue 17, item 4): the same model, batches,
optimizer and loss trained by ``CLIPPretrain`` under a Lightning Trainer with the callbacks the
CLI adds, and by a hand-written loop; the difference per step is what mmkit and Lightning cost.

    python benchmarks/step_overhead.py [--steps 120] [--batch-size 16] [--image-size 32] [--profile]

The batches are collated once, before either run, and held in memory, so data loading is not in
the numbers; both runs use torch's fused AdamW with mmkit's parameter groups, grad-norm clipping,
the logit-scale clamp and a per-step learning rate. The step time is the median interval between
consecutive batch ends after ``--skip`` steps. ``--profile`` adds a cProfile of the mmkit run
listing where its Python time goes outside torch's operators. ``--write`` records the result in
benchmarks/RESULTS.md (run on an idle machine).
"""

from __future__ import annotations

import argparse
import cProfile
import copy
import io
import math
import pstats
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import write_section  # noqa: E402

from mmkit import CLIPPretrain  # noqa: E402
from mmkit.callbacks.bad_samples import BadSampleCallback  # noqa: E402
from mmkit.callbacks.progress_log import ProgressLog  # noqa: E402
from mmkit.callbacks.resume_state import ResumeState  # noqa: E402
from mmkit.callbacks.throughput import Throughput  # noqa: E402
from mmkit.data import ImageTextDataModule, SyntheticShapes  # noqa: E402
from mmkit.losses import ClipLoss  # noqa: E402
from mmkit.models import OpenCLIP  # noqa: E402
from mmkit.training.optim import param_groups, warmup_cosine_factor  # noqa: E402

HEADING = "## Per-step overhead: mmkit's training step vs a hand-written loop (issue 17, item 4)"


class BatchEnds(L.Callback):
    """Wall-clock time of every training batch end."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())


class InMemoryBatches:
    """Collated batches replayed from memory (a plain list would be taken for several loaders)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def median_step_ms(ends: list[float], skip: int) -> float:
    gaps = [b - a for a, b in zip(ends[skip:], ends[skip + 1:])]
    return 1000 * statistics.median(gaps)


def batches(module: CLIPPretrain, n: int, batch_size: int, image_size: int) -> list[dict]:
    dm = ImageTextDataModule(train=SyntheticShapes(n * batch_size, seed=0, image_size=image_size),
                             batch_size=batch_size, num_workers=0, train_augment=False)
    dm.set_preprocessing(module.preprocessing)
    return list(dm.train_dataloader())


def make_module(image_size: int) -> CLIPPretrain:
    torch.manual_seed(0)
    module = CLIPPretrain(OpenCLIP("mmkit-tiny", image_size=image_size), loss=ClipLoss(), lr=1e-3,
                          warmup_steps=10, export_dir="")
    module.configure_model()
    return module


def run_mmkit(module: CLIPPretrain, data: list[dict], steps: int, log_every: int, out: Path,
              profile: bool) -> tuple[list[float], str]:
    ends = BatchEnds()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, log_every_n_steps=log_every, default_root_dir=out,
        logger=L.pytorch.loggers.CSVLogger(out, name="", version=""), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[Throughput(), BadSampleCallback(), ResumeState(), ProgressLog(enabled=False), ends],
    )
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    trainer.fit(module, train_dataloaders=InMemoryBatches(data))
    if prof:
        prof.disable()
    return ends.ends, _python_time(prof) if prof else ""


def _python_time(prof: cProfile.Profile) -> str:
    """The functions of mmkit and Lightning with the most own time (torch's operators are C)."""
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s)
    stats.sort_stats("tottime").print_stats(r"(mmkit|lightning|torchmetrics)", 15)
    stats.sort_stats("cumulative").print_stats(r"(mmkit|lightning|torchmetrics)", 40)
    return s.getvalue()


def run_hand_loop(model, data: list[dict], steps: int, lr: float, warmup: int, clip: float,
                  max_scale: float) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine_factor(s, warmup, steps, 0.0))
    ends = []
    for step in range(steps):
        batch = data[step % len(data)]
        image = F.normalize(model.encode_image(batch["images"]), dim=-1)
        text = F.normalize(model.encode_text(batch["texts"]), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        labels = torch.arange(logits.shape[0])
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(max_scale))
        sched.step()
        ends.append(time.perf_counter())
    return ends


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--log-every", type=int, default=10, help="trainer.log_every_n_steps (the demo recipe's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--write", action="store_true", help="record in benchmarks/RESULTS.md")
    ap.add_argument("--out", default=str(HERE / "_work" / "step_overhead"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = batches(make_module(a.image_size), 16, a.batch_size, a.image_size)
    rows = []
    for r in range(a.repeats):
        module = make_module(a.image_size)
        hand_model = copy.deepcopy(module.model.clip)  # the same open_clip model and initial weights
        order = ("mmkit", "hand") if r % 2 == 0 else ("hand", "mmkit")
        res = {}
        for who in order:
            if who == "mmkit":
                ends, profile = run_mmkit(module, data * (a.steps // len(data) + 1), a.steps, a.log_every,
                                          Path(a.out) / f"r{r}", a.profile and r == 0)
                res["mmkit"] = median_step_ms(ends, a.skip)
                if profile:
                    print(profile)
            else:
                ends = run_hand_loop(hand_model, data, a.steps, 1e-3, 10, 1.0, 100.0)
                res["hand"] = median_step_ms(ends, a.skip)
        rows.append(res)
        print(f"repeat {r}: mmkit {res['mmkit']:.2f} ms/step, hand loop {res['hand']:.2f} ms/step, "
              f"overhead {res['mmkit'] - res['hand']:.2f} ms ({res['mmkit'] / res['hand']:.3f}x)", flush=True)
    mm = statistics.median(r["mmkit"] for r in rows)
    hand = statistics.median(r["hand"] for r in rows)
    summary = (f"batch {a.batch_size}, {a.image_size} px, mmkit-tiny, {a.steps} steps ({a.skip} skipped), "
               f"log_every_n_steps {a.log_every}, {a.threads} threads, {a.repeats} repeats (median): "
               f"mmkit {mm:.2f} ms/step, hand loop {hand:.2f} ms/step, overhead {mm - hand:.2f} ms per step "
               f"(hand loop / mmkit = {hand / mm:.3f})")
    print(summary)
    if a.write:
        cmd = "python benchmarks/step_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(HERE / "RESULTS.md", HEADING, f"{HEADING}\n\nCommand: `{cmd}`\n\n{summary}\n")


if __name__ == "__main__":
    main()
