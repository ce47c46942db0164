"""Benchmarks on several processes as a user launches them: the callback in a 2-process DDP fit,
and ``mmkit benchmark`` under torchrun with 2 processes (gloo on this CPU). Both give the numbers
of one process on the same weights."""

import csv
import json
import sys

import pytest
import yaml
from bench_data import karpathy_file
from user_runs import MMKIT, RECIPES, run_to_exit, short_default_run

pytestmark = pytest.mark.slow

SHORT = short_default_run(4, 4, 32, 16)  # steps, val every, eval rows, batch


def test_ddp_callback_and_torchrun_command_equal_one_process(tmp_path):
    karpathy_file(tmp_path / "karpathy", n=9, captions_per_image=3)
    entries = [
        {"task": "zeroshot_classification", "name": "colors", "batch_size": 8, "templates": ["a {} shape"],
         "shapes": {"size": 45, "seed": 7, "image_size": 32, "label_attribute": "color"}},  # 23 + 22 per rank
        {"task": "retrieval", "name": "karpathy", "karpathy": "karpathy/dataset_shapes.json", "batch_size": 4},
    ]
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump({"benchmarks": entries}))
    recipe = yaml.safe_load((RECIPES / "default.yaml").read_text())
    recipe["trainer"]["callbacks"].append({"class_path": "mmkit.callbacks.Benchmarks",
                                           "init_args": {"benchmarks": "bench.yaml", "every_n_steps": 4, "every_n_epochs": None}})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_to_exit([MMKIT, "fit", "--config", "recipe.yaml", "--trainer.strategy", "ddp", "--trainer.devices", "2", *SHORT],
                cwd=tmp_path, timeout=400)
    with open(tmp_path / "runs" / "default" / "metrics.csv") as f:
        logged = {k: float(v) for row in csv.DictReader(f) for k, v in row.items() if ("/colors/" in k or "/karpathy/" in k) and v}
    assert "zeroshot/colors/top1" in logged and "retrieval/karpathy/i2t_R@1" in logged

    ckpt = "runs/default/checkpoints/last.ckpt"
    run_to_exit([MMKIT, "benchmark", "--model", ckpt, "--benchmarks", "bench.yaml", "--out", "one"], cwd=tmp_path, timeout=300)
    run_to_exit([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                 "-m", "mmkit.cli", "benchmark", "--model", ckpt, "--benchmarks", "bench.yaml", "--out", "two"],
                cwd=tmp_path, timeout=300)
    one = json.loads((tmp_path / "one" / "results.json").read_text())["benchmarks"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["benchmarks"]
    for name, result in one.items():
        assert two[name]["metrics"] == pytest.approx(result["metrics"]), name
        for metric, value in result["metrics"].items():
            assert logged[f"{result['task']}/{name}/{metric}"] == pytest.approx(value, abs=1e-6), (name, metric)
