"""Continual learning on a real image–text stream: fine-tuning vs L2 vs EWC vs online EWC
(issue 4, EWC evidence), on the Noto Color Emoji pairs split into tasks by Unicode block.

    python benchmarks/ewc_emoji.py                   # 4 settings, writes its section of benchmarks/RESULTS.md
    python benchmarks/ewc_emoji.py --smoke           # 2 batches per task, tiny Fisher, no RESULTS.md write

Prerequisite: ``python benchmarks/build_emoji_dataset.py`` (benchmarks/_work/emoji/{train,val}.csv).

Tasks. The emoji file names carry their code point (``u1f600.png``); each pair goes to a task by
the Unicode block of that code point, in code-point order of the blocks' main ranges, so the
split is fixed by the standard and not by anything a model sees:

- ``pictographs``: Miscellaneous Symbols and Pictographs, U+1F300–U+1F5FF (weather, food, animals,
  objects, ...);
- ``faces_transport``: Emoticons U+1F600–U+1F64F and Transport and Map Symbols U+1F680–U+1F6FF;
- ``supplemental``: Supplemental Symbols and Pictographs U+1F900–U+1F9FF and Symbols and
  Pictographs Extended-A U+1FA70–U+1FAFF (the newer emoji);
- ``legacy``: every other code point (Miscellaneous Symbols, Dingbats, arrows, keycaps, enclosed
  alphanumerics and ideographs, ...: mostly the older, symbol-like emoji).

The script writes ``benchmarks/_work/ewc_emoji/{train,val}.csv`` with a ``block`` column and
runs ``mmkit fit`` once per setting on a generated recipe (``config.yaml``: EWCIncremental with
mmkit-tiny on a TaskStreamDataModule split by ``block``). Every setting uses the same
architecture, data, epochs per task, batch size, optimiser, schedule (warmup + cosine restarted at
each task), seed and thread count; only the penalty differs:

- ``finetune``: λ = 0;
- ``l2``: uniform importance (F ≡ 1): L2 to each finished task's anchor (``separate``);
- ``ewc``: empirical per-sample Fisher, one penalty per finished task;
- ``online_ewc``: one running Fisher (γ = ``--gamma``) and the latest anchor.

Both Fisher settings normalise each estimate to mean 1 (``normalize_fisher``), so at the same λ
the L2 and EWC penalties have the same total stiffness and differ only in where it goes. λ was
not tuned on this data: λ = 1 was only checked on a reduced run of recipes/ewc_incremental.yaml,
where the penalty settled at about a third of the contrastive loss while later tasks still
trained. Pick others with ``--ewc-lambda``/``--l2-lambda``, or sweep with ``--lambdas 0.1,1,10``.
The matrix is evaluated on each task's val rows (R@1, R@5: mean of both directions). Writes
``<out>/results.json``, ``<out>/summary.md`` and its own section of benchmarks/RESULTS.md (not
with ``--smoke`` / ``--no-write``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from results_file import write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work"
RESULTS = HERE / "RESULTS.md"
HEADING = "## Continual learning: EWC vs fine-tuning on an emoji task stream (issue 4)"
# (task, [(first, last code point), ...]); "legacy" takes every code point the others do not.
BLOCKS = [
    ("pictographs", [(0x1F300, 0x1F5FF)]),
    ("faces_transport", [(0x1F600, 0x1F64F), (0x1F680, 0x1F6FF)]),
    ("supplemental", [(0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF)]),
    ("legacy", []),
]
TASKS = [name for name, _ in BLOCKS]
SCORES = ("R@1", "R@5")
KEYS = ("avg", "last", "bwt", "forgetting", "fwt")


def block_of(filepath: str) -> str:
    """The task of an emoji image from the code point in its file name (``.../u1f600.png``)."""
    stem = Path(filepath).stem
    if not stem.startswith("u"):
        raise ValueError(f"{filepath}: expected a file name like u1f600.png")
    cp = int(stem[1:].split("_")[0], 16)
    for name, ranges in BLOCKS:
        if any(lo <= cp <= hi for lo, hi in ranges):
            return name
    return "legacy"


def write_manifests(src: Path, out: Path, limit_per_task: int | None = None) -> dict[str, dict[str, int]]:
    """Copy the emoji CSVs with a ``block`` column; returns rows per task and split."""
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {t: {"train": 0, "val": 0} for t in TASKS}
    for split in ("train", "val"):
        with open(src / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        kept = []
        for row in rows:
            task = block_of(row["filepath"])
            if limit_per_task is not None and counts[task][split] >= limit_per_task:
                continue
            counts[task][split] += 1
            kept.append({**row, "block": task})
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["filepath", "title", "block"])
            writer.writeheader()
            writer.writerows(kept)
    return counts


def write_recipe(path: Path, data: Path, a) -> None:
    """The shared recipe; settings differ only by command-line overrides."""
    ds = lambda split: {  # noqa: E731
        "class_path": "mmkit.data.ManifestDataset",
        "init_args": {"path": str(data / f"{split}.csv"), "image_column": "filepath",
                      "caption_column": "title", "label_column": "block"},
    }
    recipe = {
        "seed_everything": a.seed,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true",
            "max_epochs": a.epochs_per_task * len(TASKS), "reload_dataloaders_every_n_epochs": 1,
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "log_every_n_steps": 5,
            "enable_checkpointing": False, "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": "PLACEHOLDER", "name": "", "version": ""}},
        },
        "model": {
            "class_path": "mmkit.EWCIncremental",
            "init_args": {
                "model": {"class_path": "mmkit.models.OpenCLIP", "init_args": {"arch": a.arch}},
                "loss": {"class_path": "mmkit.losses.ClipLoss"},
                "fisher_estimator": "per_sample", "fisher_samples": a.fisher_samples,
                "fisher_batch_size": a.fisher_batch_size, "normalize_fisher": True,
                "lr": a.lr, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1.0e-6,
                "warmup_steps": a.warmup, "grad_clip_norm": 1.0, "export_dir": "",
            },
        },
        "data": {
            "class_path": "mmkit.data.TaskStreamDataModule",
            "init_args": {
                "train": ds("train"), "val": ds("val"), "split_by": "label",
                "task_groups": [[t] for t in TASKS], "epochs_per_task": a.epochs_per_task,
                "batch_size": a.batch_size, "eval_batch_size": 256, "num_workers": 1, "seed": a.seed,
            },
        },
    }
    path.write_text(json.dumps(recipe, indent=2) + "\n")  # JSON is YAML


def settings(a) -> list[tuple[str, float, list[str]]]:
    """(name, λ, overrides) of every run."""
    lambdas = [float(x) for x in a.lambdas.split(",")] if a.lambdas else None
    out = [("finetune", 0.0, ["--model.init_args.ewc_lambda", "0"])]
    for name, default, extra in (
        ("l2", a.l2_lambda, ["--model.init_args.importance", "uniform"]),
        ("ewc", a.ewc_lambda, ["--model.init_args.importance", "fisher"]),
        ("online_ewc", a.ewc_lambda, ["--model.init_args.importance", "fisher", "--model.init_args.mode", "online",
                                      "--model.init_args.gamma", str(a.gamma)]),
    ):
        for lam in lambdas or [default]:
            label = name if lambdas is None else f"{name} λ={lam:g}"
            out.append((label, lam, ["--model.init_args.ewc_lambda", str(lam), *extra]))
    return out


def run(config: Path, run_dir: Path, overrides: list[str], env: dict) -> dict:
    mmkit = str(Path(sys.executable).with_name("mmkit"))
    cmd = [mmkit, "fit", "--config", str(config), *overrides,
           "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir)]
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run_dir.with_suffix(".console.log"), "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {run_dir.with_suffix('.console.log')}")
    summary = json.loads((run_dir / "continual" / "summary.json").read_text())
    matrices = {}
    for score in SCORES:
        with open(run_dir / "continual" / f"{score.replace('@', '_at_')}.csv", newline="") as f:
            rows = list(csv.reader(f))
        matrices[score] = {r[0]: [float(x) for x in r[1:]] for r in rows[1:]}
    return {"summary": summary["summary"], "tasks_done": summary["tasks_done"], "matrices": matrices,
            "wall_s": wall, "command": cmd}


def pct(x: float, signed: bool = False) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def markdown(results: dict, counts: dict, a) -> str:
    lines = ["Tasks (stream order) and pairs per split:", "",
             "| task | code points | train | val |", "| --- | --- | --- | --- |"]
    for name, ranges in BLOCKS:
        cps = ", ".join(f"U+{lo:04X}–U+{hi:04X}" for lo, hi in ranges) or "all others"
        lines.append(f"| {name} | {cps} | {counts[name]['train']} | {counts[name]['val']} |")
    lines += ["", "Summary of the R@1 and R@5 matrices (%, mean of image→text and text→image on each task's val rows; "
              "Avg = mean of the last row, Last = newest task right after training on it, BWT = mean of "
              "R[last, d] − R[d, d] over old tasks, forgetting = mean of best-before-the-end − final over old tasks, "
              "FWT = mean of R[d−1, d] − R[before, d]):", "",
              "| setting | λ | " + " | ".join(f"{k} {s}" for s in SCORES for k in ("Avg", "Last", "BWT", "Forgetting", "FWT"))
              + " | wall s |",
              "| --- | --- | " + " | ".join("---" for _ in SCORES for _ in KEYS) + " | --- |"]
    for name, r in results.items():
        cells = [pct(r["summary"][s][k], signed=k in ("bwt", "fwt")) for s in SCORES for k in KEYS]
        lines.append(f"| {name} | {r['lambda']:g} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} |")
    lines += ["", "R@1 matrices (%; rows: evaluated before training / after each task; columns: tasks):", ""]
    for name, r in results.items():
        lines += [f"*{name}*", "", "| after \\ on | " + " | ".join(TASKS) + " |",
                  "| --- | " + " | ".join("---" for _ in TASKS) + " |"]
        lines += [f"| {label} | " + " | ".join(pct(v) for v in row) + " |" for label, row in r["matrices"]["R@1"].items()]
        lines.append("")
    return "\n".join(lines)


def reading(results: dict, counts: dict) -> str:
    """Factual comparisons only; the noise floor is stated so small gaps are not over-read."""
    ft = results.get("finetune")
    smallest = min(c["val"] for c in counts.values())
    lines = [f"One val pair of the smallest task ({smallest} pairs) is {100 / max(smallest, 1):.1f} R@1 points, so "
             "gaps of a few points on one task are within noise."]
    if ft is None:
        return "\n".join(lines)
    for name, r in results.items():
        if name == "finetune":
            continue
        for s in SCORES:
            f_ft, f = ft["summary"][s]["forgetting"], r["summary"][s]["forgetting"]
            l_ft, l = ft["summary"][s]["last"], r["summary"][s]["last"]
            change = f"{100 * (1 - f / f_ft):.0f} % less" if f_ft > 0 and f < f_ft else "not less"
            lines.append(f"- {name} vs fine-tuning, {s}: forgetting {pct(f)} vs {pct(f_ft)} points ({change}); "
                         f"Last {pct(l)} vs {pct(l_ft)}; Avg {pct(r['summary'][s]['avg'])} vs {pct(ft['summary'][s]['avg'])}.")
    first_rows = {json.dumps(r["matrices"]["R@1"].get(f"after {TASKS[0]}")) for r in results.values()}
    lines.append("- Row `after pictographs` is identical in every setting (no penalty exists during the first task): "
                 + ("yes." if len(first_rows) == 1 else "NO: check determinism."))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=WORK / "emoji", help="folder with the emoji train.csv / val.csv")
    ap.add_argument("--out", type=Path, default=WORK / "ewc_emoji")
    ap.add_argument("--arch", default="mmkit-tiny")
    ap.add_argument("--epochs-per-task", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10, help="warmup steps at the start of each task")
    ap.add_argument("--fisher-samples", type=int, default=256)
    ap.add_argument("--fisher-batch-size", type=int, default=32)
    ap.add_argument("--ewc-lambda", type=float, default=1.0, help="λ of ewc and online_ewc (Fisher normalised to mean 1)")
    ap.add_argument("--l2-lambda", type=float, default=1.0, help="λ of the uniform L2 baseline")
    ap.add_argument("--lambdas", default="", help="comma-separated λ sweep for every regularised setting")
    ap.add_argument("--gamma", type=float, default=0.9, help="decay of the running Fisher in online EWC")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (shared machines: 1)")
    ap.add_argument("--smoke", action="store_true", help="check the harness: 2 batches per task, no RESULTS.md write")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    a = ap.parse_args()
    if not (a.data / "train.csv").exists():
        raise SystemExit(f"{a.data}/train.csv missing: run `python benchmarks/build_emoji_dataset.py` first")
    if a.smoke:
        a.out, a.epochs_per_task, a.batch_size, a.fisher_samples, a.fisher_batch_size = (
            a.out.with_name(a.out.name + "_smoke"), 1, 8, 4, 4)

    started = time.time()
    # smoke: 16 rows per task = 2 batches, so the second step of each task already feels the penalty
    counts = write_manifests(a.data, a.out / "data", limit_per_task=16 if a.smoke else None)
    config = a.out / "config.yaml"
    write_recipe(config, a.out / "data", a)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    results: dict[str, dict] = {}
    for name, lam, overrides in settings(a):
        run_dir = a.out / name.replace(" ", "_").replace("λ=", "lambda")
        print(f"[ewc_emoji] {name}: {run_dir}", flush=True)
        results[name] = {"lambda": lam, **run(config, run_dir, overrides, env)}
        s = results[name]["summary"]["R@1"]
        print(f"[ewc_emoji]   R@1 avg {pct(s['avg'])}  last {pct(s['last'])}  bwt {pct(s['bwt'], True)}  "
              f"forgetting {pct(s['forgetting'])}  ({results[name]['wall_s']:.0f} s)", flush=True)
        assert results[name]["tasks_done"] == len(TASKS), "a run ended before the last task"
    elapsed = (time.time() - started) / 60

    command = "python benchmarks/ewc_emoji.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    table = markdown(results, counts, a)
    (a.out / "results.json").write_text(json.dumps({"counts": counts, "results": results, "args": vars(a)},
                                                   indent=1, default=str) + "\n")
    (a.out / "summary.md").write_text(table + "\n")
    print(table)
    print(reading(results, counts))
    if a.smoke or a.no_write:
        return
    section = "\n".join([
        HEADING, "",
        f"Command (whole run {elapsed:.0f} min; data from `python benchmarks/build_emoji_dataset.py`):", "",
        "```bash", command.strip(), "```", "",
        f"`EWCIncremental` ({a.arch}, from scratch) on a `TaskStreamDataModule` over the Noto Color Emoji pairs split "
        f"into {len(TASKS)} tasks by Unicode block (see the docstring of benchmarks/ewc_emoji.py). Every setting: "
        f"{a.epochs_per_task} epochs per task, batch {a.batch_size}, AdamW lr {a.lr:g} (wd 0.1, betas 0.9/0.98), "
        f"{a.warmup} warmup steps then cosine to 0 restarted at each task, grad-norm clip 1.0, fp32, seed {a.seed}, "
        f"{a.threads} torch thread(s). Fisher: empirical, per-sample shares of the InfoNCE batch gradient, "
        f"{a.fisher_samples} training samples of the finished task in batches of {a.fisher_batch_size}, normalised to "
        f"mean 1; online EWC decays it by γ = {a.gamma:g}. λ was not tuned on this data.", "",
        table, "",
        "**Reading.**", "",
        reading(results, counts), "",
    ])
    write_section(RESULTS, HEADING, section)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
