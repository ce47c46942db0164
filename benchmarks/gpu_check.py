"""One-GPU check of mmkit's strategies: DDP vs DeepSpeed ZeRO-2 vs FSDP2, bf16, ViT-B/32.

    bash benchmarks/gpu_check.sh                 # all strategies, writes its section of RESULTS.md
    bash benchmarks/gpu_check.sh --smoke         # 3 steps each, no RESULTS.md write
    python benchmarks/gpu_check.py --help

Each strategy trains ``CLIPPretrain`` on open_clip's ViT-B-32 (random init, no download) for a
few steps in its own process (so peak-memory counters and process groups start clean) on one
synthetic batch that already lives on the GPU: the numbers are the training step itself (forward,
gathered InfoNCE, backward, optimizer, mmkit's manual step), not data loading. Reported per
strategy: samples/s over the timed steps (after warm-up; CUDA synchronised at both ends), the
median step time, and peak allocated / reserved GPU memory over the whole run. With one GPU the
sharding strategies cannot save memory by sharding; what this shows is their overhead against
DDP and that each runs mmkit's module end to end on a real GPU. Fails at once, with a message,
when no CUDA GPU is visible.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_file import write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
HEADING = "## GPU check: DDP vs DeepSpeed ZeRO-2 vs FSDP2 (one GPU, bf16, ViT-B/32)"
STRATEGIES = ("ddp", "deepspeed_stage_2", "fsdp2")
NO_GPU_EXIT = 3


def require_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False): this check needs one GPU. "
            "Run it on a GPU machine: bash benchmarks/gpu_check.sh",
            file=sys.stderr,
        )
        sys.exit(NO_GPU_EXIT)


# -- one strategy, in its own process -----------------------------------------------------------
def _strategy(name: str):
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy()
    if name == "deepspeed_stage_2":  # mmkit's DeepSpeedStrategy (mmkit's modules refuse Lightning's own)
        from mmkit.parallel.deepspeed_strategy import DeepSpeedStrategy

        return DeepSpeedStrategy(config=str(ROOT / "recipes" / "deepspeed" / "zero2.json"))
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")


def run_one(name: str, arch: str, batch: int, steps: int, warmup: int) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from mmkit import CLIPPretrain
    from mmkit.losses import ClipLoss
    from mmkit.models import OpenCLIP
    from mmkit.models.open_clip_model import arch_config

    cfg = arch_config(arch)
    size, ctx = cfg["vision_cfg"].get("image_size", 224), cfg["text_cfg"].get("context_length", 77)
    vocab = cfg["text_cfg"].get("vocab_size", 49408)

    class OneBatch(IterableDataset):
        """The same batch, made once on the GPU, for every step."""

        def __iter__(self):
            g = torch.Generator(device="cuda").manual_seed(0)
            b = {
                "images": torch.randn(batch, 3, size, size, device="cuda", generator=g),
                "texts": torch.randint(1, vocab, (batch, ctx), device="cuda", generator=g),
            }
            b["image_id"] = b["index"] = torch.arange(batch, device="cuda")
            for _ in range(warmup + steps):
                yield b

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)

    torch.manual_seed(0)
    module = CLIPPretrain(
        OpenCLIP(arch), loss=ClipLoss(), lr=5e-4, warmup_steps=10, grad_clip_norm=1.0, export_dir=""
    )
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=_strategy(name),
        precision="bf16-mixed",
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[clock],
    )
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=DataLoader(OneBatch(), batch_size=None))
    timed = clock.times[warmup:]
    return {
        "strategy": name,
        "steps": len(timed),
        "samples_per_s": batch * len(timed) / sum(timed),
        "median_step_s": statistics.median(timed),
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "fit_s": time.perf_counter() - start,
    }


# -- the contrastive loss alone on the GPU: tiled vs plain -----------------------------------------
LOSS_IMPLS = ("tiled", "plain", "open_clip")


def run_losses(batches: list[int], dim: int, tile: int, repeats: int = 3) -> list[dict]:
    """Forward + backward of each loss at each global batch, fp32, in this one process.

    Extra memory = peak allocated during the timed calls minus what was allocated once the
    features existed (so it includes the two feature gradients, 2·B·d·4 bytes, for every
    implementation). A run that does not fit is reported as out of memory, not retried.
    """
    import torch
    import torch.nn.functional as F

    from mmkit.losses import ClipLoss

    def make(impl: str):
        if impl == "open_clip":
            from open_clip.loss import ClipLoss as OpenClipLoss

            oc = OpenClipLoss()
            return lambda x, y, s: oc(x, y, s)
        ours = ClipLoss(tile_size=tile) if impl == "tiled" else ClipLoss()
        return lambda x, y, s: ours(x, y, s)["contrastive_loss"]

    rows = []
    log_scale = torch.tensor(2.6593, device="cuda", requires_grad=True)
    for batch in batches:
        for impl in LOSS_IMPLS:
            fn = make(impl)
            small = [F.normalize(torch.randn(256, dim, device="cuda"), dim=1).requires_grad_() for _ in range(2)]
            fn(*small, log_scale.exp()).backward()  # kernels and workspaces are not the loss's memory
            del small
            row = {"impl": impl, "batch": batch}
            try:
                g = torch.Generator(device="cuda").manual_seed(0)
                x, y = (F.normalize(torch.randn(batch, dim, device="cuda", generator=g), dim=1).requires_grad_()
                        for _ in range(2))
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(repeats):
                    x.grad = y.grad = log_scale.grad = None
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    value = fn(x, y, log_scale.exp())
                    value.backward()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                row.update(status="ok", seconds=statistics.median(times), loss=value.item(),
                           extra_gib=(torch.cuda.max_memory_allocated() - base) / 2**30)
            except torch.cuda.OutOfMemoryError as err:
                row.update(status="oom", detail=str(err).splitlines()[0][:100])
            x = y = value = None
            torch.cuda.empty_cache()
            rows.append(row)
            print("GPU_CHECK_LOSS " + json.dumps(row), flush=True)
    return rows


def loss_table(rows: list[dict]) -> str:
    lines = [
        "| global batch | implementation | fwd+bwd (s) | extra memory (GiB) | vs plain: memory | vs plain: time | loss |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    plain = {r["batch"]: r for r in rows if r["impl"] == "plain" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['batch']} | {r['impl']} | out of memory | | | | |")
            continue
        p = plain.get(r["batch"])
        mem = f"{r['extra_gib'] / p['extra_gib']:.3f}×" if p else "plain does not fit"
        tim = f"{r['seconds'] / p['seconds']:.2f}×" if p else "–"
        lines.append(f"| {r['batch']} | {r['impl']} | {r['seconds']:.4f} | {r['extra_gib']:.2f} | {mem} | {tim} | "
                     f"{r['loss']:.5f} |")
    return "\n".join(lines)


# -- driver -------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["strategy"] == "ddp" and "error" not in r), None)
    lines = [
        "| strategy | samples/s | vs DDP | median step (s) | peak alloc (GiB) | peak reserved (GiB) | loss after last step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | failed: {r['error']} | | | | | |")
            continue
        rel = f"{r['samples_per_s'] / base['samples_per_s']:.2f}×" if base else "–"
        lines.append(
            f"| {r['strategy']} | {r['samples_per_s']:.1f} | {rel} | {r['median_step_s']:.4f} | "
            f"{r['peak_alloc_gib']:.2f} | {r['peak_reserved_gib']:.2f} | {r['final_loss']:.4f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    import torch

    parts = [f"GPU: {torch.cuda.get_device_name(0)}", f"torch {torch.__version__}"]
    for pkg in ("lightning", "deepspeed", "open_clip"):
        try:
            parts.append(f"{pkg} {__import__(pkg).__version__}")
        except Exception:  # a missing package shows up as a failed row instead
            pass
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random init)")
    ap.add_argument("--batch", type=int, default=256, help="batch size on the one GPU")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per strategy")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    ap.add_argument("--smoke", action="store_true", help="3 timed steps after 1 warm-up, no RESULTS.md write")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    ap.add_argument("--per-strategy-timeout", type=int, default=600, help="seconds before a strategy's run is stopped")
    ap.add_argument("--loss-batches", type=int, nargs="*", default=[32768, 65536, 131072],
                    help="global batches for the loss-alone table (tiled vs plain vs open_clip); none to skip")
    ap.add_argument("--loss-dim", type=int, default=512)
    ap.add_argument("--tile", type=int, default=4096, help="tile size of mmkit's tiled loss in that table")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    require_gpu()
    if args.smoke:
        args.steps, args.warmup = 3, 1

    if args.worker == "loss":
        run_losses(args.loss_batches, args.loss_dim, args.tile)
        return
    if args.worker:
        result = run_one(args.worker, args.arch, args.batch, args.steps, args.warmup)
        print("GPU_CHECK_RESULT " + json.dumps(result), flush=True)
        return

    rows, t0 = [], time.perf_counter()
    for name in args.strategies:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--arch", args.arch,
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        print(f"gpu_check: {name} ...", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.per_strategy_timeout, cwd=ROOT)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("GPU_CHECK_RESULT ")]
            if proc.returncode == 0 and found:
                rows.append(json.loads(found[-1].split(" ", 1)[1]))
            else:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
                print("\n".join(tail), file=sys.stderr)
                last = tail[-1] if tail else f"exit {proc.returncode}"
                rows.append({"strategy": name, "error": last[:160].replace("|", "/")})
        except subprocess.TimeoutExpired:
            rows.append({"strategy": name, "error": f"no result within {args.per_strategy_timeout}s"})
        print(f"gpu_check: {name} done ({time.perf_counter() - t0:.0f}s so far)", flush=True)

    loss_rows: list[dict] = []
    if args.loss_batches:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "loss", "--loss-dim", str(args.loss_dim),
               "--tile", str(args.tile), "--loss-batches", *map(str, args.loss_batches)]
        print("gpu_check: loss alone ...", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.per_strategy_timeout, cwd=ROOT)
            out = proc.stdout
            if proc.returncode != 0:
                print("\n".join((proc.stderr or "").strip().splitlines()[-15:]), file=sys.stderr)
        except subprocess.TimeoutExpired as err:
            out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            print(f"gpu_check: loss table stopped after {args.per_strategy_timeout}s", file=sys.stderr)
        loss_rows = [json.loads(ln.split(" ", 1)[1]) for ln in out.splitlines() if ln.startswith("GPU_CHECK_LOSS ")]

    result_table = table(rows)
    print()
    print(result_table)
    if loss_rows:
        print()
        print(loss_table(loss_rows))
    command = "bash benchmarks/gpu_check.sh " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    failed = any("error" in r for r in rows)
    if args.smoke or args.no_write:
        sys.exit(1 if failed else 0)
    section = "\n".join([
        HEADING, "",
        "Command (written by the script):", "", "```bash", command.strip(), "```", "",
        f"Machine: {machine()}. Batch {args.batch} on one GPU, bf16-mixed, open_clip `{args.arch}` (random init), "
        f"one synthetic batch resident on the GPU; {args.warmup} warm-up steps, then {args.steps} timed steps "
        "(CUDA synchronised around each). Peak memory is over the whole run. Each strategy ran in its own process.",
        "", result_table, "",
    ])
    if loss_rows:
        section += "\n".join([
            "", f"The contrastive loss alone on the same GPU, forward + backward, fp32, d={args.loss_dim}, "
            f"mmkit tiled (tile {args.tile}) vs mmkit plain vs open_clip `ClipLoss`; extra memory is peak allocated "
            "minus the features (it includes their gradients); median of 3 calls after a warm-up.",
            "", loss_table(loss_rows), "",
        ])
    write_section(RESULTS, HEADING, section)
    print(f"\nwrote {RESULTS}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
