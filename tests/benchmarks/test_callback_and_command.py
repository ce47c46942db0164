"""The same weights score the same in training (the Benchmarks callback) and without it
(``mmkit benchmark`` on the checkpoint, and on the export the fit wrote); the callback's numbers
reach the logger under their benchmark's names."""

import contextlib
import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from bench_data import image_folder

from mmkit.callbacks import Benchmarks
from mmkit.cli import command, run_cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[2]
SMALL = [  # 2 epochs of 2 steps
    "--trainer.max_steps", "-1", "--trainer.max_epochs", "2", "--trainer.val_check_interval", "1.0",
    "--trainer.check_val_every_n_epoch", "1",
    "--data.init_args.val.init_args.size", "32", "--data.init_args.test.init_args.size", "32",
    "--data.init_args.train.init_args.size", "64", "--data.init_args.batch_size", "32",
    "--data.init_args.num_workers", "0", "--trainer.enable_progress_bar", "false",
]


def _benchmarks_file(base: Path) -> Path:
    image_folder(base / "folder", n=15)
    entries = [
        {"task": "zeroshot_classification", "name": "shapes", "shapes": {"size": 40, "seed": 7, "image_size": 32},
         "templates": ["a small {}", "a large {}", "a {}"], "batch_size": 16},
        {"task": "zeroshot_classification", "name": "folder", "images": "folder", "templates": ["a {}"]},
        {"task": "retrieval", "name": "captions", "shapes": {"size": 30, "seed": 9, "image_size": 32, "two_shapes_prob": 0.8}},
    ]
    path = base / "bench.yaml"
    path.write_text(yaml.safe_dump({"benchmarks": entries}))
    return path


def _recipe_with_callback(base: Path) -> Path:
    recipe = yaml.safe_load((REPO / "recipes" / "default.yaml").read_text())
    recipe["trainer"]["callbacks"].append(
        {"class_path": "mmkit.callbacks.Benchmarks",
         "init_args": {"benchmarks": "bench.yaml", "every_n_epochs": 1}})
    path = base / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _logged(run: Path) -> dict[int, dict[str, float]]:
    """The benchmark metrics of metrics.csv by step."""
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        values = {k: float(v) for k, v in row.items() if k.startswith(("zeroshot/", "retrieval/")) and v}
        if values:
            out.setdefault(int(row["step"]), {}).update(values)
    return out


def test_callback_numbers_equal_the_command_on_checkpoint_and_export(tmp_path):
    _benchmarks_file(tmp_path)
    recipe = _recipe_with_callback(tmp_path)
    with contextlib.chdir(tmp_path):
        cli = run_cli(["fit", "--config", str(recipe), *SMALL, "--test_after_fit", "false"])  # a test would reset callback_metrics
        callback = next(c for c in cli.trainer.callbacks if isinstance(c, Benchmarks))
        in_training = callback.last_results
        assert in_training is not None and callback._evaluated_step == 4
        logged = _logged(Path("runs/default"))
        assert sorted(logged) == [2, 4]  # at the end of each epoch
        logged = logged[4]
        for name, result in in_training.items():
            for metric, value in result["metrics"].items():
                assert logged[f"{result['task']}/{name}/{metric}"] == pytest.approx(value)
        # also where a ModelCheckpoint(monitor=...) looks
        assert cli.trainer.callback_metrics["zeroshot/shapes/top1"].item() == pytest.approx(in_training["shapes"]["metrics"]["top1"])
        assert set(in_training["shapes"]["metrics"]) == {"top1", "mean_per_class_recall"}
        assert {"i2t_R@1", "t2i_R@10", "rsum"} <= set(in_training["captions"]["metrics"])

        for model, out in (("runs/default/checkpoints/last.ckpt", "from_ckpt"), ("runs/default/export", "from_export")):
            assert command(["benchmark", "--model", model, "--benchmarks", "bench.yaml", "--out", out]) == 0
            saved = json.loads(Path(out, "results.json").read_text())
            assert saved["model"] == model
            for name, result in in_training.items():
                assert saved["benchmarks"][name]["metrics"] == pytest.approx(result["metrics"], abs=1e-6), (model, name)
            table = Path(out, "results.md").read_text()
            assert "| shapes |" in table and "| captions |" in table

        # A recipe YAML as --model: its model as the recipe builds it, here from the export's weights.
        start = yaml.safe_load(recipe.read_text())
        start["model"]["init_args"]["model"]["init_args"]["pretrained"] = "runs/default/export/open_clip_model.safetensors"
        Path("start.yaml").write_text(yaml.safe_dump(start))
        assert command(["benchmark", "--model", "start.yaml", "--benchmarks", "bench.yaml", "--out", "from_recipe"]) == 0
        saved = json.loads(Path("from_recipe", "results.json").read_text())
        for name, result in in_training.items():
            assert saved["benchmarks"][name]["metrics"] == pytest.approx(result["metrics"], abs=1e-6), ("recipe", name)


def test_command_errors_name_the_problem(tmp_path, capsys):
    shutil.copy(REPO / "recipes" / "benchmarks" / "example.yaml", tmp_path / "bench.yaml")
    with contextlib.chdir(tmp_path):
        assert command(["benchmark", "--model", "nope.ckpt", "--benchmarks", "bench.yaml", "--out", "o"]) == 2
        assert "--model nope.ckpt: no such file" in capsys.readouterr().err
        assert command(["benchmark", "--model", "mmkit-tiny", "--benchmarks", "missing.yaml", "--out", "o"]) == 2
        assert "benchmarks file not found: 'missing.yaml'" in capsys.readouterr().err
        Path("ckpt_dir").mkdir()
        assert command(["benchmark", "--model", "ckpt_dir", "--benchmarks", "bench.yaml", "--out", "o"]) == 2
        assert "neither a checkpoint nor an export" in capsys.readouterr().err
