"""MetricAlign (VSE sum of hinges; VSE++ max violation after a sum-of-hinges warm-up) vs
CLIPPretrain (InfoNCE) on Noto Color Emoji: Recall@1/5 in both directions.

    python benchmarks/metric_align_emoji.py [--seeds 0 1 2] [--threads 1] [--sum-warmup-steps 36]
    python benchmarks/metric_align_emoji.py --smoke      # 2 steps per setting, RESULTS.md untouched

Prerequisite: ``python benchmarks/build_emoji_dataset.py`` (writes benchmarks/_work/emoji/).

Every run is ``mmkit fit`` on ``benchmarks/emoji_clip.yaml`` with only the ``model:`` class and
its loss changed, so all settings share the model (mmkit-tiny, trained from scratch), data, step
budget (108 steps of batch 64), AdamW settings, schedule, seed and the final validation on the
whole val split. No setting was tuned for its loss (same learning rate for all). Recall is read
from each run's ``metrics.csv``. Writes ``<out>/results.json`` and replaces this script's own
section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work"
BASE_RECIPE = HERE / "emoji_clip.yaml"
RESULTS = HERE / "RESULTS.md"
HEADING = "## MetricAlign (hinge losses) vs InfoNCE on Noto Color Emoji (CPU)"
METRICS = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")


def settings(a) -> dict[str, dict]:
    """Label and ``model:`` section of each compared setting."""
    ranking = "mmkit.losses.RankingLoss"
    return {
        "infonce": {"label": "CLIPPretrain, InfoNCE", "class_path": "mmkit.CLIPPretrain",
                    "loss": {"class_path": "mmkit.losses.ClipLoss"}},
        "hinge_sum": {"label": f"MetricAlign, sum of hinges (margin {a.margin})", "class_path": "mmkit.MetricAlign",
                      "loss": {"class_path": ranking, "init_args": {"margin": a.margin, "negatives": "all"}}},
        "hinge_max": {"label": f"MetricAlign, max violation after {a.sum_warmup_steps} sum steps (margin {a.margin})",
                      "class_path": "mmkit.MetricAlign",
                      "loss": {"class_path": ranking, "init_args": {
                          "margin": a.margin, "negatives": "hardest", "sum_warmup_steps": a.sum_warmup_steps}}},
    }


def write_config(setting: dict, path: Path) -> None:
    """emoji_clip.yaml with the model class and loss of ``setting`` (everything else as is)."""
    cfg = yaml.safe_load(BASE_RECIPE.read_text())
    model = copy.deepcopy(cfg["model"])
    model["class_path"] = setting["class_path"]
    model["init_args"]["loss"] = setting["loss"]
    cfg["model"] = model
    path.write_text(f"# Written by benchmarks/metric_align_emoji.py from {BASE_RECIPE.name}\n" + yaml.safe_dump(cfg, sort_keys=False))


def last_value(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) not in (None, "")]
    return float(vals[-1]) if vals else None


def run_one(a, name: str, config: Path, run_dir: Path, seed: int, env: dict) -> dict:
    mmkit = str(Path(sys.executable).with_name("mmkit"))
    cmd = [
        mmkit, "fit", "--config", str(config),
        "--data.init_args.train.init_args.path", str(Path(a.data) / "train.csv"),
        "--data.init_args.val.init_args.path", str(Path(a.data) / "val.csv"),
        "--data.init_args.seed", str(seed), "--seed_everything", str(seed),
        "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false",
    ]
    if a.smoke:
        cmd += ["--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                "--trainer.check_val_every_n_epoch", "1", "--trainer.limit_val_batches", "2",
                "--data.init_args.batch_size", "16", "--model.init_args.warmup_steps", "1"]
    log = run_dir.with_suffix(".console.log")
    print(f"$ {' '.join(cmd)}\n  (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} seed {seed} failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    rows = list(csv.DictReader(open(run_dir / "metrics.csv", newline="")))
    val = [r for r in rows if r.get("val/i2t_R@1")]
    if not val:
        sys.exit(f"{name} seed {seed}: no validation metrics in {run_dir / 'metrics.csv'}")
    return {
        "metrics": {k: float(val[-1][f"val/{k}"]) for k in METRICS},
        "active_hinges_end": last_value(rows, "train/ranking_active"),
        "steps": int(max(float(r["step"]) for r in rows if r.get("step"))) + 1,
        "wall_s": wall, "seed": seed, "log_dir": str(run_dir), "command": cmd,
    }


def fmt(vals: list[float], scale: float = 100.0) -> str:
    med = statistics.median(vals) * scale
    if len(vals) == 1:
        return f"{med:.1f}"
    return f"{med:.1f} ({min(vals) * scale:.1f}–{max(vals) * scale:.1f})"


def markdown(a, runs: dict[str, list[dict]], config: dict, command: str) -> str:
    names = settings(a)
    seeds = config["seeds"]
    lines = [
        HEADING, "",
        "Question: with the same model, data and step budget, do MetricAlign's hinge losses (VSE sum of hinges, VSE++ max",
        "violation) align images and captions better or worse than CLIPPretrain's InfoNCE?", "",
        f"Command (whole run: {config['total_wall_min']:.1f} min):", "", "```bash", command, "```", "",
        "Every run is `mmkit fit` on `benchmarks/emoji_clip.yaml` (the CLIPPretrain-vs-open_clip set-up above: mmkit-tiny from",
        "scratch, 1,193 train / 211 val pairs, batch 64 with drop_last, 108 steps, AdamW lr 1e-3 wd 0.1, 20 warm-up steps then",
        "cosine, grad clip 1.0, fp32) with only the `model:` class and its loss changed; the per-run configs are written to",
        f"`{Path(config['out']).relative_to(REPO) if Path(config['out']).is_relative_to(REPO) else config['out']}/<setting>.yaml`.",
        f"Torch threads: {config['threads']}. Seeds {', '.join(map(str, seeds))} (data order and initial weights; the same for every setting).",
        "No setting was tuned for its loss: the learning rate and schedule are InfoNCE's.", "",
        "| setting | i2t R@1 % | i2t R@5 % | t2i R@1 % | t2i R@5 % | active hinges at the end | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rs in runs.items():
        active = [r["active_hinges_end"] for r in rs if r["active_hinges_end"] is not None]
        lines.append(
            f"| {names[name]['label']} | " + " | ".join(fmt([r["metrics"][k] for r in rs]) for k in METRICS)
            + f" | {f'{statistics.median(active):.2f}' if active else '–'} | {statistics.median(r['wall_s'] for r in rs):.0f} |"
        )
    n_val = config["n_val"]
    lines += [
        "",
        f"Recall over the {n_val} val pairs (chance R@1 = {100 / n_val:.2f} %, R@5 = {500 / n_val:.2f} %), median over the seeds with",
        "min–max in brackets. 'active hinges' is the fraction of non-zero hinge terms among the selected negatives at the last",
        "training step (`train/ranking_active`).", "",
        "Recall per seed (i2t R@1 / i2t R@5 / t2i R@1 / t2i R@5, %):", "",
        "| seed | " + " | ".join(names[n]["label"] for n in runs) + " |",
        "| --- |" + " --- |" * len(runs),
    ]
    for i, seed in enumerate(seeds):
        cells = [" / ".join(f"{100 * rs[i]['metrics'][k]:.1f}" for k in METRICS) for rs in runs.values()]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", "**Reading** (generated from the medians; one val pair is "
              f"{100 / n_val:.2f} points):", ""]
    med = {n: {k: statistics.median(r["metrics"][k] for r in rs) for k in METRICS} for n, rs in runs.items()}
    for k in METRICS:
        p = med["infonce"][k]
        se = 100 * math.sqrt(max(p * (1 - p), 1e-12) / n_val)
        diffs = ", ".join(f"{names[n]['label']} {100 * (med[n][k] - p):+.1f}" for n in runs if n != "infonce")
        lines.append(f"- {k}: vs InfoNCE ({100 * p:.1f} %, binomial s.e. ≈ {se:.1f} points): {diffs}.")
    better = [n for n in runs if n != "infonce" and all(med[n][k] > med["infonce"][k] for k in METRICS)]
    worse = [n for n in runs if n != "infonce" and all(med[n][k] < med["infonce"][k] for k in METRICS)]
    if better:
        lines.append(f"- Above InfoNCE on all four recalls: {', '.join(names[n]['label'] for n in better)}.")
    if worse:
        lines.append(f"- Below InfoNCE on all four recalls (does not help here): {', '.join(names[n]['label'] for n in worse)}.")
    if not better and not worse:
        lines.append("- No hinge setting is above (or below) InfoNCE on all four recalls.")
    lines.append("- Differences within about two standard errors are not evidence either way.")
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` with this script's section replaced (or appended when absent)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == HEADING), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(WORK / "emoji"))
    ap.add_argument("--out", default=None, help="run folder (default benchmarks/_work/metric_align_emoji[_smoke])")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP oversubscription on a shared machine)")
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--sum-warmup-steps", type=int, default=36, help="max-violation setting: sum of hinges for these steps first")
    ap.add_argument("--only", nargs="+", default=None, help="run only these settings (no RESULTS.md write)")
    ap.add_argument("--smoke", action="store_true", help="2 steps per setting, one seed, no RESULTS.md write")
    a = ap.parse_args(argv)
    command = "python benchmarks/metric_align_emoji.py " + " ".join(argv if argv is not None else sys.argv[1:])

    data = Path(a.data).resolve()
    for f in ("train.csv", "val.csv"):
        if not (data / f).exists():
            sys.exit(f"{data / f} missing: run benchmarks/build_emoji_dataset.py first")
    a.data = str(data)
    if a.smoke:
        a.seeds = a.seeds[:1]
        a.sum_warmup_steps = 1  # the switch to max violation happens at step 1 of 2
    out = Path(a.out or WORK / ("metric_align_emoji_smoke" if a.smoke else "metric_align_emoji")).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with open(data / "val.csv", newline="", encoding="utf-8") as f:
        n_val = sum(1 for _ in csv.DictReader(f))
    config = {k: v for k, v in vars(a).items()}
    config.update(out=str(out), n_val=n_val)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")

    chosen = {n: s for n, s in settings(a).items() if a.only is None or n in a.only}
    runs: dict[str, list[dict]] = {n: [] for n in chosen}
    start = time.perf_counter()
    for seed in a.seeds:
        for name, setting in chosen.items():
            cfg_path = out / f"{name}.yaml"
            if not cfg_path.exists():
                write_config(setting, cfg_path)
            res = run_one(a, name, cfg_path, out / f"{name}_seed{seed}", seed, env)
            runs[name].append(res)
            print(f"{name} seed {seed}: {json.dumps({k: res[k] for k in ('metrics', 'active_hinges_end', 'steps', 'wall_s')})}", flush=True)
            (out / "results.json").write_text(json.dumps({"config": config, "runs": runs}, indent=1))
    config["total_wall_min"] = (time.perf_counter() - start) / 60

    if "infonce" not in runs:
        return
    md = markdown(a, runs, config, command)
    (out / "summary.md").write_text(md)
    print(md)
    if a.smoke or a.only:
        print("(smoke / partial run: benchmarks/RESULTS.md not written)")
        return
    RESULTS.write_text(replace_section(RESULTS.read_text(), md))
    print(f"wrote the section '{HEADING[3:]}' of {RESULTS}")


if __name__ == "__main__":
    main()
