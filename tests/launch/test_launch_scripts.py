"""The cluster launchers in recipes/launch parse as bash and pass the settings Lightning needs."""

import re
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).parents[2] / "recipes" / "launch"
TORCHRUN = LAUNCH / "torchrun.sh"
SBATCH = LAUNCH / "slurm.sbatch"


def _code(path: Path) -> str:
    """The script without comment lines (#SBATCH directives are kept: they are comments to bash)."""
    return "\n".join(s for s in path.read_text().splitlines() if not s.lstrip().startswith("#") or s.startswith("#SBATCH"))


@pytest.mark.parametrize("script", [TORCHRUN, SBATCH], ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", [TORCHRUN, SBATCH], ids=lambda p: p.name)
def test_header_gives_the_exact_command(script):
    header = script.read_text().split("\nset -euo pipefail", 1)[0]
    launcher = "bash recipes/launch/torchrun.sh" if script == TORCHRUN else "sbatch recipes/launch/slurm.sbatch"
    assert re.search(rf"^#\s+(\S+=\S+ )*{re.escape(launcher)} recipes/\S+\.yaml", header, flags=re.M), header


def test_without_a_recipe_the_scripts_print_usage_and_fail():
    for script in (TORCHRUN, SBATCH):
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "usage" in proc.stderr, script.name


def test_torchrun_script_uses_the_cluster_variables():
    code = _code(TORCHRUN)
    for var in ("NNODES", "NPROC_PER_NODE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        assert re.search(rf"^{var}=\$\{{{var}:-", code, flags=re.M), f"{var} not overridable from the environment"
    for flag, var in [("--nnodes", "NNODES"), ("--nproc_per_node", "NPROC_PER_NODE"), ("--node_rank", "NODE_RANK"),
                      ("--master_addr", "MASTER_ADDR"), ("--master_port", "MASTER_PORT")]:  # fmt: skip
        assert f'{flag} "${var}"' in code, flag
    # The interpreter that installed mmkit runs torchrun and the ranks: no activated venv needed.
    assert re.search(r'"\$PYTHON" -m torch.distributed.run', code)
    assert re.search(r"--module mmkit.cli fit --config", code)
    # TorchElasticEnvironment requires devices x num_nodes == WORLD_SIZE.
    assert '--trainer.num_nodes "$NNODES"' in code and '--trainer.devices "$NPROC_PER_NODE"' in code


def test_sbatch_requeues_on_sigusr1_and_launches_with_srun():
    code = _code(SBATCH)
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", code, flags=re.M))
    assert directives["signal"] == "SIGUSR1@90"  # Lightning's SLURMEnvironment default requeue signal
    assert "requeue" in directives
    assert {"nodes", "ntasks-per-node", "gres"} <= set(directives)
    assert directives["gres"] == f"gpu:{directives['ntasks-per-node']}"  # one task per GPU
    # Directives after the first command are ignored by sbatch.
    first_command = next(i for i, s in enumerate(code.splitlines()) if s.strip() and not s.startswith("#"))
    assert not any(s.startswith("#SBATCH") for s in code.splitlines()[first_command:])
    assert re.search(r"^srun mmkit fit --config", code, flags=re.M)
    # SLURMEnvironment checks both against the allocation.
    assert '--trainer.num_nodes "$SLURM_NNODES"' in code and '--trainer.devices "$SLURM_NTASKS_PER_NODE"' in code
