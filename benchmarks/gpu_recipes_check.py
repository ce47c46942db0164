"""One-GPU check that every technique's shipped recipe runs under DDP, FSDP2 and DeepSpeed ZeRO-2
by command-line overrides alone (accelerator, strategy, bf16), a few steps each.

    python benchmarks/gpu_recipes_check.py                  # all recipes x strategies, in parallel
    python benchmarks/gpu_recipes_check.py --recipes default --strategies ddp fsdp2

Each (recipe, strategy) is one ``mmkit fit`` process with its own rendezvous port; they run side by
side on the one GPU (the recipes' models are small). Prints a table (ran or failed with the last
error line, wall seconds, steps, last logged train/loss) and writes it as JSON to --out. This is a
"does it run on a real GPU in bf16" check, not a benchmark: speed is in gpu_check.py. Needs a GPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("default", "metric_align", "align_gan", "kd_student", "ewc_incremental")
STRATEGIES = ("ddp", "fsdp2", "mmkit_deepspeed_stage_2")


def command(recipe: str, strategy: str, out: Path, accelerator: str, precision: str) -> list[str]:
    cmd = [
        sys.executable, "-m", "mmkit.cli", "fit", "--config", f"recipes/{recipe}.yaml",
        "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.strategy", strategy,
        "--trainer.precision", precision, "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.callbacks", "[]", "--model.init_args.export_dir", str(out / "export"), "--test_after_fit", "false",
    ]
    if recipe == "ewc_incremental":  # tasks are epochs: keep max_epochs so that task 2 trains under the penalty
        cmd += ["--trainer.max_steps", "-1"]
    else:
        cmd += ["--trainer.max_steps", "6", "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "1"]
    if recipe == "align_gan" and "deepspeed" in strategy:
        cmd += ["--model.init_args.mode", "gradient_reversal"]  # DeepSpeed takes one optimizer
    return cmd


def last_loss(out: Path) -> tuple[int, float | None]:
    rows = []
    for path in out.rglob("metrics.csv"):
        with path.open() as f:
            rows += [r for r in csv.DictReader(f) if r.get("train/loss")]
    if not rows:
        return 0, None
    return len(rows), float(rows[-1]["train/loss"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_recipes_check"))
    ap.add_argument("--out", type=Path, default=None, help="JSON summary path")
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--port", type=int, default=29600, help="first rendezvous port (each run takes its own)")
    ap.add_argument("--accelerator", default="gpu", help="cpu: check the overrides here (not DeepSpeed)")
    ap.add_argument("--precision", default="bf16-mixed")
    args = ap.parse_args()

    jobs, port = [], args.port
    for recipe in args.recipes:
        for strategy in args.strategies:
            out = args.work / f"{recipe}__{strategy}"
            out.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
            port += 7
            log = (out / "console.log").open("w")
            proc = subprocess.Popen(command(recipe, strategy, out, args.accelerator, args.precision), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            jobs.append((recipe, strategy, out, proc, time.perf_counter()))
    rows = []
    for recipe, strategy, out, proc, start in jobs:
        try:
            rc = proc.wait(timeout=max(1, args.timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        seconds = time.perf_counter() - start
        steps, loss = last_loss(out)
        tail = [ln for ln in (out / "console.log").read_text(errors="replace").splitlines() if ln.strip()]
        error = None if rc == 0 else (tail[-1][:200] if tail else f"exit {rc}")
        rows.append({"recipe": recipe, "strategy": strategy, "ok": rc == 0, "seconds": round(seconds, 1),
                     "logged_steps": steps, "last_loss": loss, "error": error})
        if rc != 0:
            print(f"--- {recipe} / {strategy}: exit {rc}; last lines:\n" + "\n".join(tail[-12:]), flush=True)

    print("\n| recipe | strategy | result | wall (s) | logged steps | last train/loss |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        result = "ran" if r["ok"] else f"failed: {r['error']}".replace("|", "/")
        loss = f"{r['last_loss']:.4f}" if r["last_loss"] is not None else "–"
        print(f"| {r['recipe']} | {r['strategy']} | {result} | {r['seconds']} | {r['logged_steps']} | {loss} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
