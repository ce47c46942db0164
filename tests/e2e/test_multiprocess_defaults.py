"""Multi-process runs launched as a user launches them, with the recipes' default settings (the
default export folder, logger, report and checkpoints): they train, write their outputs once and
exit by themselves. Every earlier multi-process test set ``export_dir`` and so never saw a fit
that hung after training."""

from __future__ import annotations

import sys

import pytest
from safetensors.torch import load_file

from user_runs import MMKIT, RECIPES, REPO, run_to_exit, short_default_run

pytestmark = pytest.mark.slow

# Shorter and smaller than shipped (the test budget); nothing else deviates from the recipe.
SHORT = short_default_run(4, 2, 64, 32)  # steps, val every, eval rows, batch


def _check_default_run(run) -> None:
    assert (run / "export" / "open_clip_model.safetensors").is_file()
    assert load_file(str(run / "export" / "open_clip_model.safetensors"))
    report = (run / "report" / "report.md").read_text()
    # Written again after the test, with its metrics; the pictures come from rank 0 alone.
    assert "| metric | train | val | test |" in report
    for png in ("optimisation.png", "retrieval_text_to_image.png", "similarity.png", "confusion.png"):
        assert f"]({png})" in report and (run / "report" / png).is_file()
    metrics = (run / "metrics.csv").read_text()
    assert "val/i2t_R@1" in metrics and "test/i2t_R@1" in metrics
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_default_recipe_on_two_ddp_processes_exits_by_itself(tmp_path):
    out = run_to_exit(
        [MMKIT, "fit", "--config", str(RECIPES / "default.yaml"), "--trainer.strategy", "ddp", "--trainer.devices", "2", *SHORT],
        cwd=tmp_path, timeout=300,
    )
    assert out.count("mmkit: exported the trained model") == 1, out[-2000:]
    _check_default_run(tmp_path / "runs" / "default")


def test_torchrun_launcher_with_two_processes_exits_by_itself(tmp_path):
    """recipes/launch/torchrun.sh as its header shows it, 2 processes on this CPU, from a shell
    whose PATH has no mmkit (no activated environment): PYTHON names the interpreter."""
    recipe = str(RECIPES / "default.yaml")
    env = {"NPROC_PER_NODE": "2", "MASTER_PORT": "29517", "PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    out = run_to_exit(["bash", str(REPO / "recipes" / "launch" / "torchrun.sh"), recipe, "--trainer.strategy", "ddp", *SHORT],
                      cwd=tmp_path, timeout=300, env=env)
    assert out.count("mmkit: exported the trained model") == 1, out[-2000:]
    _check_default_run(tmp_path / "runs" / "default")
