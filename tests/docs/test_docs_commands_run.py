"""Commands shown in the docs that no other test runs, run here as a user types them (a tiny model
and short runs where the command trains: the test budget; the recipe is otherwise as shipped)."""

from __future__ import annotations

import pytest
from user_runs import MMKIT, RECIPES, run_to_exit

from mmkit.cli import main


def test_fit_print_config_shows_every_knob_with_its_default(capsys):
    """`mmkit fit --config recipes/default.yaml --print_config` (README, docs/cli.md)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(RECIPES / "default.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "max_steps: 150" in out  # the recipe's values
    assert "every_n_epochs: 1" in out and "keep_last: 3" in out  # defaults the recipe does not set
    assert "class_path: mmkit.CLIPPretrain" in out


@pytest.mark.slow
def test_default_recipe_under_fsdp2_on_two_cpu_processes(tmp_path):
    """`mmkit fit --config recipes/default.yaml --trainer.strategy fsdp2 --trainer.devices 2`
    (docs/distributed.md), 4 steps with small evaluation splits."""
    out = run_to_exit(
        [MMKIT, "fit", "--config", str(RECIPES / "default.yaml"), "--trainer.strategy", "fsdp2", "--trainer.devices", "2",
         "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
         "--data.init_args.batch_size", "32", "--data.init_args.eval_batch_size", "32",
         "--data.init_args.val.init_args.size", "64", "--data.init_args.test.init_args.size", "64"],
        cwd=tmp_path, timeout=400,
    )
    run = tmp_path / "runs" / "default"
    metrics = (run / "metrics.csv").read_text()
    assert "val/i2t_R@1" in metrics and "test/i2t_R@1" in metrics, out[-2000:]
    assert (run / "export" / "open_clip_model.safetensors").is_file()
