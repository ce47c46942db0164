"""Soak test: train the default recipe for a long time and watch speed and memory over time.

    python benchmarks/soak.py [--minutes 20] [--window-minutes 2] [--out benchmarks/_work/soak]

Runs ``mmkit fit --config recipes/default.yaml`` (built-in SyntheticShapes data, validation and
checkpoints as configured there) with ``max_steps`` unlimited and ``max_time`` = ``--minutes``,
plus ``SoakProbe``, a callback that samples, every few steps, the wall clock, the optimizer step,
the trainer process's CPU time, and the resident memory (RSS) of the trainer and of its DataLoader
workers (from /proc; Linux only). The summary splits the run into windows and reports, per window,
steps/s, CPU seconds per step (far less sensitive to other jobs on a shared machine than wall
time) and RSS; the verdict compares the last window with the first one after warm-up.
Appends/replaces the "Soak" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_file import write_section

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SECTION = "## Soak: long CPU training run (issue 6)"


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


try:
    import lightning as L
except ImportError:  # the summariser below does not need Lightning
    L = None

if L is not None:

    class SoakProbe(L.Callback):
        """Appends one JSON line per sample to ``path``: t (s since fit start), step, cpu_s, rss_mb, worker_rss_mb."""

        def __init__(self, path: str, every_n_steps: int = 5) -> None:
            self.path = Path(path)
            self.every = every_n_steps
            self._t0 = 0.0

        def on_fit_start(self, trainer, pl_module) -> None:
            self._t0 = time.perf_counter()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step % self.every:
                return
            pid = os.getpid()
            rec = {
                "t": time.perf_counter() - self._t0, "step": trainer.global_step, "epoch": trainer.current_epoch,
                "cpu_s": time.process_time(), "rss_mb": _rss_mb(pid),
                "worker_rss_mb": sum(_rss_mb(c) for c in _children(pid)),
            }
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def summarise(records: list[dict], window_s: float) -> tuple[list[dict], dict]:
    windows: list[dict] = []
    start = 0.0
    while True:
        part = [r for r in records if start <= r["t"] < start + window_s]
        if len(part) < 2:
            break
        first, last = part[0], part[-1]
        steps = last["step"] - first["step"]
        windows.append({
            "from_min": start / 60, "to_min": (start + window_s) / 60,
            "steps_per_s": steps / (last["t"] - first["t"]),
            "cpu_s_per_step": (last["cpu_s"] - first["cpu_s"]) / max(steps, 1),
            "rss_mb": statistics.median(r["rss_mb"] for r in part),
            "rss_max_mb": max(r["rss_mb"] for r in part),
            "worker_rss_mb": statistics.median(r["worker_rss_mb"] for r in part),
        })
        start += window_s
    if len(windows) < 3:
        raise SystemExit("too few windows: run longer or use smaller --window-minutes")
    base, end = windows[1], windows[-1]  # window 0 is warm-up
    verdict = {
        "rss_growth_pct": 100 * (end["rss_mb"] / base["rss_mb"] - 1),
        "worker_rss_growth_pct": 100 * (end["worker_rss_mb"] / base["worker_rss_mb"] - 1) if base["worker_rss_mb"] else 0.0,
        "steps_per_s_ratio": end["steps_per_s"] / base["steps_per_s"],
        "cpu_per_step_ratio": end["cpu_s_per_step"] / base["cpu_s_per_step"],
        "total_steps": records[-1]["step"], "minutes": records[-1]["t"] / 60,
    }
    return windows, verdict


def markdown(windows: list[dict], verdict: dict, command: str) -> str:
    lines = [
        SECTION, "",
        f"Command: `{command}` (machine: 2 CPU cores, shared with other jobs; torch threads as the recipe leaves them).",
        "",
        "| minutes | steps/s | CPU s / step | trainer RSS MB (median, max) | loader worker RSS MB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for w in windows:
        lines.append(f"| {w['from_min']:.0f}–{w['to_min']:.0f} | {w['steps_per_s']:.2f} | {w['cpu_s_per_step']:.3f} | "
                     f"{w['rss_mb']:.0f}, {w['rss_max_mb']:.0f} | {w['worker_rss_mb']:.0f} |")
    lines += [
        "",
        f"{verdict['total_steps']} optimizer steps in {verdict['minutes']:.1f} min. Last window vs the first after "
        f"warm-up: trainer RSS {verdict['rss_growth_pct']:+.1f} %, worker RSS {verdict['worker_rss_growth_pct']:+.1f} %, "
        f"steps/s × {verdict['steps_per_s_ratio']:.2f}, CPU s/step × {verdict['cpu_per_step_ratio']:.2f}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--window-minutes", type=float, default=2.0)
    ap.add_argument("--out", default=str(HERE / "_work" / "soak"))
    ap.add_argument("--smoke", action="store_true", help="1.5 minutes, 20 s windows, no RESULTS.md write")
    a = ap.parse_args()
    if a.smoke:
        a.minutes, a.window_minutes = 1.5, 1 / 3
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    probe = out / "probe.jsonl"
    seconds = int(a.minutes * 60)
    cmd = [
        str(Path(sys.executable).with_name("mmkit")), "fit", "--config", "recipes/default.yaml",
        # The schedule's horizon lies far beyond what max_time allows: a near-constant LR after warm-up.
        "--trainer.max_steps=1000000", "--trainer.max_epochs=-1",
        f"--trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}",
        f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false", "--test_after_fit=false",
        "--trainer.callbacks+=soak.SoakProbe", f"--trainer.callbacks.path={probe}",
    ]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=str(HERE))
    with open(out / "console.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    records = [json.loads(line) for line in probe.read_text().splitlines() if line]
    windows, verdict = summarise(records, a.window_minutes * 60)
    shown = f"python benchmarks/soak.py --minutes {a.minutes:g} --window-minutes {a.window_minutes:g}"
    text = markdown(windows, verdict, shown)
    print(text)
    (out / "summary.json").write_text(json.dumps({"windows": windows, "verdict": verdict}, indent=1))
    if not a.smoke:
        write_section(HERE / "RESULTS.md", SECTION, text)


if __name__ == "__main__":
    main()
