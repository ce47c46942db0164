"""End to end: the default recipe through the `mmkit` CLI, shortened, learns for real and writes
its report and export."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmkit.cli import main

RECIPE = Path(__file__).parents[2] / "recipes" / "default.yaml"


SMALL = [
    "--data.init_args.val.init_args.size", "200",
    "--data.init_args.test.init_args.size", "200",
    "--trainer.enable_progress_bar", "false",
]


@pytest.mark.slow
def test_default_recipe_learns_reports_and_serves_the_other_subcommands(tmp_path):
    run = tmp_path / "run"
    main([
        "fit", "--config", str(RECIPE), *SMALL,
        "--trainer.max_steps", "40", "--trainer.val_check_interval", "40",
        "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
        "--data.init_args.batch_size", "64",
        "--model.init_args.warmup_steps", "10",
    ])
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    chance = 1 / 200
    # Far above chance in both directions after one minute of CPU training.
    assert metrics["val/i2t_R@1"] > 8 * chance and metrics["val/t2i_R@1"] > 8 * chance, metrics
    assert 0.0 <= metrics["val/zeroshot_top1"] <= 1.0  # zero-shot evaluation ran
    assert (run / "report" / "report.md").read_text().count(".png") >= 3
    assert (run / "export" / "open_clip_model.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "test/i2t_R@1" in (run / "metrics.csv").read_text()

    # The checkpoint serves `test`, `predict` and `export` through the same recipe.
    ckpt = str(run / "checkpoints" / "last.ckpt")
    again = tmp_path / "again"
    common = ["--config", str(RECIPE), *SMALL, "--trainer.default_root_dir", str(again),
              "--trainer.logger.init_args.save_dir", str(again), "--ckpt_path", ckpt]
    main(["test", *common])
    (retested,) = (again / "eval").glob("test-*/metrics.csv")  # each evaluation in a folder of its own
    assert "test/i2t_R@1" in retested.read_text()
    main(["predict", *common, "--data.init_args.predict", json.dumps(
        {"class_path": "mmkit.data.SyntheticShapes", "init_args": {"size": 30, "seed": 5, "image_size": 32}})])
    (emb,) = (again / "eval").glob("predict-*/embeddings/embeddings_rank0.safetensors")
    emb = load_file(str(emb))
    assert emb["image_features"].shape[0] == 30 and emb["index"].tolist() == list(range(30))

    main(["export", "--config", str(RECIPE), "--ckpt_path", ckpt, "--out", str(tmp_path / "exported")])
    a = load_file(str(tmp_path / "exported" / "open_clip_model.safetensors"))
    b = load_file(str(run / "export" / "open_clip_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
