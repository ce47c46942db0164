"""Real `mmkit fit` subprocesses for the crash-and-resume tests: a tiny CLIPPretrain on 48
SyntheticShapes samples (12 batches of 4 per epoch, 2 epochs = 24 optimizer steps), step
checkpoints every 5 steps, validation every 5 batches, every trained step recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).parent
REPO = HERE.parents[1]
ARCH = REPO / "tests" / "models" / "tiny_test_arch.json"
SAMPLES, BATCH, EPOCHS = 48, 4, 2
STEPS_PER_EPOCH = SAMPLES // BATCH
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
EVERY = 5  # step-checkpoint interval
RUN_TIMEOUT = 600


def write_config(run: Path, num_workers: int = 0, pause_at: int | None = None, devices: int = 1,
                 pause_phase: str = "train", persistent_workers: bool = False, test: bool = False) -> Path:
    """The run's recipe. ``pause_phase``: where ``PauseAt`` pauses (see there); ``test``: a test
    split, run by ``mmkit fit`` after the fit (``test_after_fit``)."""
    run.mkdir(parents=True, exist_ok=True)
    callbacks = [
        {"class_path": "mmkit.callbacks.StepCheckpoint", "init_args": {"every_n_train_steps": EVERY, "keep_last": 3}},
        {"class_path": "resume_helpers.StepRecorder", "init_args": {"path": str(run / "steps.jsonl")}},
    ]
    if pause_at is not None:
        callbacks.append({"class_path": "resume_helpers.PauseAt",
                          "init_args": {"step": pause_at, "marker": str(run / "paused"), "timeout": 120,
                                        "phase": pause_phase}})
    shapes = "mmkit.data.SyntheticShapes"
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
            "max_epochs": EPOCHS, "deterministic": True,
            "val_check_interval": EVERY, "num_sanity_val_steps": 0, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(run), "callbacks": callbacks,
        },
        "model": {"class_path": "mmkit.CLIPPretrain", "init_args": {
            "model": {"class_path": "mmkit.models.OpenCLIP", "init_args": {"arch": str(ARCH)}},
            "loss": {"class_path": "resume_helpers.NoisyClipLoss"},
            "warmup_steps": 3, "export_dir": "",
        }},
        "data": {"class_path": "mmkit.data.ImageTextDataModule", "init_args": {
            "train": {"class_path": shapes, "init_args": {"size": SAMPLES, "seed": 0, "image_size": 16}},
            "val": {"class_path": shapes, "init_args": {"size": 8, "seed": 1, "image_size": 16}},
            **({"test": {"class_path": shapes, "init_args": {"size": 8, "seed": 2, "image_size": 16}}} if test else {}),
            "batch_size": BATCH, "num_workers": num_workers, "persistent_workers": persistent_workers,
        }},
        "test_after_fit": test,
    }
    path = run / "recipe.yaml"  # not config.yaml: the CLI saves its resolved config there
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(run: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m mmkit.cli fit --config run/recipe.yaml ARGS`` in its own process group (so a
    test can signal the group, like a scheduler, and clean up DataLoader workers)."""
    paths = [str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1",
                **(env or {})}
    log = open(run / f"log-{time.monotonic_ns()}.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmkit.cli", "fit", "--config", str(run / "recipe.yaml"), *args],
        cwd=run, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=_default_sigint,
    )
    proc.log_path = Path(log.name)  # type: ignore[attr-defined]
    return proc


def _default_sigint() -> None:
    # pytest started in the background of a non-interactive shell has SIGINT ignored (POSIX), the
    # run would inherit that and Python keeps it: give the run the disposition Ctrl+C meets.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()  # type: ignore[attr-defined]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {path.name}:\n{output(proc)[-4000:]}")
        if time.monotonic() > deadline:
            stop(proc)
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.1)


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"training did not finish in {timeout}s:\n{output(proc)[-4000:]}") from None


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of this process's group (its DataLoader workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def live_group_members(pgid: int) -> list[str]:
    """The processes of process group ``pgid`` that are still running (zombies aside), from /proc:
    "pid (name)" of each."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid pgrp ...": comm may itself hold spaces and parentheses
        end = text.rindex(")")
        state, _ppid, pgrp = text[end + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(text[: end + 1])
    return members


def records_by_process(path: Path) -> list[list[dict]]:
    """The StepRecorder lines, one list per training process, in the order the processes ran."""
    runs: dict[int, list[dict]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        runs.setdefault(record["pid"], []).append(record)
    return list(runs.values())
