"""KDStudent on Noto Color Emoji: a small student distilled from a larger mmkit-trained teacher
vs the same student trained from scratch, same data, steps, schedule and seed.

    python benchmarks/kd_emoji.py            # teacher + student runs, replaces its section of RESULTS.md
    python benchmarks/kd_emoji.py --smoke    # 2 steps per run, checks the harness, no RESULTS.md write

Prerequisite: ``python benchmarks/build_emoji_dataset.py`` (benchmarks/_work/emoji/{train,val}.csv).

1. Teacher: ``CLIPPretrain`` on ``--teacher-arch`` (mmkit-small: 96 px, 6+6 layers, 256-d),
   trained from scratch on the train split with benchmarks/emoji_clip.yaml's settings for
   ``--teacher-epochs`` epochs. Its ``last.ckpt`` (with its spec) is the teacher.
2. Students on ``--student-arch`` (mmkit-tiny: 64 px, 3+3 layers, 128-d), ``--epochs`` epochs each:
   ``scratch`` (CLIPPretrain, InfoNCE), then ``KDStudent`` with InfoNCE plus each distillation
   term alone (similarity KL, feature, interactive), all three, and the best combination (the
   terms that beat scratch on their own, when that is neither one term nor all three), and the
   best distilled setting once more fed from pre-computed teacher embeddings (the teacher run
   once with ``mmkit predict``, then not in the training loop).

Every student run uses the same seed: the same initial weights, data order and augmentation (the
teacher and the learned projection are built off the global random stream). Reported: val
Recall@1/5 in both directions (211 emoji, one caption each; chance R@1 = 0.47 %), wall time of
the whole ``mmkit fit`` (start-up, training, the one validation) and the median training
samples/s (``train/samples_per_sec``). The best combination is chosen on the same val split it
is reported on (the emoji set has no third split): read its margin with that in mind.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from results_file import write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work"
DATA = WORK / "emoji"
RECIPE = HERE / "emoji_clip.yaml"
RESULTS = HERE / "RESULTS.md"
HEADING = "## KDStudent: distilled vs from-scratch student on Noto Color Emoji (CPU)"
METRICS = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")
TERMS = ("similarity", "feature", "interactive")
STEPS_PER_EPOCH = 1193 // 64  # drop_last batches of the train split at batch 64
WARMUP_STEPS = 3  # rolling samples/s values left out of the median (loader start-up)


def recipe_config(a, run_dir: Path, arch: str, steps: int, epochs: int) -> dict:
    """benchmarks/emoji_clip.yaml with this run's architecture, length and output folder."""
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["seed_everything"] = a.seed
    trainer = cfg["trainer"]
    trainer.update(max_steps=steps, max_epochs=epochs, default_root_dir=str(run_dir), log_every_n_steps=1)
    trainer["logger"]["init_args"]["save_dir"] = str(run_dir)
    if a.smoke:  # the epoch never ends in 2 steps: validate on steps instead
        trainer.update(check_val_every_n_epoch=None, val_check_interval=steps, limit_val_batches=1)
    else:
        trainer["check_val_every_n_epoch"] = epochs  # validate once, at the end
    data = cfg["data"]["init_args"]
    data.update(batch_size=a.batch_size, seed=a.seed)
    data["train"]["init_args"]["path"] = str(DATA / "train.csv")
    data["val"]["init_args"]["path"] = str(DATA / "val.csv")
    module = cfg["model"]["init_args"]
    module["model"]["init_args"]["arch"] = arch
    module.update(lr=a.lr, weight_decay=a.wd, warmup_steps=min(a.warmup, steps))
    return cfg


def kd_config(a, run_dir: Path, steps: int, teacher_ckpt: Path, weights: dict, store: Path | None = None) -> dict:
    cfg = recipe_config(a, run_dir, a.student_arch, steps, a.epochs)
    cfg["model"]["class_path"] = "mmkit.KDStudent"
    module = cfg["model"]["init_args"]
    module["teacher"] = {
        "class_path": "mmkit.models.Teacher",
        "init_args": {
            "model": {"class_path": "mmkit.models.OpenCLIP", "init_args": {"arch": a.teacher_arch}},
            "checkpoint": str(teacher_ckpt),
        },
    }
    module["loss"] = {
        "class_path": "mmkit.losses.DistillationLoss",
        "init_args": {"contrastive": 1.0, **{t: float(weights.get(t, 0.0)) for t in TERMS},
                      "temperature": a.temperature, "feature_kind": a.feature_kind},
    }
    if store is not None:
        module["teacher"] = None
        module["teacher_embeddings"] = str(store)
    return cfg


def run_mmkit(subcommand: str, cfg: dict, run_dir: Path, env: dict) -> float:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg_path = run_dir.with_suffix(".yaml")
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [str(Path(sys.executable).with_name("mmkit")), subcommand, "--config", str(cfg_path)]
    log = run_dir.with_suffix(".console.log")
    print(f"$ {' '.join(cmd)}\n  (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{subcommand} failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return wall


def read_run(run_dir: Path, wall: float) -> dict:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv", newline="")))
    val = [r for r in rows if r.get("val/i2t_R@1")][-1]
    speed = [float(r["train/samples_per_sec"]) for r in rows if r.get("train/samples_per_sec")]
    speed = speed[WARMUP_STEPS:] or speed
    metrics = {k: float(val[f"val/{k}"]) for k in METRICS}
    metrics["mean_R@1"] = (metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2
    return {"metrics": metrics, "wall_s": wall, "samples_per_sec": statistics.median(speed) if speed else float("nan")}


def describe(weights: dict) -> str:
    on = [t for t in TERMS if weights.get(t)]
    return "InfoNCE" + "".join(f" + {t}" for t in on)


def inputs(arch: str) -> str:
    from mmkit.models.open_clip_model import arch_config

    cfg = arch_config(arch)
    return (f"{cfg['vision_cfg']['image_size']} px images and {cfg['text_cfg']['context_length']}-token captions "
            f"({cfg['embed_dim']}-d)")


def machine() -> str:
    import open_clip
    import torch

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), open_clip {open_clip.__version__}, Python {platform.python_version()}; "
            f"load average {load} at the end")


def markdown(a, teacher: dict, runs: dict[str, dict], best: str, command: str) -> str:
    scratch = runs["scratch"]
    lines = [
        HEADING, "",
        f"Command: `{command}`", "",
        f"Machine: {machine()}.", "",
        f"**Setup.** Teacher: `CLIPPretrain` on `{a.teacher_arch}` trained from scratch on the 1,193 training pairs for "
        f"{a.teacher_epochs} epochs ({a.teacher_epochs * STEPS_PER_EPOCH} steps). Students: `{a.student_arch}`, "
        f"{a.epochs} epochs ({a.epochs * STEPS_PER_EPOCH} steps) each, batch {a.batch_size} (last partial batch dropped), "
        f"AdamW lr {a.lr}, wd {a.wd}, {a.warmup} warmup steps then cosine, grad-norm clip 1.0, fp32, seed {a.seed} "
        f"(same initial student, data order and augmentation in every run). Distillation: temperature {a.temperature}, "
        f"feature distance `{a.feature_kind}` through a learned {a.student_arch}→{a.teacher_arch} projection, every term "
        f"weight 1 next to the student's InfoNCE. Each model gets its own inputs: the teacher {inputs(a.teacher_arch)}, "
        f"the student {inputs(a.student_arch)}. Validation: the 211 val pairs, Recall@K in %.", "",
        "| run | loss | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 | mean R@1 | Δ mean R@1 vs scratch | wall s | train samples/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, r: dict, loss: str, delta: bool = True) -> str:
        m = r["metrics"]
        d = f"{100 * (m['mean_R@1'] - scratch['metrics']['mean_R@1']):+.1f}" if delta else "–"
        cells = [f"{100 * m[k]:.1f}" for k in (*METRICS, "mean_R@1")]
        return f"| {name} | {loss} | {' | '.join(cells)} | {d} | {r['wall_s']:.0f} | {r['samples_per_sec']:.1f} |"

    lines.append(row(f"teacher ({a.teacher_arch})", teacher, "InfoNCE", delta=False))
    for name, r in runs.items():
        label = f"**{name}** (best)" if name == best else name
        lines.append(row(label, r, r["loss"]))
    b = runs[best]
    gain = 100 * (b["metrics"]["mean_R@1"] - scratch["metrics"]["mean_R@1"])
    lines += [
        "",
        f"Best distilled student: `{best}` ({b['loss']}), mean R@1 {100 * b['metrics']['mean_R@1']:.1f} % vs "
        f"{100 * scratch['metrics']['mean_R@1']:.1f} % from scratch ({gain:+.1f} points), at "
        f"{b['wall_s'] / scratch['wall_s']:.2f}× the wall time of the scratch run (the teacher's forward pass runs in "
        "every step). Chosen on the same val split it is reported on; one seed.",
    ]
    if "precomputed" in runs:
        p = runs["precomputed"]
        lines.append(
            f"From pre-computed teacher embeddings (the teacher run once over the train split: {runs['precomputed']['predict_s']:.0f} s "
            f"with `mmkit predict`, not included in its wall time) the same setting trains at {p['samples_per_sec']:.1f} samples/s "
            f"(live teacher {b['samples_per_sec']:.1f}); its teacher targets come from un-augmented images, as the live "
            "teacher's do, so the objective is the same."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-arch", default="mmkit-small")
    ap.add_argument("--student-arch", default="mmkit-tiny")
    ap.add_argument("--teacher-epochs", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=6, help="student epochs (emoji_clip.yaml: 6, 108 steps)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=1.0, help="similarity distillation temperature")
    ap.add_argument("--feature-kind", default="cosine", choices=["cosine", "mse"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch/OMP threads per run (default: torch's)")
    ap.add_argument("--reuse-teacher", action="store_true", help="keep an existing teacher run in the output folder")
    ap.add_argument("--no-precomputed", action="store_true", help="skip the run from pre-computed teacher embeddings")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: benchmarks/_work/kd[_smoke])")
    ap.add_argument("--smoke", action="store_true", help="2 steps per run, no RESULTS.md write")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    a = ap.parse_args()
    if not (DATA / "train.csv").is_file():
        sys.exit(f"{DATA / 'train.csv'} not found: run python benchmarks/build_emoji_dataset.py first")
    out = a.out or WORK / ("kd_smoke" if a.smoke else "kd")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    steps = 2 if a.smoke else a.epochs * STEPS_PER_EPOCH
    teacher_steps = 2 if a.smoke else a.teacher_epochs * STEPS_PER_EPOCH

    # 1. The teacher, once.
    teacher_dir = out / "teacher"
    teacher_ckpt = teacher_dir / "checkpoints" / "last.ckpt"
    if a.reuse_teacher and teacher_ckpt.is_file():
        teacher = json.loads((out / "teacher.json").read_text())
    else:
        cfg = recipe_config(a, teacher_dir, a.teacher_arch, teacher_steps, a.teacher_epochs)
        cfg["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]
        teacher = read_run(teacher_dir, run_mmkit("fit", cfg, teacher_dir, env))
        (out / "teacher.json").write_text(json.dumps(teacher))
    print(f"teacher: {teacher['metrics']}", flush=True)

    # 2. The students.
    runs: dict[str, dict] = {}

    def student(name: str, cfg: dict, loss: str) -> dict:
        run_dir = out / name
        runs[name] = {**read_run(run_dir, run_mmkit("fit", cfg, run_dir, env)), "loss": loss}
        print(f"{name}: {runs[name]['metrics']} ({runs[name]['wall_s']:.0f} s)", flush=True)
        return runs[name]

    student("scratch", recipe_config(a, out / "scratch", a.student_arch, steps, a.epochs), "InfoNCE (CLIPPretrain)")
    settings: dict[str, dict] = {}
    for term in TERMS:
        settings[f"kd_{term}"] = {term: 1.0}
    settings["kd_all"] = {t: 1.0 for t in TERMS}
    for name, weights in settings.items():
        student(name, kd_config(a, out / name, steps, teacher_ckpt, weights), describe(weights))
    base = runs["scratch"]["metrics"]["mean_R@1"]
    helpful = [t for t in TERMS if runs[f"kd_{t}"]["metrics"]["mean_R@1"] > base]
    if 1 < len(helpful) < len(TERMS):
        weights = {t: 1.0 for t in helpful}
        settings["kd_best"] = weights
        student("kd_best", kd_config(a, out / "kd_best", steps, teacher_ckpt, weights), describe(weights))
    best = max(settings, key=lambda n: runs[n]["metrics"]["mean_R@1"])

    if not a.no_precomputed:
        # The teacher once over the train split (its eval transform, as in live training), then the
        # best setting without it.
        store_dir = out / "teacher_embeddings"
        cfg = kd_config(a, store_dir, steps, teacher_ckpt, settings[best])
        cfg["model"]["init_args"]["predict_with"] = "teacher"
        cfg["data"]["init_args"]["predict"] = cfg["data"]["init_args"]["train"]
        cfg["trainer"].pop("callbacks", None)
        cfg["eval_dir"] = str(store_dir)  # predict writes into a folder of its own: this one (run_mmkit empties it)
        predict_s = run_mmkit("predict", cfg, store_dir, env)
        cfg = kd_config(a, out / "precomputed", steps, teacher_ckpt, settings[best], store=store_dir / "embeddings")
        student("precomputed", cfg, describe(settings[best]) + ", pre-computed teacher")["predict_s"] = predict_s

    command = "python benchmarks/kd_emoji.py " + " ".join(sys.argv[1:])
    section = markdown(a, teacher, runs, best, command.strip())
    (out / "results.json").write_text(json.dumps({"teacher": teacher, "runs": runs, "best": best}, indent=2))
    (out / "summary.md").write_text(section)
    print(section)
    if a.smoke or a.no_write:
        print(f"(not written to {RESULTS}: {'--smoke' if a.smoke else '--no-write'})")
    else:
        write_section(RESULTS, HEADING, section)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
