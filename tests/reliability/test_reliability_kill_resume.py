"""A run killed with SIGKILL in the middle of an epoch and restarted with `--ckpt_path last`
finishes exactly like a run that was never interrupted: same optimizer steps, every sample of the
interrupted epoch once, the same batches and (deterministic mode) the same loss curve."""

import os
import signal

import pytest
import torch

from runs import (
    BATCH, EVERY, SAMPLES, STEPS_PER_EPOCH, TOTAL_STEPS, finish, output, records_by_process, start, stop, wait_for,
    write_config,
)

pytestmark = pytest.mark.slow


def test_sigkill_mid_epoch_then_resume_last_matches_the_uninterrupted_run(tmp_path, uninterrupted):
    ckpt_step = 3 * EVERY  # 15: three batches into epoch 1
    assert STEPS_PER_EPOCH < ckpt_step < 2 * STEPS_PER_EPOCH - 2
    run = tmp_path / "run"
    # One DataLoader worker: with its prefetching (and Lightning's) the sampler has handed out
    # batches beyond the checkpoint's step when it is written; the resume must not skip them.
    write_config(run, num_workers=1, pause_at=ckpt_step + 2)
    first = start(run, "--ckpt_path", "last")  # the same command starts and restarts a job
    try:
        wait_for(run / "paused", first)
        ckpt = run / "checkpoints" / f"epoch=1-step={ckpt_step}.ckpt"
        assert ckpt.is_file()
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(timeout=60) == -signal.SIGKILL
    finally:
        stop(first)
    assert "no checkpoint" in output(first) and "starting from scratch" in output(first)

    state = torch.load(ckpt, weights_only=True)
    # the loop's count of batches trained in the epoch, not the prefetching loader's
    assert state["ImageTextDataModule"]["train_sampler"]["batches_consumed"] == ckpt_step - STEPS_PER_EPOCH

    second = start(run, "--ckpt_path", "last")
    try:
        assert finish(second) == 0, output(second)[-4000:]
    finally:
        stop(second)
    assert f"resuming from {ckpt}" in output(second)

    killed, resumed = records_by_process(run / "steps.jsonl")
    assert killed[-1]["step"] == ckpt_step + 2  # two steps past the checkpoint were lost and redone
    trained = [r for r in killed if r["step"] <= ckpt_step] + resumed
    # the same number of optimizer steps as the uninterrupted run, none twice
    assert [r["step"] for r in trained] == list(range(1, TOTAL_STEPS + 1))
    for epoch in (0, 1):  # epoch 1 is the interrupted one
        seen = sorted(i for r in trained if r["epoch"] == epoch for i in r["index"])
        assert seen == list(range(SAMPLES)), f"epoch {epoch}"
    assert all(len(r["index"]) == BATCH for r in trained)
    # the same batches, in the same order, as the uninterrupted run (which had no worker)
    assert [r["index"] for r in trained] == [r["index"] for r in uninterrupted]
    # deterministic mode: the loss curve after the resume point reproduces the uninterrupted run's
    after = [r["loss"] for r in resumed]
    expected = [r["loss"] for r in uninterrupted[ckpt_step:]]
    assert after == pytest.approx(expected, rel=1e-5, abs=1e-6)
