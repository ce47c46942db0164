"""CLIPPretrain (mmkit fit) vs open_clip's own trainer (open_clip_train) vs a minimal hand-written
PyTorch loop (hand_written_loop.py) on the same data: issue 5, benchmark 2 (training throughput).

    python benchmarks/clip_vs_open_clip.py [--epochs 6] [--repeats 3] [--threads 1] ...
    python benchmarks/clip_vs_open_clip.py --smoke     # 2 tiny epochs of each trainer, no RESULTS.md write
    python benchmarks/clip_vs_open_clip.py --settings fp32,bf16,compile,compile_bf16   # issue 17's matrix

Prerequisites (both write under the git-ignored benchmarks/_work/):
    python benchmarks/build_emoji_dataset.py          # Noto Color Emoji pairs, train/val CSVs
    bash benchmarks/setup_open_clip_venv.sh           # open_clip_torch[training] in its own venv

All three trainers get the same architecture (an mmkit preset), CSVs, batch size, number of optimizer
steps (E epochs of floor(n_train / B) batches: open_clip drops the last partial batch, so mmkit
uses ``drop_last: true``), warmup + cosine schedule stepped per batch, AdamW lr / wd / betas /
eps, grad-norm clip, fp32, one DataLoader worker, seed, and the same torch thread count
(OMP_NUM_THREADS/MKL_NUM_THREADS and torch.set_num_threads). They run one after the other,
rotating which goes first, each ``--repeats`` times. Writes ``<out>/results.json``,
``<out>/summary.md`` and its own section of benchmarks/RESULTS.md (not with --smoke / --no-write).
The hand-written loop uses open_clip_train's weight-decay groups; mmkit's groups also exempt the
embedding tables (see the older RESULTS.md section): a small difference in the work of AdamW.

Speed is reported several ways: (1) the same epoch timer on all (bench_timing.py: wall time
from epoch start, before the loader workers start, to the last optimizer step), median over
epochs after the first; (2) each trainer's own per-step number (open_clip's "samples/s" log
line with --log-every-n-steps 1; mmkit's ``train/samples_per_sec``, a rolling mean over 20
steps; the hand loop's per-step rate, timed like open_clip's), median after the first 3 steps of
each epoch; (3) CPU milliseconds per training sample
over the same epochs, of the trainer's main thread and of the whole trainer process, which
other jobs on a shared machine disturb far less than wall time; (4) wall and CPU time of the
whole run (start-up, training, validation, checkpoints; CPU includes the loader workers).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from results_file import write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work"
RECIPE = HERE / "emoji_clip.yaml"
RESULTS = HERE / "RESULTS.md"
HEADING = "## Training throughput: mmkit vs open_clip_train vs a hand-written loop (issue 5, benchmark 2)"
MATRIX_HEADING = "## Training throughput by setting: {fp32, bf16, compile, compile + bf16} × three trainers (issue 17)"
TRAINERS = ("open_clip_train", "mmkit", "hand_loop")
LABELS = {"open_clip_train": "open_clip_train", "mmkit": "mmkit CLIPPretrain", "hand_loop": "hand-written loop"}
METRICS = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")
OC_KEYS = {"i2t": "image_to_text", "t2i": "text_to_image"}
STEP_WARMUP = 3  # per-epoch steps left out of the per-step medians (loader start-up)
# Each trainer's own flags for a setting (issue 17): bf16 autocast, torch.compile, or both.
SETTINGS = {
    "fp32": {"open_clip_train": ["--precision", "fp32"], "mmkit": [], "hand_loop": []},
    "bf16": {"open_clip_train": ["--precision", "amp_bf16"], "mmkit": ["--trainer.precision", "bf16-mixed"],
             "hand_loop": ["--precision", "bf16"]},
    "compile": {"open_clip_train": ["--precision", "fp32", "--torchcompile"],
                "mmkit": ["--model.init_args.compile", "true"], "hand_loop": ["--compile"]},
    "compile_bf16": {"open_clip_train": ["--precision", "amp_bf16", "--torchcompile"],
                     "mmkit": ["--trainer.precision", "bf16-mixed", "--model.init_args.compile", "true"],
                     "hand_loop": ["--precision", "bf16", "--compile"]},
}


def count_rows(path: Path) -> int:
    with open(path, newline="", encoding="utf-8") as f:
        return sum(1 for _ in csv.DictReader(f))


def run_logged(cmd: list[str], env: dict, log: Path, cwd: Path) -> float:
    print(f"$ {' '.join(cmd)}\n  (log: {log})", flush=True)
    start, ru0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    # CPU of the whole run: the trainer, its loader workers and everything else it started.
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"wall_s": wall, "run_cpu_s": cpu}


def epoch_stats(timing: dict) -> dict:
    """Medians over epochs (after the first, which also pays one-off warm-up) of wall-clock
    samples/s and of CPU milliseconds per sample (trainer process, and its main thread)."""
    epochs = timing["epochs"][1:] if len(timing["epochs"]) > 1 else timing["epochs"]
    med = lambda f: statistics.median(f(e) for e in epochs)  # noqa: E731
    return {
        "epoch_samples_per_sec": med(lambda e: e["samples"] / e["seconds"]),
        "process_cpu_ms_per_sample": med(lambda e: 1e3 * e["process_cpu_s"] / e["samples"]),
        "main_thread_cpu_ms_per_sample": med(lambda e: 1e3 * e["main_thread_cpu_s"] / e["samples"]),
        "epochs": timing["epochs"],
    }


def run_open_clip(a, env, data: Path, run_dir: Path, steps_per_epoch: int, seed: int) -> dict:
    name = run_dir.name
    logs = run_dir.parent
    timing = run_dir.with_suffix(".timing.json")
    cmd = [
        a.oc_python, str(HERE / "open_clip_train_launcher.py"),
        "--threads", str(a.threads), "--timing-json", str(timing), "--",
        "--train-data", str(data / "train.csv"), "--val-data", str(data / "val.csv"),
        "--dataset-type", "csv", "--csv-separator", ",",
        "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--model", a.arch, "--batch-size", str(a.batch_size), "--epochs", str(a.epochs),
        "--lr", str(a.lr), "--wd", str(a.wd), "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--warmup", str(a.warmup), "--lr-scheduler", "cosine", "--grad-clip-norm", str(a.grad_clip),
        "--seed", str(seed), "--workers", "1", "--device", "cpu", *SETTINGS[a.setting]["open_clip_train"],
        "--logs", str(logs), "--name", name, "--log-every-n-steps", "1",
        "--val-frequency", str(a.epochs),
        # one rolling checkpoint per epoch, as Lightning's default ModelCheckpoint keeps
        "--save-frequency", "1", "--delete-previous-checkpoint",
    ]
    usage = run_logged(cmd, env, run_dir.with_suffix(".console.log"), REPO)
    results = [json.loads(l) for l in (run_dir / "checkpoints" / "results.jsonl").read_text().splitlines() if l]
    final = results[-1]
    metrics = {k: float(final[f"{OC_KEYS[k[:3]]}_R@{k[-1]}"]) for k in METRICS}
    # "Train Epoch: 3 [ 128/1193 (11%)] Data (t): 0.012 Batch (t): 1.234, 51.8634/s, ..."
    pat = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+.*?Batch \(t\): [\d.]+, ([\d.]+)/s")
    per_step = []
    for line in (run_dir / "out.log").read_text().splitlines():
        m = pat.search(line)
        if m and int(m.group(2)) // a.batch_size > STEP_WARMUP:
            per_step.append(float(m.group(3)))
    timing_rec = json.loads(timing.read_text())
    return {
        "metrics": metrics, "own_samples_per_sec": median_or_nan(per_step), **epoch_stats(timing_rec), **usage,
        "init": timing_rec["init"], "steps": len(timing_rec["epochs"]) * steps_per_epoch,
        "log_dir": str(run_dir), "command": cmd,
    }


def run_mmkit(a, env, data: Path, run_dir: Path, steps_per_epoch: int, seed: int) -> dict:
    timing = run_dir.with_suffix(".timing.json")
    total = steps_per_epoch * a.epochs
    mmkit = str(Path(sys.executable).with_name("mmkit"))
    cmd = [
        mmkit, "fit", "--config", str(RECIPE),
        "--model.init_args.model.init_args.arch", a.arch,
        "--model.init_args.lr", str(a.lr), "--model.init_args.weight_decay", str(a.wd),
        "--model.init_args.warmup_steps", str(a.warmup), "--model.init_args.grad_clip_norm", str(a.grad_clip),
        "--data.init_args.train.init_args.path", str(data / "train.csv"),
        "--data.init_args.val.init_args.path", str(data / "val.csv"),
        "--data.init_args.batch_size", str(a.batch_size), "--data.init_args.seed", str(seed),
        "--seed_everything", str(seed),
        "--trainer.max_steps", str(total), "--trainer.max_epochs", str(a.epochs),
        "--trainer.check_val_every_n_epoch", str(a.epochs),
        "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.callbacks+=bench_timing.EpochTimer", "--trainer.callbacks.path", str(timing),
        *SETTINGS[a.setting]["mmkit"], *a.mmkit_arg,
    ]
    env = dict(env, PYTHONPATH=str(HERE))  # so the recipe can name bench_timing.EpochTimer
    usage = run_logged(cmd, env, run_dir.with_suffix(".console.log"), REPO)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv", newline="")))
    val = [r for r in rows if r.get("val/i2t_R@1")][-1]
    metrics = {k: float(val[f"val/{k}"]) for k in METRICS}
    per_step = [float(r["train/samples_per_sec"]) for r in rows if r.get("train/samples_per_sec")]
    timing_rec = json.loads(timing.read_text())
    return {
        "metrics": metrics, "own_samples_per_sec": median_or_nan(per_step), **epoch_stats(timing_rec), **usage,
        "init": timing_rec["init"], "steps": sum(e["batches"] for e in timing_rec["epochs"]),
        "log_dir": str(run_dir), "command": cmd,
    }


def run_hand_loop(a, env, data: Path, run_dir: Path, steps_per_epoch: int, seed: int) -> dict:
    timing = run_dir.with_suffix(".timing.json")
    cmd = [
        sys.executable, str(HERE / "hand_written_loop.py"),
        "--train-csv", str(data / "train.csv"), "--val-csv", str(data / "val.csv"),
        "--out-dir", str(run_dir), "--timing-json", str(timing),
        "--arch", a.arch, "--batch-size", str(a.batch_size), "--epochs", str(a.epochs),
        "--lr", str(a.lr), "--wd", str(a.wd), "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--warmup", str(a.warmup), "--grad-clip", str(a.grad_clip), "--seed", str(seed),
        "--workers", "1", "--threads", str(a.threads), *SETTINGS[a.setting]["hand_loop"],
    ]
    usage = run_logged(cmd, env, run_dir.with_suffix(".console.log"), REPO)
    rec = json.loads((run_dir / "results.json").read_text())
    per_step = [s["samples_per_sec"] for s in rec["per_step"] if s["step"] > STEP_WARMUP]
    timing_rec = json.loads(timing.read_text())
    return {
        "metrics": rec["metrics"], "own_samples_per_sec": median_or_nan(per_step), **epoch_stats(timing_rec),
        **usage, "init": timing_rec["init"], "steps": rec["steps"], "log_dir": str(run_dir), "command": cmd,
    }


def median_or_nan(values: list[float]) -> float:
    # a --smoke epoch may have no step after the warm-up ones
    return statistics.median(values) if values else float("nan")


SPEED = ("epoch_samples_per_sec", "own_samples_per_sec", "main_thread_cpu_ms_per_sample",
         "process_cpu_ms_per_sample", "wall_s", "non_train_s", "run_cpu_s")
TARGETS = (("open_clip_train", 1.0), ("hand_loop", 0.97))  # mmkit samples/s ≥ factor × this trainer's


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in (*METRICS, *SPEED):
        vals = [r["metrics"][key] if key in METRICS else r[key] for r in runs]
        out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}
    return out


def fmt(s: dict, scale: float = 1, digits: int = 1) -> str:
    med, lo, hi = s["median"] * scale, s["min"] * scale, s["max"] * scale
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})" if len(s["values"]) > 1 else f"{med:.{digits}f}"


def init_check(runs: dict[str, list[dict]]) -> str:
    """Whether every trainer started from the same weights for each seed (checksums of bench_timing)."""
    by_seed: dict[int, dict[str, tuple]] = {}
    for name, rs in runs.items():
        for r in rs:
            c = r["init"]
            by_seed.setdefault(r["seed"], {})[name] = (c["num_params"], c["sum"], c["sum_sq"])
    bad = [seed for seed, sums in by_seed.items() if len(set(sums.values())) > 1]
    if not bad:
        return (f"Initial weights: identical checksums (parameter count, sum, sum of squares) across "
                f"{', '.join(LABELS[n] for n in runs)} for every seed.")
    return f"Initial weights: **checksums differ** for seed(s) {bad}: {json.dumps({s: by_seed[s] for s in bad})}."


def markdown(summary: dict, config: dict) -> str:
    mm = summary["mmkit"]
    lines = [
        "| trainer | i2t R@1 % | i2t R@5 % | t2i R@1 % | t2i R@5 % | samples/s, epoch timer | samples/s, own log "
        "| main-thread CPU ms/sample | process CPU ms/sample | run wall s | of which not training s | run CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in TRAINERS:
        s = summary[name]
        lines.append(
            f"| {LABELS[name]} | " + " | ".join(fmt(s[k], 100) for k in METRICS) + " | "
            + " | ".join(fmt(s[k], 1, 0 if k in ("wall_s", "non_train_s", "run_cpu_s") else 1) for k in SPEED) + " |"
        )
    for name, short in (("open_clip_train", "open_clip"), ("hand_loop", "hand loop")):
        other = summary[name]
        ratio = lambda k: f"{mm[k]['median'] / other[k]['median']:.2f}" if other[k]["median"] else "–"  # noqa: E731
        lines.append(f"| ratio mmkit / {short} | " + " | ".join(ratio(k) for k in (*METRICS, *SPEED)) + " |")
    lines.append("")
    lines.append(
        f"Recall over the {config['n_val']} val pairs (chance R@1 = {100 / config['n_val']:.2f} %, R@5 = "
        f"{500 / config['n_val']:.2f} %); median of {config['repeats']} runs each, min–max in brackets; "
        f"{config['total_steps']} optimizer steps of batch {config['batch_size']} "
        f"({config['epochs']} epochs × {config['steps_per_epoch']}), {config['threads']} torch thread(s), "
        f"seeds {config['seed']}–{config['seed'] + config['repeats'] - 1} (run r of every trainer uses seed + r)."
    )
    return "\n".join(lines) + "\n"


def verdict(summary: dict) -> str:
    mm = summary["mmkit"]["epoch_samples_per_sec"]["median"]
    parts = []
    for name, factor in TARGETS:
        ratio = mm / summary[name]["epoch_samples_per_sec"]["median"]
        ok = "met" if ratio >= factor else "**missed**"
        parts.append(f"mmkit / {LABELS[name]} = {ratio:.2f} (target ≥ {factor:g}: {ok})")
    cpu = {n: summary[n]["main_thread_cpu_ms_per_sample"]["median"] for n in ("open_clip_train", "hand_loop")}
    mm_cpu = summary["mmkit"]["main_thread_cpu_ms_per_sample"]["median"]
    return (
        "Targets (samples/s by the epoch timer, medians): " + "; ".join(parts) + ". "
        f"Main-thread CPU per sample, which other jobs disturb far less than wall time: mmkit {mm_cpu:.1f} ms, "
        f"open_clip_train {cpu['open_clip_train']:.1f} ms, hand-written loop {cpu['hand_loop']:.1f} ms "
        f"(samples/s-equivalent ratios {cpu['open_clip_train'] / mm_cpu:.2f} and {cpu['hand_loop'] / mm_cpu:.2f})."
    )


def machine_info(oc_python: str | None) -> dict:
    """CPU, cores, load and library versions, for the RESULTS.md section (shared by data_loading.py)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load": "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())}
    for pkg in ("torch", "open_clip_torch", "lightning"):
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = "n/a"
    if oc_python and Path(oc_python).exists():
        code = ("import importlib.metadata as m; print(m.version('torch'), m.version('open_clip_torch'), "
                "m.version('webdataset'))")
        out = subprocess.run([oc_python, "-c", code], capture_output=True, text=True).stdout.split()
        if len(out) == 3:
            info["oc_venv"] = f"torch {out[0]}, open_clip_torch {out[1]}, webdataset {out[2]}"
    return info


def machine_line(before: dict, after_load: str) -> str:
    oc = f"; open_clip venv: {before['oc_venv']}" if "oc_venv" in before else ""
    return (
        f"Machine: {before['cpu']}, {before['cores']} cores, no GPU, **shared with other jobs** (load average "
        f"{before['load']} at start, {after_load} at end: above {before['cores']} the cores were oversubscribed and "
        f"wall-clock numbers are noisy); Python {before['python']}; mmkit venv: torch {before['torch']}, "
        f"open_clip_torch {before['open_clip_torch']}, lightning {before['lightning']}{oc}."
    )


def results_section(summary: dict, config: dict, runs: dict, command: str, machine: str) -> str:
    return "\n".join([
        HEADING, "",
        f"Command (written by the script; whole run {config['elapsed_min']:.0f} min):", "",
        "```bash", command, "```", "",
        machine, "",
        "mmkit `CLIPPretrain` through `mmkit fit` (benchmarks/emoji_clip.yaml), open_clip's own trainer "
        "(`open_clip_train`, benchmarks/open_clip_train_launcher.py) and a minimal hand-written PyTorch loop "
        "(benchmarks/hand_written_loop.py: open_clip model, transforms and tokenizer, a CSV Dataset, AdamW with "
        "open_clip_train's no-decay groups, warmup + cosine per step, grad-norm clip, logit-scale clamp, fp32) on the "
        "Noto Color Emoji CSVs: same preset, batch, steps, optimizer settings, fp32, one loader worker, the same torch "
        "thread count and seed; run one after the other, rotating which goes first. See the section \"CLIPPretrain vs "
        "open_clip_train on Noto Color Emoji (CPU)\" for what each speed column measures and for the known differences "
        "(data order, augmentation draws, mmkit also exempting embedding tables from weight decay).", "",
        markdown(summary, config),
        init_check(runs), "",
        verdict(summary), "",
    ])


def mfu_inputs(a) -> dict:
    """FLOPs of one training step per sample (mmkit's count: forward and backward of both towers
    and the loss, the same model for every trainer) and this CPU's matmul peak per precision at the
    benchmark's thread count (the cached probe of mmkit.training.peak_flops)."""
    import torch

    from mmkit import CLIPPretrain
    from mmkit.models import OpenCLIP
    from mmkit.training.flops import training_flops_per_sample
    from mmkit.training.peak_flops import peak_tflops

    torch.set_num_threads(a.threads)
    module = CLIPPretrain(OpenCLIP(a.arch), export_dir="")
    module.configure_model()
    size = module.model.preprocess_cfg.get("size", 64)
    size = size[0] if isinstance(size, (list, tuple)) else size
    context = module.model.model_cfg["text_cfg"].get("context_length", 77)
    batch = {"images": torch.randn(a.batch_size, 3, size, size), "texts": torch.randint(0, 1000, (a.batch_size, context))}
    flops = training_flops_per_sample(module, batch)
    peaks = {p: peak_tflops(torch.device("cpu"), p) for p in ("32-true", "bf16-mixed")}
    return {"flops_per_sample": flops, "peaks": peaks}


def matrix_section(summary: dict, config: dict, runs: dict, command: str, machine: str, mfu: dict) -> str:
    """One table row per (setting, trainer): samples/s, ratios and MFU; then each setting's full table."""
    flops = mfu["flops_per_sample"]
    peak = lambda st: mfu["peaks"]["bf16-mixed" if "bf16" in st else "32-true"][0]  # noqa: E731
    lines = [
        MATRIX_HEADING, "",
        f"Command (written by the script; whole run {config['elapsed_min']:.0f} min):", "",
        "```bash", command, "```", "", machine, "",
        "The three trainers of benchmark 2 (same data, model, seeds, steps, optimizer, one loader worker, rotating order) "
        "in each setting, with each trainer's own flags: open_clip_train `--precision amp_bf16` / `--torchcompile` "
        "(the whole model), mmkit `--trainer.precision bf16-mixed` / `--model.init_args.compile true` (the towers), the "
        "hand-written loop bf16 autocast / `torch.compile(model)`. Samples/s by the epoch timer (median over epochs after "
        "the first, which holds compilation), median of the repeats (min–max). MFU = samples/s × "
        f"{flops / 1e9:.3f} GFLOPs per sample (mmkit's count of one training step, forward + backward, the same model for "
        f"all) ÷ this CPU's matmul peak at {config['threads']} thread(s): fp32 {mfu['peaks']['32-true'][0] * 1e3:.0f} "
        f"GFLOP/s, bf16 {mfu['peaks']['bf16-mixed'][0] * 1e3:.0f} GFLOP/s ({mfu['peaks']['32-true'][1]}).", "",
        "| setting | trainer | samples/s | MFU % | i2t R@1 % | t2i R@1 % | mmkit ÷ this trainer |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    fp32_mmkit = summary.get("fp32", {}).get("mmkit", {}).get("epoch_samples_per_sec", {}).get("median")
    for st, by in summary.items():
        mm = by["mmkit"]["epoch_samples_per_sec"]["median"]
        for name in TRAINERS:
            sps = by[name]["epoch_samples_per_sec"]
            ratio = f"{mm / sps['median']:.2f}" if name != "mmkit" else (
                f"({mm / fp32_mmkit:.2f}× fp32 mmkit)" if fp32_mmkit else "")
            lines.append(f"| {st} | {LABELS[name]} | {fmt(sps)} | {100 * sps['median'] * flops / (peak(st) * 1e12):.1f} | "
                         f"{fmt(by[name]['i2t_R@1'], 100)} | {fmt(by[name]['t2i_R@1'], 100)} | {ratio} |")
    lines.append("")
    best = max(summary, key=lambda st: summary[st]["mmkit"]["epoch_samples_per_sec"]["median"])
    parts = []
    for st, by in summary.items():
        mm = by["mmkit"]["epoch_samples_per_sec"]["median"]
        oc = mm / by["open_clip_train"]["epoch_samples_per_sec"]["median"]
        hand = mm / by["hand_loop"]["epoch_samples_per_sec"]["median"]
        parts.append(f"{st}: mmkit/open_clip_train {oc:.2f} (target ≥ 1.05: {'met' if oc >= 1.05 else '**missed**'}), "
                     f"mmkit/hand loop {hand:.2f} (target ≥ 1.0: {'met' if hand >= 1.0 else '**missed**'})")
    lines.append("Targets: " + "; ".join(parts) + ".")
    if fp32_mmkit:
        gain = summary[best]["mmkit"]["epoch_samples_per_sec"]["median"] / fp32_mmkit
        lines.append(f"Best mmkit setting: {best}, {gain:.2f}× fp32 mmkit (target ≥ 1.3: {'met' if gain >= 1.3 else '**missed**'}).")
    lines.append("")
    for st, by in summary.items():
        lines += [f"### Setting {st}", "", markdown(by, config), init_check(runs[st]), ""]
    return "\n".join(lines)


def smoke_data(data: Path, out: Path, batch_size: int) -> Path:
    """A few rows of the real CSVs: 4 steps per epoch, so the per-step medians have a step left."""
    target = out / "smoke_data"
    target.mkdir(parents=True)
    for name, rows in (("train.csv", 4 * batch_size), ("val.csv", 2 * batch_size)):
        lines = (data / name).read_text(encoding="utf-8").splitlines()
        (target / name).write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(WORK / "emoji"))
    ap.add_argument("--out", default=None, help="default: benchmarks/_work/clip_vs_open_clip (…_smoke with --smoke)")
    ap.add_argument("--oc-python", default=str(WORK / "oc_venv" / "bin" / "python"))
    ap.add_argument("--arch", default="mmkit-tiny")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for all (on a shared 2-core machine 1 avoids OpenMP oversubscription)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settings", default="fp32",
                    help=f"comma-separated, each run by all three trainers with their own flags: {', '.join(SETTINGS)}")
    ap.add_argument("--mmkit-arg", action="append", default=[],
                    help="extra `mmkit fit` argument for ablations, e.g. --mmkit-arg=--trainer.enable_progress_bar=false")
    ap.add_argument("--only", choices=("open_clip", "mmkit", "hand_loop"), default=None,
                    help="run one trainer (debugging)")
    ap.add_argument("--smoke", action="store_true",
                    help="check the harness: batch 16, 4 steps per epoch, 2 epochs, 1 repeat, no RESULTS.md write")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    a = ap.parse_args()
    command = ".venv/bin/python benchmarks/clip_vs_open_clip.py " + " ".join(sys.argv[1:])
    if a.smoke:
        a.batch_size, a.epochs, a.warmup, a.repeats, a.no_write = 16, 2, 2, 1, True
    t0 = time.perf_counter()

    data = Path(a.data).resolve()
    out = Path(a.out or WORK / ("clip_vs_open_clip_smoke" if a.smoke else "clip_vs_open_clip")).resolve()
    for f in ("train.csv", "val.csv"):
        if not (data / f).exists():
            sys.exit(f"{data / f} missing: run benchmarks/build_emoji_dataset.py first")
    if a.only not in ("mmkit", "hand_loop") and not Path(a.oc_python).exists():
        sys.exit(f"{a.oc_python} missing: run benchmarks/setup_open_clip_venv.sh first")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if a.smoke:
        data = smoke_data(data, out, a.batch_size)
    machine = machine_info(a.oc_python)

    n_train, n_val = count_rows(data / "train.csv"), count_rows(data / "val.csv")
    steps_per_epoch = n_train // a.batch_size
    config = {
        **{k: v for k, v in vars(a).items() if k not in ("only",)},
        "n_train": n_train, "n_val": n_val, "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * a.epochs,
    }
    print(json.dumps(config, indent=1), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")

    settings = a.settings.split(",")
    unknown = [x for x in settings if x not in SETTINGS]
    if unknown:
        sys.exit(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    runs: dict[str, dict[str, list[dict]]] = {st: {name: [] for name in TRAINERS} for st in settings}
    trainers = {"open_clip_train": run_open_clip, "mmkit": run_mmkit, "hand_loop": run_hand_loop}
    for r in range(a.repeats):
        # rotate the order: over 3 repeats each trainer runs once first, second and third
        order = [*TRAINERS[r % 3:], *TRAINERS[: r % 3]]
        for st in [*settings[r % len(settings):], *settings[: r % len(settings)]]:
            a.setting = st
            (out / st).mkdir(exist_ok=True)
            for name in order:
                if a.only and not name.startswith(a.only):
                    continue
                # Repeat r uses seed + r for every trainer: the same seed gives all the same initial
                # weights (checked via res["init"]), different seeds show the run-to-run spread.
                res = trainers[name](a, env, data, out / st / f"{name}_{r}", steps_per_epoch, a.seed + r)
                res["seed"] = a.seed + r
                res["non_train_s"] = res["wall_s"] - sum(e["seconds"] for e in res["epochs"])
                res["load_avg_after"] = os.getloadavg()
                runs[st][name].append(res)
                brief = {k: res[k] for k in ("metrics", *SPEED, "non_train_s", "steps", "seed", "init", "load_avg_after")}
                print(f"{st} {name} run {r}: {json.dumps(brief)}", flush=True)
                (out / "results.json").write_text(json.dumps({"config": config, "runs": runs}, indent=1))

    if a.only:
        return
    config["elapsed_min"] = (time.perf_counter() - t0) / 60
    summary = {st: {name: summarise(rs) for name, rs in by.items()} for st, by in runs.items()}
    (out / "results.json").write_text(json.dumps({"config": config, "runs": runs, "summary": summary}, indent=1))
    load_after = "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())
    machine_text = machine_line(machine, load_after)
    if settings == ["fp32"]:
        heading, section = HEADING, results_section(summary["fp32"], config, runs["fp32"], command, machine_text)
    else:
        heading = MATRIX_HEADING
        section = matrix_section(summary, config, runs, command, machine_text, mfu_inputs(a))
    (out / "summary.md").write_text(section)
    print(section)
    if not a.no_write:
        write_section(RESULTS, heading, section)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
