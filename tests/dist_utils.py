"""Run a function on N real processes over gloo (localhost), for exactness tests."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 300  # a collective mismatch must fail the test, not hang CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_on_processes(fn, world: int, *args) -> None:
    """``fn(rank, world, *args)`` on ``world`` spawned processes; fails if any process fails or
    the group does not finish within ``TIMEOUT_S``. ``fn`` must be importable (module level) and
    report results through files."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn", join=False)
    deadline = time.monotonic() + TIMEOUT_S
    # join() returns when any process exits (raising if one failed); loop until all are done.
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"distributed test did not finish within {TIMEOUT_S}s")
