"""``FSDP2Strategy``: FSDP2 over every process of the job, whatever their number.

Lightning's ``ModelParallelStrategy`` (the route to ``fully_shard``) asks for a data-parallel and a
tensor-parallel size whose product is the world size, and its defaults ("auto") put every GPU of a
node into the tensor-parallel dimension. mmkit shards whole towers over the data-parallel
dimension only (``mmkit.parallel.fsdp2_sharding``) and has no tensor-parallel plan, so those defaults
would make the GPUs of a node train on the same data. This subclass fixes tensor parallelism at 1
and the data-parallel size at the world size, so one recipe runs on any number of GPUs or nodes.

Importing this module registers it as ``strategy: fsdp2`` (``mmkit fit`` does so), next to
Lightning's ``fsdp`` (FSDP1, which mmkit does not use).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from mmkit.safe_unpickle import weights_only_everywhere
from mmkit.parallel.sharded_checkpoint import is_distributed_checkpoint, verify_distributed_checkpoint


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over all processes.

    Args:
        save_distributed_checkpoint: each rank writes its shard into a checkpoint folder (True), or
            rank 0 writes one file with the full weights and optimizer state (False: needs them to
            fit in one process's CPU memory). ``mmkit export`` reads both.
        process_group_backend: e.g. ``nccl`` (GPU default) or ``gloo`` (CPU default).
        timeout: collective timeout.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        # Known here (set by the trainer's connector before the processes start).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # torch unpickles a checkpoint folder's .metadata with plain pickle and its non-tensor items
        # with weights_only=False: check every pickle first, and force weights_only on the loads.
        # Also covers Trainer.fit(ckpt_path=...) from Python, which mmkit's CLI checks do not see.
        if weights_only is False:  # the caller trusts the checkpoint explicitly
            return super().load_checkpoint(checkpoint_path, weights_only)
        path = self.broadcast(checkpoint_path)
        if is_distributed_checkpoint(path):
            verify_distributed_checkpoint(path)
        with weights_only_everywhere():
            return super().load_checkpoint(path, weights_only)


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register(
        "fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) over all processes, mmkit's sharding of the towers"
    )
