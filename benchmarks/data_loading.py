"""Data-loading throughput: mmkit's CSV and WebDataset pipelines vs open_clip_train's (issue 5,
benchmark 3).

    python benchmarks/data_loading.py [--workers 0 1 2] [--repeats 5] [--warmup 5] [--batches 60]
    python benchmarks/data_loading.py --smoke      # 1 repeat, 1 + 3 batches, no RESULTS.md write

Prerequisites: benchmarks/build_emoji_dataset.py, benchmarks/setup_open_clip_venv.sh; the shards and
the matching CSV are written on first use by make_emoji_shards.py (the train set repeated 4×:
4,772 pairs, 74 batches of 64, 8 shards).

Both sides read the same files with the same batch size, worker count, image transform (open_clip's
train transform for the preset: random resized crop to the model's resolution, RGB, tensor,
CLIP normalisation) and tokenizer, and do the same work per sample: decode the PNG, transform,
tokenize, batch.

- mmkit: ``mmkit.data.ManifestDataset`` / ``mmkit.data.WebDatasetShards`` through
  ``ImageTextDataModule.train_dataloader()`` with ``mmkit.models.OpenCLIP(arch).preprocessing``;
- open_clip: ``open_clip_train.data.get_csv_dataset`` / ``get_wds_dataset`` built from an
  ``argparse.Namespace`` with the fields they read, with the transform and tokenizer that
  ``create_model_and_transforms`` / ``get_tokenizer`` give open_clip_train; run with the open_clip
  venv's Python (it pins webdataset<=0.2.86, which mmkit does not use).

Each measurement builds a fresh train loader, takes ``--warmup`` batches (worker start-up, shuffle
buffer fill; their time is reported as "warm-up s"), then times the next ``--batches`` batches:
samples/s = samples in them / seconds. Every repeat starts one process per implementation (order
alternating), which measures every pipeline × worker count once; results are medians over repeats.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
PRESETS = HERE.parent / "mmkit" / "models" / "presets"
RESULTS = HERE / "RESULTS.md"
HEADING = "## Data loading: mmkit vs open_clip pipelines (issue 5, benchmark 3)"
IMPLS = ("mmkit", "open_clip")
PIPELINES = ("csv", "wds")
PROBE_CAPTIONS = ["grinning face with smiling eyes", "number sign", "flag: united kingdom"]
MMKIT_SHUFFLE_BUFFER = 1000  # open_clip_train shuffles samples too (buffer 5000, first output after 1000)


# -- measurement (runs inside one venv) ------------------------------------------------------------
def time_loader(loader, count, warmup: int, batches: int) -> dict:
    start = time.perf_counter()
    it = iter(loader)  # workers start here
    try:
        for _ in range(warmup):
            next(it)
        warm, cpu0 = time.perf_counter(), time.process_time()
        samples = 0
        for _ in range(batches):
            samples += count(next(it))
        end, cpu1 = time.perf_counter(), time.process_time()
    except StopIteration:
        raise SystemExit(f"the loader ran out before {warmup} + {batches} batches: lower --warmup/--batches "
                         "or raise --copies") from None
    finally:
        del it  # shuts the workers down before the next measurement starts its own
    # CPU of this process only: with workers = 0 that is all the loading work (and far less
    # disturbed by other jobs than wall time); with workers it is the cost of receiving batches.
    return {"samples_per_sec": samples / (end - warm), "seconds": end - warm, "samples": samples,
            "warmup_s": warm - start, "main_cpu_ms_per_sample": 1e3 * (cpu1 - cpu0) / samples}


def mmkit_side(cfg: dict):
    """Loader factory, sample counter and preprocessing description of mmkit's pipelines."""
    from mmkit.data import ImageTextDataModule, ManifestDataset, WebDatasetShards
    from mmkit.models import OpenCLIP

    pre = OpenCLIP(cfg["arch"]).preprocessing

    def make(pipeline: str, workers: int, seed: int):
        if pipeline == "csv":
            source = ManifestDataset(cfg["csv"], image_column="filepath", caption_column="title")
        else:
            source = WebDatasetShards(cfg["shards"], shuffle_buffer=MMKIT_SHUFFLE_BUFFER, seed=seed)
        dm = ImageTextDataModule(train=source, batch_size=cfg["batch_size"], num_workers=workers, drop_last=True,
                                 seed=seed, preprocessing=pre)
        return dm.train_dataloader()

    described = {"transform": repr(pre.image_transform(train=True)),
                 "tokens": pre.tokenize(PROBE_CAPTIONS).tolist()}
    return make, lambda batch: int(batch["images"].shape[0]), described


def open_clip_side(cfg: dict):
    """The same for open_clip_train.data (run with the open_clip venv's Python)."""
    import open_clip
    import torch
    from open_clip_train.data import get_csv_dataset, get_wds_dataset

    open_clip.add_model_config(PRESETS)
    _, train_tf, _ = open_clip.create_model_and_transforms(cfg["arch"], pretrained=None)
    tokenizer = open_clip.get_tokenizer(cfg["arch"])

    def make(pipeline: str, workers: int, seed: int):
        args = argparse.Namespace(
            train_data=cfg["csv"] if pipeline == "csv" else cfg["shards"], val_data=None,
            csv_img_key="filepath", csv_caption_key="title", csv_separator=",",
            batch_size=cfg["batch_size"], workers=workers, distributed=False, world_size=1, seed=seed,
            dataset_resampled=False, train_num_samples=cfg["num_samples"], train_data_upsampling_factors=None,
            val_num_samples=None,
        )
        torch.manual_seed(seed)  # the CSV loader shuffles with the global generator, as in open_clip_train
        get = get_csv_dataset if pipeline == "csv" else get_wds_dataset
        info = get(args, train_tf, is_train=True, epoch=0, tokenizer=tokenizer)
        info.set_epoch(0)  # what train_one_epoch does first
        return info.dataloader

    described = {"transform": repr(train_tf), "tokens": tokenizer(PROBE_CAPTIONS).tolist()}
    return make, lambda batch: int(batch[0].shape[0]), described


def measure(impl: str, cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    make, count, described = (mmkit_side if impl == "mmkit" else open_clip_side)(cfg)
    out = {"impl": impl, **described, "runs": []}
    for workers in cfg["workers"]:
        for pipeline in PIPELINES:
            loader = make(pipeline, workers, cfg["seed"])
            res = time_loader(loader, count, cfg["warmup"], cfg["batches"])
            del loader  # persistent workers (open_clip's WebLoader) stop with their loader
            gc.collect()
            res.update(pipeline=pipeline, workers=workers)
            print(f"{impl} {pipeline} workers={workers}: {res['samples_per_sec']:.1f} samples/s "
                  f"(warm-up {res['warmup_s']:.2f} s)", file=sys.stderr, flush=True)
            out["runs"].append(res)
    return out


# -- harness (mmkit venv) --------------------------------------------------------------------------
def run_impl(impl: str, cfg: dict, python: str, env: dict, log: Path) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--measure", impl, "--config", json.dumps(cfg)]
    with open(log, "a") as err:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if proc.returncode != 0:
        sys.exit(f"{impl} measurement failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    line = next(l for l in proc.stdout.splitlines()[::-1] if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def summarise(rounds: list[dict], cfg: dict) -> list[dict]:
    rows = []
    for workers in cfg["workers"]:
        for pipeline in PIPELINES:
            row = {"pipeline": pipeline, "workers": workers}
            for impl in IMPLS:
                runs = [r for rnd in rounds for r in rnd[impl]["runs"]
                        if r["pipeline"] == pipeline and r["workers"] == workers]
                rates = [r["samples_per_sec"] for r in runs]
                row[impl] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                             "values": rates, "warmup_s": statistics.median(r["warmup_s"] for r in runs),
                             "cpu_ms": statistics.median(r["main_cpu_ms_per_sample"] for r in runs)}
            row["ratio"] = row["mmkit"]["median"] / row["open_clip"]["median"]
            rows.append(row)
    return rows


def equivalence(first: dict) -> str:
    mm, oc = first["mmkit"], first["open_clip"]
    same_tf = mm["transform"] == oc["transform"]
    same_tok = mm["tokens"] == oc["tokens"]
    if same_tf and same_tok:
        return ("Same preprocessing on both sides (checked in every run): identical `repr` of the train transform, "
                "identical token ids for probe captions.")
    return (f"**Preprocessing differs**: transform identical: {same_tf}, token ids identical: {same_tok}.\n"
            f"mmkit transform: `{mm['transform']}`\nopen_clip transform: `{oc['transform']}`")


def markdown(rows: list[dict], cfg: dict) -> str:
    def cell(s: dict) -> str:
        return f"{s['median']:.0f} ({s['min']:.0f}–{s['max']:.0f})" if len(s["values"]) > 1 else f"{s['median']:.0f}"

    names = {"csv": "CSV", "wds": "WebDataset"}
    lines = [
        "| pipeline | workers | mmkit samples/s | open_clip samples/s | ratio mmkit / open_clip | target ≥ 1 "
        "| mmkit main-process CPU ms/sample | open_clip main-process CPU ms/sample | mmkit warm-up s "
        "| open_clip warm-up s |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ok = "met" if r["ratio"] >= 1 else "**missed**"
        lines.append(f"| {names[r['pipeline']]} | {r['workers']} | {cell(r['mmkit'])} | {cell(r['open_clip'])} "
                     f"| {r['ratio']:.2f} | {ok} | {r['mmkit']['cpu_ms']:.2f} | {r['open_clip']['cpu_ms']:.2f} "
                     f"| {r['mmkit']['warmup_s']:.2f} | {r['open_clip']['warmup_s']:.2f} |")
    lines += ["", (
        f"samples/s over {cfg['batches']} batches of {cfg['batch_size']} after {cfg['warmup']} warm-up batches "
        f"(warm-up s: median time from creating the loader iterator to the end of the warm-up batches: worker "
        f"start-up, shuffle-buffer fill); median of {cfg['repeats']} repeats, min–max in brackets; "
        f"{cfg['threads']} torch thread(s) in the main process. Main-process CPU ms/sample over the timed batches: "
        f"with 0 workers all of the loading work, and much less disturbed by other jobs than samples/s; with workers, "
        f"only the cost of receiving the batches (the workers' CPU is not counted)."
    )]
    return "\n".join(lines) + "\n"


NOTES = """Where the two sides differ (the work per sample is otherwise the same):

- **CSV.** open_clip's `CsvDataset` opens the image lazily and the transform's crop triggers the decode; mmkit's
  `ManifestDataset` checks the file exists and is not empty (two `stat` calls), decodes it fully with
  `convert("RGB")` first (so a broken file is reported with its row; the transform's own RGB step is then a copy),
  and adds `index`/`image_id`/`label` tensors and bad-sample counts to each batch. open_clip tokenizes one caption
  per `__getitem__`; mmkit tokenizes the batch's captions in one call in the collate function (same tokenizer, same
  ids). open_clip's loader asks for `pin_memory=True`, which torch ignores without an accelerator. Both shuffle.
- **WebDataset.** open_clip uses the `webdataset` package (shard shuffle, split by worker, tar reading, a
  5,000-sample shuffle buffer that starts yielding after 1,000, `decode("pilrgb")`, per-sample transform and
  tokenization, `batched`); mmkit reads the tars with the standard library (shard shuffle, split by worker, a
  sample shuffle buffer of 1,000 here, set to make the work comparable: its default is 0), decodes, and collates
  like the CSV pipeline. open_clip's loader keeps persistent workers; for a single pass that changes nothing.
- Data: `benchmarks/make_emoji_shards.py` repeats the 1,193 train pairs 4× (4,772 pairs, the same PNG files) as a
  CSV and as 8 tar shards of those PNG bytes, so one epoch holds the warm-up plus the timed batches and two
  workers get four shards each.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--arch", default="mmkit-tiny")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oc-python", default=str(WORK / "oc_venv" / "bin" / "python"))
    ap.add_argument("--out", default=None, help="default: benchmarks/_work/data_loading (…_smoke with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="1 repeat, 1 warm-up + 3 timed batches, no RESULTS.md write")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    ap.add_argument("--measure", choices=IMPLS, help=argparse.SUPPRESS)  # internal: one measuring process
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.measure:
        print("RESULT " + json.dumps(measure(a.measure, json.loads(a.config))), flush=True)
        return

    command = ".venv/bin/python benchmarks/data_loading.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.smoke:
        a.repeats, a.warmup, a.batches, a.no_write = 1, 1, 3, True
    if not Path(a.oc_python).exists():
        sys.exit(f"{a.oc_python} missing: run benchmarks/setup_open_clip_venv.sh first")
    sys.path.insert(0, str(HERE))
    from clip_vs_open_clip import machine_info, machine_line, write_section
    from make_emoji_shards import build

    t0 = time.perf_counter()
    data = build(copies=a.copies, shards=a.shards)
    if data["shards"] < max(a.workers):
        sys.exit(f"{data['shards']} shards cannot feed {max(a.workers)} workers: raise --shards")
    out = Path(a.out or WORK / ("data_loading_smoke" if a.smoke else "data_loading"))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "measure.log"
    log.write_text("")
    cfg = {"arch": a.arch, "csv": data["csv"], "shards": data["shard_pattern"], "num_samples": data["num_samples"],
           "batch_size": a.batch_size, "workers": a.workers, "warmup": a.warmup, "batches": a.batches,
           "threads": a.threads, "repeats": a.repeats}
    machine = machine_info(a.oc_python)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    python = {"mmkit": sys.executable, "open_clip": a.oc_python}
    print(json.dumps(cfg, indent=1), flush=True)

    rounds = []
    for r in range(a.repeats):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]
        rnd = {}
        for impl in order:
            rnd[impl] = run_impl(impl, {**cfg, "seed": a.seed + r}, python[impl], env, log)
            for run in rnd[impl]["runs"]:
                print(f"repeat {r} {impl} {run['pipeline']} workers={run['workers']}: "
                      f"{run['samples_per_sec']:.1f} samples/s, warm-up {run['warmup_s']:.2f} s", flush=True)
        rounds.append(rnd)
        (out / "results.json").write_text(json.dumps({"config": cfg, "rounds": rounds}, indent=1))

    rows = summarise(rounds, cfg)
    checks = [equivalence(rnd) for rnd in rounds]
    load_after = "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())
    section = "\n".join([
        HEADING, "",
        f"Command (written by the script; whole run {(time.perf_counter() - t0) / 60:.0f} min):", "",
        "```bash", command, "```", "",
        machine_line(machine, load_after), "",
        f"Iterating the train loader of the Noto Color Emoji pairs, batch {a.batch_size}, `{a.arch}` preprocessing "
        f"(64 px), same files, transform, tokenizer and worker count on both sides; mmkit through "
        f"`ImageTextDataModule.train_dataloader()`, open_clip through `open_clip_train.data.get_csv_dataset` / "
        f"`get_wds_dataset`.", "",
        markdown(rows, cfg),
        checks[0] if len(set(checks)) == 1 else "\n".join(sorted(set(checks))), "",
        NOTES,
    ])
    (out / "results.json").write_text(json.dumps({"config": cfg, "rounds": rounds, "summary": rows}, indent=1))
    (out / "summary.md").write_text(section)
    print(section)
    if not a.no_write:
        write_section(RESULTS, HEADING, section)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
