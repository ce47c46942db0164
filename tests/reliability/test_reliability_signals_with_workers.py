"""Stop signals with DataLoader workers on (num_workers=1): wherever the run is when SIGTERM (or
SIGINT) reaches the main process (a training step, validation, a checkpoint write, the test after
the fit), it saves where the README says it does, exits with the documented status within
EXIT_WITHIN seconds and leaves no process of its group behind. The workers ignore SIGTERM (so a
scheduler signalling the whole group does not kill them before the main process has saved), so
the main process has to end them itself; a run that does not would wait for them forever."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmkit.checkpoint_io import TEMP_SUFFIX
from runs import REPO, finish, live_group_members, output, start, stop, wait_for, write_config

pytestmark = pytest.mark.slow

EXIT_WITHIN = 60  # seconds from the signal to the exit: saving the tiny model takes well under one


def _signal_and_wait(run: Path, proc, signum: int, group: bool = False) -> int:
    """Once the run has paused, send ``signum`` to its main process (or, like a scheduler, to its
    whole process group); return its exit status. Fails if it does not exit within EXIT_WITHIN
    seconds or leaves a process of its group running."""
    wait_for(run / "paused", proc, timeout=300)
    (os.killpg if group else os.kill)(proc.pid, signum)
    status = finish(proc, timeout=EXIT_WITHIN)
    left = live_group_members(proc.pid)  # an exited main process has reaped the workers it ended
    assert not left, f"left running after the exit: {left}\n{output(proc)[-4000:]}"
    return status


def _assert_saved(path: Path) -> None:
    assert path.is_file()
    assert torch.load(path, weights_only=True)["global_step"] == int(path.stem.split("step=")[1])


def test_workers_of_a_loader_left_running_are_ended_at_exit():
    """The mechanism on its own (no Lightning): a process exits with an mmkit loader's iterator
    still alive (as Lightning leaves the training loader's after a stop during validation)."""
    script = textwrap.dedent("""
        import sys, torch
        from torch.utils.data import Dataset
        from mmkit.data.loaders import build_loader

        class Numbers(Dataset):
            def __len__(self): return 64
            def __getitem__(self, i): return torch.tensor([i])

        iterator = iter(build_loader(Numbers(), torch.stack, batch_size=4, rank=0, world_size=1,
                                     shuffle=False, num_workers=2))
        next(iterator)
        sys.exit(3)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=EXIT_WITHIN)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"did not exit within {EXIT_WITHIN} s (waits for its workers):\n{out[-3000:]}")
    finally:
        left = live_group_members(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 3, out
    assert not left, left
    assert "Traceback" not in out and "killed by signal" not in out, out  # torch's SIGCHLD check stays quiet


@pytest.mark.parametrize("group", [False, True], ids=["main-process", "process-group"])
def test_sigterm_in_a_training_step_saves_and_exits_143(tmp_path, group):
    run = tmp_path / "run"
    write_config(run, num_workers=1, pause_at=3)
    proc = start(run)
    try:
        assert _signal_and_wait(run, proc, signal.SIGTERM, group=group) == 128 + signal.SIGTERM, output(proc)[-4000:]
    finally:
        stop(proc)
    _assert_saved(run / "checkpoints" / "epoch=0-step=3.ckpt")
    assert "SIGTERM received: saved" in output(proc)


@pytest.mark.parametrize(
    "group, persistent", [(False, False), (True, True)], ids=["main-process", "process-group-persistent-workers"]
)
def test_sigterm_in_validation_saves_and_exits_0(tmp_path, group, persistent):
    # Validation at step 3, which is no step-checkpoint step (every 5): the save on the way out
    # writes this step's checkpoint.
    run = tmp_path / "run"
    write_config(run, num_workers=1, pause_at=3, pause_phase="validation", persistent_workers=persistent)
    proc = start(run, "--trainer.val_check_interval", "3")
    try:
        # README: during validation Lightning stops by itself, the checkpoint is written, status 0
        assert _signal_and_wait(run, proc, signal.SIGTERM, group=group) == 0, output(proc)[-4000:]
    finally:
        stop(proc)
    ckpt = run / "checkpoints" / "epoch=0-step=3.ckpt"
    _assert_saved(ckpt)
    assert f"mmkit: SIGTERM: saved {ckpt} at step 3" in output(proc)


def test_sigterm_during_a_checkpoint_write_finishes_it_and_exits_143(tmp_path):
    run = tmp_path / "run"
    write_config(run, num_workers=1, pause_at=5, pause_phase="checkpoint")  # the step checkpoint of step 5
    proc = start(run)
    try:
        assert _signal_and_wait(run, proc, signal.SIGTERM) == 128 + signal.SIGTERM, output(proc)[-4000:]
    finally:
        stop(proc)
    _assert_saved(run / "checkpoints" / "epoch=0-step=5.ckpt")  # written in full, not saved again
    assert not list((run / "checkpoints").glob(f".*{TEMP_SUFFIX}"))


def test_sigterm_in_the_test_after_fit_exits_0(tmp_path):
    run = tmp_path / "run"
    write_config(run, num_workers=1, pause_at=0, pause_phase="test", test=True)
    proc = start(run, "--trainer.max_steps", "2")
    try:
        # like validation: Lightning stops the test loop by itself (the fit's checkpoints are written)
        assert _signal_and_wait(run, proc, signal.SIGTERM) == 0, output(proc)[-4000:]
    finally:
        stop(proc)
    _assert_saved(run / "checkpoints" / "epoch=0-step=2.ckpt")


def test_sigint_in_validation_exits(tmp_path):
    run = tmp_path / "run"
    write_config(run, num_workers=1, pause_at=5, pause_phase="validation")
    proc = start(run)
    try:
        # Lightning's "graceful shutdown" on KeyboardInterrupt: no checkpoint, a failing status
        assert _signal_and_wait(run, proc, signal.SIGINT) != 0, output(proc)[-4000:]
    finally:
        stop(proc)
    assert "Detected KeyboardInterrupt" in output(proc)
