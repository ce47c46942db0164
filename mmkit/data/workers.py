"""What map-style loading needs so a resumed run reproduces an uninterrupted one, whichever worker
process loads a batch: every batch carries its own seed, and loading and augmenting it run with
the random number generators seeded from it. Also keeps stop signals away from the workers, and
ends the workers still running when the main process exits.

A worker's own RNG depends on a base seed drawn when the loader's iterator is created and on
which worker gets which batch; both differ after a resume (the iterator starts mid-epoch, in a
fresh process). A seed from (data seed, epoch, batch, rank) does not.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.util
import os
import random
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from mmkit.rng_state import rng_state_preserved


class IndexBatch(list):
    """The indices of one batch (a list, as the sampler yields it) and the seed for loading it."""

    def __init__(self, indices, seed: int) -> None:
        super().__init__(indices)
        self.seed = seed


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """A well-mixed 63-bit seed from the batch's coordinates."""
    words = np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


@contextlib.contextmanager
def seeded_rngs(seed: int | None) -> Iterator[None]:
    """Run the body with torch's, numpy's and Python's global RNGs seeded from ``seed``, then put
    back their previous states (so loading in the main process leaves training's RNG untouched).
    ``None``: no seeding."""
    if seed is None:
        yield
        return
    with rng_state_preserved():
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        yield


class SeededSamples(list):
    """The fetched samples of one batch, still carrying the batch's seed to the collate function."""

    def __init__(self, samples, seed: int | None) -> None:
        super().__init__(samples)
        self.seed = seed


class SeededCollate:
    """Wraps a collate function (image transforms, augmentation, tokenization) so it runs under the
    batch's seed (+1: a stream apart from the one loading used).

    Args:
        collate_fn: The collate function to wrap.
    """

    def __init__(self, collate_fn: Callable[[list], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list) -> Any:
        seed = getattr(samples, "seed", None)
        with seeded_rngs(None if seed is None else seed + 1):
            return self.collate_fn(samples)

    def __getattr__(self, name: str) -> Any:  # e.g. counters kept by the wrapped function
        if name == "collate_fn":
            raise AttributeError(name)
        return getattr(self.collate_fn, name)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM and SIGUSR1 are for the main process, which saves a
    checkpoint and then shuts its workers down. Schedulers signal a job's whole process group; a
    worker killed by the signal (or running the trainer's handler it inherited) would fail the
    step before the checkpoint is written. Pass such workers to ``end_at_exit``: what ends workers
    at exit sends SIGTERM."""
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


# A worker that ignores SIGTERM can outlive an exit. When the main process ends with a loader's
# iterator still alive (Lightning's teardown after an exception, SIGTERM or Ctrl+C during the
# validation inside `fit` leaves the training loader's iterator and its workers running), torch's
# own worker shutdown does nothing at interpreter exit, and multiprocessing's exit hook sends each
# daemonic child SIGTERM and then joins it without a timeout: it would wait forever.
_workers: weakref.WeakSet = weakref.WeakSet()  # the worker processes to end at exit
_ends_workers_in: int | None = None  # the process whose exit is set to end them


def end_at_exit(workers: Iterable[multiprocessing.process.BaseProcess]) -> None:
    """Have this process SIGKILL ``workers`` (DataLoader worker processes that ignore SIGTERM) that
    are still running when it exits, before multiprocessing's exit hook joins them."""
    global _ends_workers_in
    if _ends_workers_in != os.getpid():
        # An exit finalizer runs inside multiprocessing's exit hook, before it signals and joins the
        # children, whichever order the atexit hooks run in.
        multiprocessing.util.Finalize(None, _end_workers, exitpriority=100)
        _ends_workers_in = os.getpid()
        _workers.clear()  # a forked process's copy of its parent's: not its children
    _workers.update(workers)


def _end_workers() -> None:
    # SIGKILL the workers passed to `end_at_exit` that are still running, and reap them. Nothing of
    # theirs needs a clean exit: they only load data for this process.
    if _ends_workers_in != os.getpid():  # a copy of the finalizer in a forked process: not its children
        return
    workers = [p for p in list(_workers) if p.is_alive()]
    if not workers:
        return
    # torch's SIGCHLD handler raises "DataLoader worker (pid N) is killed by signal" for a worker
    # whose loader was not shut down; set aside until the workers are reaped, it finds nothing.
    handler = None
    if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGCHLD)
        if handler is not None:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for p in workers:
            p.kill()
        for p in workers:
            p.join(timeout=30)
    finally:
        if handler is not None:
            signal.signal(signal.SIGCHLD, handler)
