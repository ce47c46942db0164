"""Run mmkit the way a user does (the installed `mmkit` command, a launcher script) in a
subprocess that must exit by itself: on a timeout the whole process group (ranks spawned by
Lightning or torchrun included) is killed and the test fails with the output's tail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
MMKIT = str(Path(sys.executable).with_name("mmkit"))  # the console script of this environment


def run_to_exit(cmd: list[str], cwd: Path, timeout: float, env: dict | None = None) -> str:
    """Run ``cmd``; return its output when it exits with 0, fail the test otherwise."""
    import pytest

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"did not exit within {timeout:.0f} s (hung): {' '.join(cmd)}\n...{out[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"exit status {proc.returncode}: {' '.join(cmd)}\n...{out[-4000:]}")
    return out


def short_default_run(steps: int, val_every: int, eval_size: int, batch: int) -> list[str]:
    """CLI overrides that shrink recipes/default.yaml's run to a few steps and small eval splits
    (tests deviate from the shipped sizes only to finish quickly), progress bar off for logs."""
    return [
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(val_every),
        "--data.init_args.val.init_args.size", str(eval_size), "--data.init_args.test.init_args.size", str(eval_size),
        "--data.init_args.batch_size", str(batch), "--data.init_args.eval_batch_size", str(batch),
        "--trainer.enable_progress_bar", "false",
    ]
