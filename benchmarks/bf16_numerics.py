"""bf16-mixed against fp32 on the Noto Color Emoji pairs (issue 17, item 2): the same seed, data
and steps trained three times by ``mmkit fit`` (benchmarks/emoji_clip.yaml) — fp32, bf16-mixed,
and bf16-mixed with the tiled loss (``ClipLoss(tile_size=...)``) — and the training-loss curves
compared step by step.

    python benchmarks/bf16_numerics.py [--steps 300] [--batch-size 32] [--tile 8] [--band 0.03] [--seeds 0,1,2]

Needs benchmarks/build_emoji_dataset.py first. Every setting is trained from several seeds (each its own
initial weights and data order) and compared with the same seed's fp32 run: a bias of a setting shows in
every seed with one sign, path noise with both. Reports, per run: the mean relative gap of its loss to fp32's in each
100-step window (a systematic shift) and the largest single gap (trajectory noise: two runs that
round differently take different paths), each curve smoothed over 20 steps; the final smoothed
loss, the learnt temperature, and validation R@1 every 100 steps. A bf16 setting is within the band
when every window's gap, averaged over the seeds, is within ``--band``. Writes its section of benchmarks/RESULTS.md
unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import write_section  # noqa: E402

WORK = HERE / "_work"
HEADING = "## bf16-mixed vs fp32: loss curves on the emoji set (issue 17, item 2)"
SMOOTH = 20


def fit(run: Path, steps: int, batch: int, precision: str, tile: int | None, threads: int,
        seed: int = 0) -> dict[int, dict]:
    mmkit = str(Path(sys.executable).with_name("mmkit"))
    data = WORK / "emoji"
    cmd = [
        mmkit, "fit", "--config", str(HERE / "emoji_clip.yaml"),
        "--trainer.precision", precision, "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1",
        "--trainer.val_check_interval", "100", "--trainer.check_val_every_n_epoch", "null",
        "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
        "--data.init_args.train.init_args.path", str(data / "train.csv"),
        "--data.init_args.val.init_args.path", str(data / "val.csv"),
        "--data.init_args.batch_size", str(batch), "--seed_everything", str(seed),
    ]
    if tile:
        cmd += ["--model.init_args.loss.init_args.tile_size", str(tile)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    log = run.with_suffix(".log")
    run.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode:
            sys.exit(f"run failed, see {log}")
    rows: dict[int, dict] = {}
    with open(run / "metrics.csv", newline="") as f:
        for r in csv.DictReader(f):
            rows.setdefault(int(r["step"]), {}).update({k: float(v) for k, v in r.items() if v and k != "step"})
    return rows


def smoothed(rows: dict[int, dict], key: str = "train/loss") -> dict[int, float]:
    steps = sorted(s for s in rows if key in rows[s])
    values = [rows[s][key] for s in steps]
    return {steps[i]: sum(values[i - SMOOTH + 1:i + 1]) / SMOOTH for i in range(SMOOTH - 1, len(steps))}


def val_r1(rows: dict[int, dict]) -> str:
    points = [(s, r) for s, r in sorted(rows.items()) if "val/i2t_R@1" in r]
    return ", ".join(f"{s + 1}: {100 * r['val/i2t_R@1']:.1f}/{100 * r['val/t2i_R@1']:.1f}" for s, r in points)


def window_gaps(curve: dict[int, float], ref: dict[int, float], steps: int) -> tuple[list[float], float]:
    """Mean relative gap of a run's smoothed loss to the (smoothed) reference curve in each 100-step
    window, and the largest single gap."""
    gaps = {s: (curve[s] - ref[s]) / ref[s] for s in sorted(set(curve) & set(ref))}
    windows = [[g for s, g in gaps.items() if lo <= s < lo + 100] for lo in range(0, steps, 100)]
    return [sum(w) / len(w) for w in windows if w], max(map(abs, gaps.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tile", type=int, default=8, help="tile size of the tiled-loss run (< batch: several tiles)")
    ap.add_argument("--band", type=float, default=0.03, help="largest mean relative gap per 100-step window accepted")
    ap.add_argument("--seeds", default="0,1,2", help="each seed trains fp32, bf16 and bf16 tiled from its own init")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    if not (WORK / "emoji" / "train.csv").exists():
        sys.exit("benchmarks/_work/emoji missing: run benchmarks/build_emoji_dataset.py first")
    t0 = time.perf_counter()
    out = WORK / "bf16_numerics"
    seeds = [int(x) for x in a.seeds.split(",")]
    tiled = f"bf16-mixed, tiled loss (tile {a.tile})"
    settings = {"fp32": ("32-true", None, "fp32"), "bf16-mixed": ("bf16-mixed", None, "bf16"),
                tiled: ("bf16-mixed", a.tile, "bf16_tiled")}
    runs = {(seed, name): fit(out / f"seed{seed}" / folder, a.steps, a.batch_size, precision, tile, a.threads, seed=seed)
            for seed in seeds for name, (precision, tile, folder) in settings.items()}
    lines = [
        HEADING, "",
        "Command: `python benchmarks/bf16_numerics.py " + " ".join(sys.argv[1:]) + "`"
        f" ({(time.perf_counter() - t0) / 60:.0f} min)", "",
        f"mmkit-tiny at 64 px, batch {a.batch_size}, {a.steps} steps, benchmarks/emoji_clip.yaml otherwise "
        f"(AdamW 1e-3, warmup 20, grad clip 1.0). Each seed ({', '.join(map(str, seeds))}) gives its own initial "
        "weights and data order, trained three times: fp32, bf16-mixed, bf16-mixed with the tiled loss. Gaps: (loss − "
        f"the same seed's fp32 loss) / fp32 loss, both smoothed over {SMOOTH} steps, as the mean over each 100-step "
        "window and the largest single |gap|. Band: the mean over seeds of every window's gap within "
        f"±{100 * a.band:.0f} % (a bias shows as a gap of one sign in every seed; rounding that only changes the path "
        "gives gaps of both signs). Validation R@1 % (i2t/t2i) over the 211 val pairs every 100 steps.", "",
        "| seed | run | mean gap to fp32 % by window | largest gap % | final loss (smoothed) | final temperature "
        "| val R@1 % i2t/t2i by step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    by_setting: dict[str, list[list[float]]] = {}
    curves = {key: smoothed(rows) for key, rows in runs.items()}
    for (seed, name), rows in runs.items():
        final = curves[(seed, name)]
        means, largest = window_gaps(final, curves[(seed, "fp32")], a.steps)
        if name != "fp32":
            by_setting.setdefault(name, []).append(means)
        last = max(s for s in rows if "train/temperature" in rows[s])
        lines.append(f"| {seed} | {name} | {', '.join(f'{100 * m:+.2f}' for m in means)} | {100 * largest:.2f} | "
                     f"{final[max(final)]:.4f} | {rows[last]['train/temperature']:.4f} | {val_r1(rows)} |")
    lines += ["", "| run | mean gap over seeds % by window (min … max) | within band |", "| --- | --- | --- |"]
    for name, per_seed in by_setting.items():
        windows = list(zip(*per_seed))
        means = [sum(w) / len(w) for w in windows]
        spread = ", ".join(f"{100 * m:+.2f} ({100 * min(w):+.1f} … {100 * max(w):+.1f})" for m, w in zip(means, windows))
        within = "yes" if all(abs(m) <= a.band for m in means) else "**no**"
        lines.append(f"| {name} | {spread} | {within} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if not a.no_write:
        write_section(HERE / "RESULTS.md", HEADING, section)


if __name__ == "__main__":
    main()
