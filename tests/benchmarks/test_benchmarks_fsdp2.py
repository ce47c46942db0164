"""The Benchmarks callback in a 2-process FSDP2 fit (gloo on this CPU), whose forward gathers the
sharded parameters, a collective: ranks with fewer benchmark batches still run as many forwards
(or the fit would hang), and the logged numbers equal ``mmkit benchmark`` on one process on the
exported weights."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmkit.cli import command

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# Two blocks per tower: FSDP2 shards each block by itself (a stack of one is left to the root),
# and a block's weights are gathered in every forward; the root's stay gathered after the first.
TWO_BLOCK_ARCH = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def test_fsdp2_callback_equals_one_process_command(tmp_path):
    entries = [  # 5 images, 2 per batch: rank 0 runs 2 batches, rank 1 one (and one more in lockstep)
        {"task": "zeroshot", "name": "five", "templates": ["a {}"], "batch_size": 2,
         "shapes": {"size": 5, "seed": 3, "image_size": 16}},
        {"task": "retrieval", "name": "seven", "batch_size": 3, "shapes": {"size": 7, "seed": 4, "image_size": 16}},
    ]
    arch = tmp_path / "two_block_arch.json"
    arch.write_text(json.dumps(TWO_BLOCK_ARCH))
    bench = tmp_path / "bench.yaml"
    bench.write_text(yaml.safe_dump({"benchmarks": entries}))
    callbacks = [{"class_path": "mmkit.callbacks.Benchmarks",
                  "init_args": {"benchmarks": str(bench), "every_n_steps": 1, "every_n_epochs": None}}]
    cmd = [
        sys.executable, "-m", "mmkit.cli", "fit", "--config", "recipes/clip_fsdp.yaml",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "fsdp2",
        "--trainer.precision", "32-true", "--trainer.max_steps", "2",
        "--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                                        "init_args": {"save_dir": str(tmp_path), "name": "", "version": ""}}),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", json.dumps(callbacks),
        "--trainer.limit_val_batches", "0",
        "--model.init_args.model.init_args.arch", str(arch), "--model.init_args.warmup_steps", "1",
        "--model.init_args.export_dir", str(tmp_path / "export"),
        "--data.init_args.train", "{class_path: mmkit.data.SyntheticShapes, init_args: {size: 32, seed: 0, image_size: 16}}",
        "--data.init_args.val", "null", "--data.init_args.test", "null",
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--data.init_args.persistent_workers", "false", "--data.init_args.pin_memory", "false",
        "--test_after_fit", "false",
    ]
    run = subprocess.run(cmd, check=False, timeout=600, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(tmp_path / "metrics.csv") as f:  # after steps 1 and 2 (training goes on after one); the last wins
        rows = [row for row in csv.DictReader(f) if row.get("zeroshot/five/top1")]
    assert [int(r["step"]) for r in rows] == [1, 2]
    logged = {k: float(v) for k, v in rows[-1].items() if k.startswith(("zeroshot/", "retrieval/")) and v}
    assert command(["benchmark", "--model", str(tmp_path / "export"), "--benchmarks", str(bench),
                    "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())["benchmarks"]
    for name, result in results.items():
        for metric, value in result["metrics"].items():
            assert logged[f"{result['task']}/{name}/{metric}"] == pytest.approx(value, abs=1e-6), (name, metric)
