"""Processes started from outside Lightning take the same first step as one process with the whole
batch: two "nodes" of one process each on localhost, started by hand with the variables an external
launcher sets (Lightning's LightningEnvironment), and one node of two processes under torchrun
(TorchElasticEnvironment, no extra flag). Gradients after DDP's averaging and the validation
retrieval metrics must equal those of a single process with the double batch."""

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "techniques" / "ddp_step_script.py"
TIMEOUT_S = 600
# Variables that would make Lightning pick another environment or other ranks than the test sets.
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def _clean_env(**extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))
    }
    # One thread per process, as torchrun sets: the processes must not fight over a few cores.
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Group:
    """Processes that form one distributed job; if one fails the others are stopped (they would
    otherwise wait for their peer until the process-group timeout)."""

    def __init__(self, name: str, cmds: list[tuple[list[str], dict]], logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        self.name, self.error, self.procs = name, None, []
        for i, (cmd, env) in enumerate(cmds):
            log_path = logdir / f"{name}{i}.log"
            with open(log_path, "w") as log:
                self.procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log_path))

    def poll(self, expired: bool) -> bool:
        """True while still running; on failure or expiry stops the group and records why."""
        codes = [p.poll() for p, _ in self.procs]
        bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if not bad and not expired:
            return None in codes
        if self.error is None and (bad or None in codes):
            i = bad[0] if bad else codes.index(None)
            why = f"exited with {codes[i]}" if bad else f"timed out after {TIMEOUT_S} s"
            self.error = f"{self.name} process {i} {why}:\n" + self.procs[i][1].read_text()[-4000:]
        self.kill()
        return False

    def kill(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _load(out: Path) -> dict:
    return {"grads": torch.load(out / "grads.pt"), **torch.load(out / "metrics.pt")}


def _single_process_reference(out: Path) -> dict:
    """One process, batch 8 (2 ranks x 4), full-matrix InfoNCE: the script's main() run in this
    process (saves starting one more interpreter)."""
    spec = importlib.util.spec_from_file_location("ddp_step_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [str(SCRIPT), str(out), "1", "8", "clip"])
        for var in _LAUNCHER_VARS:
            mp.delenv(var, raising=False)
        script.main()
    return _load(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both distributed jobs start together and the reference runs meanwhile: on a busy machine
    most of each run is interpreter start-up, so overlapping them roughly halves the wall time."""
    root = tmp_path_factory.mktemp("launch")
    # Two "nodes": what LightningEnvironment reads when processes are created externally (LOCAL_RANK
    # present) is NODE_RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; global rank and world size
    # come from the Trainer (node_rank * devices + local_rank, num_nodes * devices). WORLD_SIZE is
    # set only because launchers conventionally do.
    port = str(_free_port())
    two_nodes = [
        (
            [sys.executable, str(SCRIPT), str(root / f"node{r}"), "1", "4", "clip_local", "2"],
            _clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(r), WORLD_SIZE="2", LOCAL_RANK="0"),
        )
        for r in (0, 1)  # separate output dirs, as on separate machines
    ]
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    elastic = launcher + [
        "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(SCRIPT), str(root / "torchrun"), "2", "4", "clip_local",
    ]  # fmt: skip
    groups = {
        "two_nodes": _Group("two_nodes", two_nodes, root / "logs"),
        "torchrun": _Group("torchrun", [(elastic, _clean_env())], root / "logs"),
    }
    try:
        single = _single_process_reference(root / "single")
        deadline = time.monotonic() + TIMEOUT_S
        while any([g.poll(time.monotonic() > deadline) for g in groups.values()]):
            time.sleep(0.5)
    finally:
        for g in groups.values():
            g.kill()
    assert single["world"] == 1
    return {"root": root, "single": single, **groups}


def _assert_same_step(dist: dict, single: dict) -> None:
    assert set(dist["grads"]) == set(single["grads"]) and len(single["grads"]) > 10
    for name, ref in single["grads"].items():
        assert torch.allclose(dist["grads"][name], ref, atol=1e-10, rtol=0), name
    val = {k: v for k, v in single["metrics"].items() if k.startswith("val/") and k != "val/loss"}
    assert val  # retrieval metrics over the whole (unevenly sharded) split
    for key, value in val.items():
        assert dist["metrics"][key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.slow
def test_two_nodes_launched_by_hand_equal_one_process(runs):
    assert runs["two_nodes"].error is None, runs["two_nodes"].error
    assert not (runs["root"] / "node1" / "grads.pt").exists()  # node 1 really ran as global rank 1
    dist = _load(runs["root"] / "node0")
    assert dist["world"] == 2 and dist["env"] == "LightningEnvironment"
    _assert_same_step(dist, runs["single"])


@pytest.mark.slow
def test_torchrun_is_picked_up_without_flags(runs):
    assert runs["torchrun"].error is None, runs["torchrun"].error
    dist = _load(runs["root"] / "torchrun")
    assert dist["world"] == 2 and dist["env"] == "TorchElasticEnvironment"
    _assert_same_step(dist, runs["single"])
