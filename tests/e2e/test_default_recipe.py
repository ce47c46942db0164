"""End to end: the default recipe through the `mmkit` CLI, shortened, learns for real and writes
its report and export."""

import json
from pathlib import Path

import pytest

from mmkit.cli import main

RECIPE = Path(__file__).parents[2] / "recipes" / "default.yaml"


@pytest.mark.slow
def test_default_recipe_learns_and_reports(tmp_path):
    run = tmp_path / "run"
    main([
        "fit", "--config", str(RECIPE),
        "--trainer.max_steps", "60", "--trainer.val_check_interval", "60",
        "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.batch_size", "64",
        # 32-pixel images keep this test around a minute on 2 CPU cores.
        "--model.init_args.model.init_args.image_size", "32",
        "--data.init_args.train.init_args.image_size", "32",
        "--data.init_args.val.init_args.image_size", "32",
        "--data.init_args.test.init_args.image_size", "32",
        "--data.init_args.val.init_args.size", "200",
        "--data.init_args.test.init_args.size", "200",
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
