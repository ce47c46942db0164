"""Preemption: SIGTERM (from anywhere) and SLURM's requeue signal save a checkpoint at the end of
the current step and exit; the restarted job completes the run with the steps of an uninterrupted
one, none lost and none repeated."""

import os
import signal
import stat

import pytest

from runs import (
    TOTAL_STEPS, finish, live_group_members, output, records_by_process, start, stop, wait_for, write_config,
)

pytestmark = pytest.mark.slow


def _assert_completes_the_uninterrupted_run(first, second, uninterrupted, stop_step):
    assert first[-1]["step"] == stop_step and second[0]["step"] == stop_step + 1
    trained = first + second
    assert [r["step"] for r in trained] == list(range(1, TOTAL_STEPS + 1))
    assert [r["index"] for r in trained] == [r["index"] for r in uninterrupted]
    expected = [r["loss"] for r in uninterrupted[stop_step:]]
    assert [r["loss"] for r in second] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_sigterm_to_the_process_group_saves_exits_and_resumes(tmp_path, uninterrupted):
    run = tmp_path / "run"
    stop_step = 8  # mid-epoch, between two step checkpoints (every 5)
    write_config(run, num_workers=1, pause_at=stop_step)
    first = start(run, "--ckpt_path", "last")
    try:
        wait_for(run / "paused", first)
        # Like a scheduler: the whole process group, DataLoader worker included.
        os.killpg(first.pid, signal.SIGTERM)
        assert finish(first, timeout=120) == 128 + signal.SIGTERM, output(first)[-4000:]
        assert not live_group_members(first.pid)  # the worker, which ignored the signal, ended too
    finally:
        stop(first)
    assert (run / "checkpoints" / f"epoch=0-step={stop_step}.ckpt").is_file()
    assert f"SIGTERM received: saved {run / 'checkpoints' / f'epoch=0-step={stop_step}.ckpt'}" in output(first)

    second = start(run, "--ckpt_path", "last")
    try:
        assert finish(second) == 0, output(second)[-4000:]
    finally:
        stop(second)
    _assert_completes_the_uninterrupted_run(*records_by_process(run / "steps.jsonl"), uninterrupted, stop_step)


def test_slurm_requeue_signal_saves_requeues_and_the_requeued_job_resumes(tmp_path, uninterrupted):
    run = tmp_path / "run"
    stop_step = 7
    write_config(run, num_workers=0, pause_at=stop_step)
    # A stand-in for SLURM's scontrol that records how it was called.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {
        "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "mmkit",
        "SLURM_NODELIST": "localhost", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    # No --ckpt_path: under SLURM Lightning loads hpc_ckpt_* by itself (`last` would find it too).
    first = start(run, env=slurm)
    try:
        wait_for(run / "paused", first)
        os.kill(first.pid, signal.SIGUSR1)
        assert finish(first, timeout=120) == 128 + signal.SIGUSR1, output(first)[-4000:]
    finally:
        stop(first)
    assert (run / "hpc_ckpt_1.ckpt").is_file()
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"

    second = start(run, env=slurm)  # the requeued job
    try:
        assert finish(second) == 0, output(second)[-4000:]
    finally:
        stop(second)
    assert "hpc_ckpt_1.ckpt" in output(second)
    assert not (run / "hpc_ckpt_1.ckpt").exists()  # removed once the fit finished
    _assert_completes_the_uninterrupted_run(*records_by_process(run / "steps.jsonl"), uninterrupted, stop_step)


def test_under_ddp_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Two gloo processes; only rank 0 is signalled (rank 1 waits for it in the step's
    collective): both save nothing partial, stop after the same step, and the resumed pair
    finishes the run with each sample of the interrupted epoch trained once."""
    run = tmp_path / "run"
    stop_step = 8  # 48 samples / (2 ranks x 4) = 6 steps per epoch: 2 steps into epoch 1
    write_config(run, num_workers=0, pause_at=stop_step, devices=2)
    first = start(run, "--ckpt_path", "last")
    try:
        wait_for(run / "paused", first)
        os.kill(first.pid, signal.SIGUSR1)  # rank 0 (Lightning started rank 1 as its child)
        assert finish(first, timeout=180) == 128 + signal.SIGUSR1, output(first)[-4000:]
    finally:
        stop(first)
    assert (run / "checkpoints" / f"epoch=1-step={stop_step}.ckpt").is_file()

    second = start(run, "--ckpt_path", "last")
    try:
        assert finish(second) == 0, output(second)[-4000:]
    finally:
        stop(second)
    records = [r for process in records_by_process(run / "steps.jsonl") for r in process]
    for rank in (0, 1):
        steps = [r["step"] for r in records if r["rank"] == rank]
        assert steps == list(range(1, 13)), (rank, steps)  # stopped together, nothing repeated
    for epoch in (0, 1):
        seen = sorted(i for r in records if r["epoch"] == epoch for i in r["index"])
        assert seen == list(range(48)), epoch
