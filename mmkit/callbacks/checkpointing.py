"""Step-interval checkpoints written atomically, the newest few kept, and a checkpoint on
preemption (SIGTERM, or SLURM's requeue signal) before the process exits."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmkit import distributed as D
from mmkit import run_lock
from mmkit.checkpoint_io import AtomicCheckpointIO, atomic_symlink, remove_write_debris
from mmkit.checksum import remove_with_sidecar
from mmkit.config_checks import Range, check_settings

_NAME = re.compile(r"^epoch=(\d+)-step=(\d+)\.ckpt$")


class Preempted(SIGTERMException):
    """Raised (a ``SystemExit``) after the preemption checkpoint is written; the exit status is
    128 + the signal number, like a process the signal had killed, so no wrapper mistakes a
    preempted run for a finished one."""


class StepCheckpoint(Checkpoint):
    """Saves ``<dirpath>/epoch=E-step=S.ckpt`` every ``every_n_train_steps`` optimizer steps and at
    the end of every (``every_n_epochs``-th) training epoch, keeps the ``keep_last`` most recent,
    and saves before exiting when the job is told to stop.

    Writes are atomic (a temporary file in the same folder, fsynced, then renamed; see
    ``mmkit.checkpoint_io``): the strategy's plain ``TorchCheckpointIO`` is replaced by
    ``AtomicCheckpointIO`` when the run starts (DeepSpeed and sharded strategies, which write
    folders of their own, are left alone). Resume with ``mmkit fit ... --ckpt_path last``, which
    picks the checkpoint furthest into training that loads and matches its digest, and skips
    broken ones. Each file gets a SHA-256 digest in ``<name>.digest``, removed with it when it is
    pruned.

    Global rank 0 holds the run folder's lock (``mmkit.run_lock``; the CLI takes it already) for
    the fit, so a second run started in the same folder fails instead of deleting this run's
    temporary files and checkpoints; only the lock holder cleans up what a killed run left.

    Preemption: SIGTERM (scancel, Kubernetes, ``timeout``) and SIGUSR1 (or the requeue signal of a
    ``SLURMEnvironment``) set a flag; at the end of the current training step every rank agrees,
    the checkpoint is written, and the process exits with status 128 + signal. Under SLURM with
    ``auto_requeue`` the requeue signal instead writes ``hpc_ckpt_<N>.ckpt`` in
    ``trainer.default_root_dir`` (which a requeued ``fit`` loads by itself) and global rank 0 runs
    ``scontrol requeue``. Lightning would otherwise save from inside the signal handler, at an
    arbitrary point of a step; here the state saved is always between two steps.

    Args:
        dirpath: Folder of the checkpoints; default ``<trainer.default_root_dir>/checkpoints``, which
            stays the same across restarts whatever the logger's version.
        every_n_train_steps: Save every this many optimizer steps; 0 saves only at epoch ends and on
            preemption.
        keep_last: How many of the most recently written checkpoints in ``dirpath`` to keep (older
            ones matching ``epoch=*-step=*.ckpt`` are deleted); -1 keeps all.
        save_on_train_epoch_end: Also save at the end of training epochs (see ``every_n_epochs``);
            False is the same as ``every_n_epochs=0``.
        every_n_epochs: Save at the end of every this many training epochs, and at the end of the
            epoch in which training stops (so a finished run's ``last.ckpt`` is its final state);
            0 writes no epoch-end checkpoints. Raise it, or set 0 and rely on
            ``every_n_train_steps``, when epochs are short: each checkpoint holds the weights and
            the optimizer's moments (about 12 bytes per parameter with AdamW in fp32).
        save_last: Keep ``last.ckpt`` pointing at the newest checkpoint (a symbolic link).
        save_on_preemption: Save and exit on SIGTERM / SIGUSR1 (see above).
    """

    setting_ranges = {
        "every_n_train_steps": Range(ge=0, integer=True),
        "keep_last": Range(ge=1, integer=True, also=((-1, "keep all"),)),
        "every_n_epochs": Range(ge=0, integer=True),
    }

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 1000,
        keep_last: int = 3,
        save_on_train_epoch_end: bool = True,
        save_last: bool = True,
        save_on_preemption: bool = True,
        every_n_epochs: int = 1,
    ) -> None:
        check_settings(self, locals(), StepCheckpoint.setting_ranges)
        super().__init__()
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.keep_last = keep_last
        self.save_on_train_epoch_end = save_on_train_epoch_end
        self.save_last = save_last
        self.save_on_preemption = save_on_preemption
        self.every_n_epochs = every_n_epochs
        self.last_path: Path | None = None
        self._last_saved_step = -1
        self._signal_received: int | None = None
        self._previous_handler: Any = None
        self._handled_signal: int | None = None
        self._locked: Path | None = None

    @property
    def preemption_signal(self) -> int | None:
        """The stop signal this process received (not yet agreed with the other ranks), or None."""
        return self._signal_received

    # -- setup / teardown --------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.dirpath = str(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        self._signal_received, self._last_saved_step = None, -1
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero:
            # A second run in this folder fails here (a plain Trainer; under the CLI the lock is
            # already held): with the lock, every temporary file is a dead writer's.
            self._locked = run_lock.acquire(trainer.default_root_dir)
            for folder in dict.fromkeys([self.dirpath, str(trainer.default_root_dir)]):  # hpc_ckpt_* go there
                remove_write_debris(folder)  # left by a kill during a write or a pruning
        if self.save_on_preemption:
            self._install_handler(trainer)

    def _install_handler(self, trainer: L.Trainer) -> None:
        # Installed before Lightning registers its own handlers (after `setup`): Lightning then
        # leaves this signal to us and does not save from inside its handler. SIGTERM is Lightning's
        # (it sets `trainer.received_sigterm`, which we read).
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
            return
        env = trainer._accelerator_connector.cluster_environment
        signum = env.requeue_signal if isinstance(env, SLURMEnvironment) and env.requeue_signal else signal.SIGUSR1
        self._handled_signal = int(signum)
        previous = signal.signal(signum, self._on_signal)
        self._previous_handler = None if previous == self._on_signal else previous

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._handled_signal is None:
            # Outside a fit (Lightning may reinstall this handler after a failed one): act as the
            # handler it replaced would.
            previous = self._previous_handler if self._previous_handler is not None else signal.SIG_DFL
            signal.signal(signum, previous)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
            return
        self._signal_received = signum  # acted on at the end of the current training step

    def _restore_handler(self) -> None:
        if self._handled_signal is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self._handled_signal, self._previous_handler or signal.SIG_DFL)
        self._handled_signal = None

    def _release_lock(self) -> None:
        if self._locked is not None:
            run_lock.release(self._locked)
            self._locked = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handler()
        self._release_lock()

    # -- saving ------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.fast_dev_run:
            return
        step = trainer.global_step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self._last_saved_step:
            self.save(trainer)
        if self.save_on_preemption:
            signum = self._agreed_signal(trainer, pl_module)
            if signum is not None:
                self._preempt(trainer, signum)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self._last_saved_step or trainer.fast_dev_run:
            return
        if not self.save_on_train_epoch_end or not self.every_n_epochs:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 or _training_stops(trainer):
            self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning stops by itself on a SIGTERM that arrives after our end-of-step check (during
        # validation, say); it stops between steps, so the state is still a consistent one to save.
        self._restore_handler()
        try:
            self._maybe_save_on_exception(trainer, exception)
        finally:
            self._release_lock()  # Lightning does not call `teardown` after an exception

    def _maybe_save_on_exception(self, trainer: L.Trainer, exception: BaseException) -> None:
        if (
            self.save_on_preemption
            and isinstance(exception, SIGTERMException)
            and not isinstance(exception, Preempted)
            and trainer.state.fn == TrainerFn.FITTING
            and trainer.global_step != self._last_saved_step
        ):
            path = self.save(trainer)
            _say(trainer, f"mmkit: SIGTERM: saved {path} at step {trainer.global_step}")

    def save(self, trainer: L.Trainer, path: str | Path | None = None) -> Path:
        """Write a checkpoint now (every rank must call this), then prune old ones."""
        path = Path(path or Path(self.dirpath) / f"epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # collective: rank 0 writes, all wait for it
        self._last_saved_step = trainer.global_step
        if trainer.is_global_zero and path.parent == Path(self.dirpath):
            if self.save_last:
                try:
                    atomic_symlink(path, path.parent / "last.ckpt")
                except OSError:  # a filesystem without symbolic links: no last.ckpt
                    pass
            self._prune()
        self.last_path = path
        return path

    def _prune(self) -> None:
        if self.keep_last < 0:
            return
        ours = []
        for p in Path(self.dirpath).iterdir():
            match = _NAME.match(p.name)
            if match and p.is_file() and not p.is_symlink():
                ours.append((p.stat().st_mtime_ns, int(match.group(2)), p))
        # Newest written first (not highest step: after resuming from an older checkpoint, the new
        # line of training is what must be kept).
        ours.sort(reverse=True)
        for _, _, p in ours[self.keep_last :]:
            remove_with_sidecar(p)

    # -- preemption --------------------------------------------------------------------------
    def _agreed_signal(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
        term = 1.0 if trainer.received_sigterm else 0.0
        other = 1.0 if self._signal_received is not None else 0.0
        if trainer.world_size > 1:  # all ranks must save and stop at the same step
            flags = D.all_reduce_sum(torch.tensor([term, other], device=pl_module.device))
            term, other = float(flags[0]), float(flags[1])
        if term:
            return int(signal.SIGTERM)
        if other:
            return self._handled_signal or int(signal.SIGUSR1)
        return None

    def _preempt(self, trainer: L.Trainer, signum: int) -> None:
        env = trainer._accelerator_connector.cluster_environment
        requeue = (
            isinstance(env, SLURMEnvironment) and env.auto_requeue and signum != signal.SIGTERM
        )
        if requeue:
            # where Lightning looks by itself when the requeued job runs `fit` again
            path = self.save(trainer, trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        elif trainer.global_step != self._last_saved_step:
            path = self.save(trainer)
        else:
            path = self.last_path
        name = signal.Signals(signum).name
        _say(trainer, f"mmkit: {name} received: saved {path} at step {trainer.global_step}; exiting "
                      + ("after requeueing the SLURM job" if requeue else "(resume with --ckpt_path last)"))
        if requeue and trainer.is_global_zero:
            _requeue_slurm_job()
        trainer.strategy.barrier("mmkit_preempted")
        raise Preempted(128 + signum)


def _training_stops(trainer: L.Trainer) -> bool:
    """Whether the epoch ending now is the last of the fit (``on_train_epoch_end`` runs before
    Lightning counts the epoch as completed)."""
    if trainer.should_stop:
        return True
    if trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    return max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs


def _requeue_slurm_job() -> None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        ok, detail = result.returncode == 0, (result.stderr or result.stdout).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, detail = False, str(e)
    print(f"mmkit: requeued SLURM job {job}" if ok else f"mmkit: `scontrol requeue {job}` failed: {detail}", flush=True)


def _say(trainer: L.Trainer, message: str) -> None:
    if trainer.is_global_zero:
        print(message, flush=True)
