"""One run per run folder, and a run folder that keeps its history across restarts: a second
`mmkit fit` in a folder in use stops at once and touches nothing; the lock dies with its holder
(SIGKILL included); a resumed fit continues `metrics.csv`."""

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from mmkit import run_lock
from mmkit.loggers import CSVLogger
from runs import EVERY, TOTAL_STEPS, finish, output, records_by_process, start, stop, wait_for, write_config


def _edit_recipe(run: Path, callbacks: list[dict] = (), **trainer) -> None:
    path = run / "recipe.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["callbacks"] += list(callbacks)
    cfg["trainer"].update(trainer)
    path.write_text(yaml.safe_dump(cfg))


def _lock_owner(run: Path) -> str:
    return (run / run_lock.LOCK_NAME).read_text()


@pytest.mark.slow
def test_a_second_fit_in_a_folder_in_use_fails_fast_naming_the_first_and_touches_nothing(tmp_path):
    run = tmp_path / "run"
    write_config(run)
    hold = {"class_path": "run_folder_helpers.HoldAt",
            "init_args": {"step": EVERY + 2, "marker": str(run / "held"), "release": str(run / "release")}}
    _edit_recipe(run, [hold])
    first = start(run, "--ckpt_path", "last")
    try:
        wait_for(run / "held", first)
        assert f'"pid": {first.pid}' in _lock_owner(run)
        ckpts = run / "checkpoints"
        in_progress = ckpts / ".epoch=0-step=10.ckpt.x1y2z3.tmp"  # as if the first were writing one now
        in_progress.write_bytes(b"partial")
        before = {p.name: (p.stat().st_mtime_ns, os.readlink(p) if p.is_symlink() else None) for p in ckpts.iterdir()}
        config_before = (run / "config.yaml").read_bytes()

        second = start(run, "--ckpt_path", "last")
        try:
            started = time.monotonic()
            assert finish(second, timeout=120) == 1
        finally:
            stop(second)
        message = output(second)
        assert f"is in use by another run (pid {first.pid} on " in message, message[-3000:]
        assert "Traceback" not in message and time.monotonic() - started < 120
        # nothing of the first run's was deleted, pruned, re-pointed or rewritten
        assert {p.name: (p.stat().st_mtime_ns, os.readlink(p) if p.is_symlink() else None)
                for p in ckpts.iterdir()} == before
        assert (run / "config.yaml").read_bytes() == config_before
        assert "resuming from" not in message and not (run / "steps.jsonl").read_text().count(f'"pid": {second.pid}')

        # Evaluation writes to its own folder and takes no lock: it runs while the fit holds it.
        validate = subprocess.run(
            [sys.executable, "-m", "mmkit.cli", "validate", "--config", str(run / "recipe.yaml"),
             "--ckpt_path", str(ckpts / "last.ckpt")],
            cwd=run, env=_env(), capture_output=True, text=True, timeout=300)
        assert validate.returncode == 0, validate.stdout[-3000:] + validate.stderr[-3000:]

        (run / "release").touch()
        assert finish(first) == 0, output(first)[-4000:]
    finally:
        stop(first)
    (records,) = records_by_process(run / "steps.jsonl")
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))  # the first ran undisturbed


def _env() -> dict:
    here = Path(__file__).parent
    paths = [str(here), str(here.parents[1]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}


def test_the_lock_dies_with_its_holder_though_a_forked_child_lives_on(tmp_path):
    """A DataLoader worker is a forked child of the trainer; it must not keep the folder locked
    once the trainer is killed."""
    script = textwrap.dedent(f"""
        import os, sys, time
        from mmkit import run_lock
        run_lock.acquire({str(tmp_path)!r})
        child = os.fork()
        if child == 0:
            # Running here means fork's after-in-child hooks ran; the parent reports only then
            # (under load the child may not yet have been scheduled when the parent is killed).
            open({str(tmp_path / "child_started")!r}, "w").close()
            time.sleep(120)
            os._exit(0)
        while not os.path.exists({str(tmp_path / "child_started")!r}):
            time.sleep(0.01)
        print(child, flush=True)
        time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        child = int(holder.stdout.readline())
        with pytest.raises(run_lock.RunFolderLocked, match=rf"pid {holder.pid} on .*{run_lock.LOCK_NAME}"):
            run_lock.acquire(tmp_path)
        holder.kill()
        holder.wait(timeout=30)
        os.kill(child, 0)  # still alive
        run_lock.acquire(tmp_path)
        assert f'"pid": {os.getpid()}' in _lock_owner(tmp_path)
        assert run_lock.acquire(tmp_path) == tmp_path.resolve()  # re-entrant in one process
        run_lock.release(tmp_path)
        assert run_lock.holds(tmp_path)
        run_lock.release(tmp_path)
        assert not run_lock.holds(tmp_path)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


@pytest.mark.slow
def test_after_a_sigkill_a_new_fit_takes_the_lock_and_continues_metrics_csv(tmp_path):
    run = tmp_path / "run"
    stop_step = EVERY + 2  # killed two steps after the checkpoint of step 5
    write_config(run, num_workers=1, pause_at=stop_step)
    # Lightning's CSVLogger as the recipes name it; `mmkit fit` swaps in mmkit.loggers.CSVLogger.
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(run), "name": "", "version": ""}}
    _edit_recipe(run, logger=logger, log_every_n_steps=1)
    first = start(run, "--ckpt_path", "last")
    try:
        wait_for(run / "paused", first)
        assert f'"pid": {first.pid}' in _lock_owner(run)
        before = _rows(run / "metrics.csv")
        os.kill(first.pid, signal.SIGKILL)  # the trainer only: its DataLoader worker may outlive it a while
        assert first.wait(timeout=60) == -signal.SIGKILL
        second = start(run, "--ckpt_path", "last")
        try:
            assert finish(second) == 0, output(second)[-4000:]
        finally:
            stop(second)
    finally:
        stop(first)
    assert f"resuming from {run / 'checkpoints' / f'epoch=0-step={EVERY}.ckpt'}" in output(second)
    killed, resumed = records_by_process(run / "steps.jsonl")
    assert killed[-1]["step"] == stop_step and resumed[0]["step"] == EVERY + 1

    after = _rows(run / "metrics.csv")
    train = [r for r in after if r.get("train/loss")]
    # Lightning logs step S's training metrics at row step S - 1: every trained step once, the
    # two trained again after the resume from their second run.
    assert [int(r["step"]) for r in train] == list(range(TOTAL_STEPS))
    kept = [r for r in before if int(r["step"]) < EVERY]
    assert kept and [{k: v for k, v in r.items() if v} for r in after[: len(kept)]] == [
        {k: v for k, v in r.items() if v} for r in kept]  # the rows before the restart, as written
    by_step = {int(r["step"]): float(r["train/loss"]) for r in train}
    assert [by_step[r["step"] - 1] for r in resumed] == pytest.approx([r["loss"] for r in resumed], rel=1e-5)
    # validation after batches 5 and 10 of each 12-batch epoch; the first (step 5) ran before the kill
    assert [int(r["step"]) for r in after if r.get("val/loss")] == [4, 9, 16, 21]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_resumed_logger_keeps_old_rows_drops_those_it_logs_again_and_widens_the_header(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss\n0,0,3.0\n0,1,2.5\n0,2,2.4\n")
    logger = CSVLogger(tmp_path, name="", version="")
    logger.resuming = True
    logger.log_metrics({"train/loss": 2.2, "train/new": 7.0, "epoch": 0}, step=2)  # row 2 trained again
    logger.log_metrics({"train/loss": 2.0, "epoch": 0}, step=3)
    logger.save()
    assert metrics.read_text().splitlines() == [
        "epoch,step,train/loss,train/new", "0,0,3.0,", "0,1,2.5,", "0,2,2.2,7.0", "0,3,2.0,"]
    logger.log_metrics({"val/loss": 1.0, "epoch": 0}, step=3)  # a new key later: Lightning's rewrite path
    logger.save()
    assert metrics.read_text().splitlines()[0] == "epoch,step,train/loss,train/new,val/loss"
    assert len(metrics.read_text().splitlines()) == 6 and not list(tmp_path.glob(".*.tmp"))

    fresh = CSVLogger(tmp_path, name="", version="")  # not resuming: the file is replaced, with a warning
    with pytest.warns(UserWarning, match="this run replaces them"):
        fresh.log_metrics({"x": 1.0}, step=0)
    fresh.save()
    assert metrics.read_text().splitlines() == ["step,x", "0,1.0"]


def test_a_new_run_warns_only_when_it_replaces_an_earlier_runs_metrics(tmp_path):
    import warnings

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / run_lock.LOCK_NAME).write_text("{}")  # mmkit's own files of this run: not "previous logs"
    (folder / "config.yaml").write_text("seed_everything: 0\n")
    with warnings.catch_warnings(record=True) as fresh:
        warnings.simplefilter("always")
        CSVLogger(save_dir=str(folder), name="", version="").experiment
    assert not [w for w in fresh if "metrics" in str(w.message) or "not empty" in str(w.message)], fresh

    (folder / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    with pytest.warns(UserWarning, match=r"metrics.csv holds an earlier run's metrics; this run replaces them"):
        CSVLogger(save_dir=str(folder), name="", version="").experiment
    assert not (folder / "metrics.csv").exists()  # replaced from the new run's first save on
