#!/usr/bin/env bash
# Launch `mmkit fit` with torchrun: one process per GPU, on one node or several.
#
# One node, 8 GPUs:
#   NPROC_PER_NODE=8 bash recipes/launch/torchrun.sh recipes/webdataset_vitb32_ddp.yaml
# Four nodes x 8 GPUs: run the same line on every node, NODE_RANK=0..3, MASTER_ADDR = node 0's address:
#   NNODES=4 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \
#     bash recipes/launch/torchrun.sh recipes/webdataset_vitb32_ddp.yaml
# Anything after the recipe goes to `mmkit fit` (more --config files, --trainer.max_steps 1000, ...).
# Without an activated environment, name its interpreter: PYTHON=/path/to/venv/bin/python bash ...
#
# Lightning needs no flag for this: torchrun sets TORCHELASTIC_RUN_ID, so the Trainer picks
# TorchElasticEnvironment (ahead of SLURM) and takes RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK,
# MASTER_ADDR and MASTER_PORT from torchrun. It also requires devices x num_nodes == WORLD_SIZE,
# hence the recipe's trainer.devices / trainer.num_nodes are overridden from the same variables.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: [NNODES=1] [NPROC_PER_NODE=1] [NODE_RANK=0] [MASTER_ADDR=127.0.0.1] [MASTER_PORT=29500]" \
         "$0 RECIPE.yaml [mmkit fit args...]" >&2
    exit 2
fi
recipe=$1
shift

NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

# The Python of the environment that installed mmkit: PYTHON, else python3 from PATH (an activated
# venv). torchrun runs as that interpreter's module, so it needs no PATH entry of its own either.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import mmkit" 2>/dev/null; then
    echo "$0: '$PYTHON' cannot import mmkit: activate the environment that installed it, or set" \
         "PYTHON=/path/to/venv/bin/python" >&2
    exit 127
fi

# Static rendezvous at MASTER_ADDR:MASTER_PORT (node 0 hosts the store).
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    --module mmkit.cli fit --config "$recipe" \
    --trainer.num_nodes "$NNODES" \
    --trainer.devices "$NPROC_PER_NODE" \
    "$@"
