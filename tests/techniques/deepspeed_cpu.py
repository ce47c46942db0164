"""Running DeepSpeed on CPU for tests: real gloo processes, no compiled ops.

Import this before ``deepspeed`` in every process that uses it (workers, the Lightning script):
it sets ``DS_ACCELERATOR=cpu``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# DeepSpeed picks its accelerator when first imported; there is no GPU in CI.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from mmkit.parallel.deepspeed_strategy import DeepSpeedStrategy  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def skip_shm_kernel() -> None:
    """DeepSpeed's CPU communication backend JIT-compiles a C++ shared-memory all-reduce kernel
    (minutes on a busy 2-core machine) when the process group is set up; only its
    ``inference_all_reduce`` uses it. Without it every collective goes through gloo, as here."""
    import deepspeed.comm.torch  # noqa: F401  (``deepspeed.comm.torch`` the attribute is torch itself)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_process(rank: int, world: int) -> None:
    """In a process whose gloo group ``tests/dist_utils.run_on_processes`` already set up: the
    environment DeepSpeed checks, and DeepSpeed's communication layer over that group."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    skip_shm_kernel()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def ds_config(name: str, micro_batch: int) -> dict:
    """A shipped DeepSpeed JSON (``recipes/deepspeed/<name>.json``) completed as Lightning completes
    it for an fp32 run without clipping or accumulation. ``zero3_partitioned``: ``zero3.json`` with
    no small parameter kept whole, so every parameter is partitioned, as in a large model."""
    file = "zero3" if name == "zero3_partitioned" else name
    cfg = json.loads((ROOT / "recipes" / "deepspeed" / f"{file}.json").read_text())
    if name == "zero3_partitioned":
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1, gradient_clipping=0.0)
    return cfg


def in_engine_forward(engine, module, step):
    """Run ``step()`` inside the engine's forward, as Lightning runs ``training_step`` (its forward
    redirection): ZeRO-3 fetches partitioned parameters only inside a forward. ``step`` calls the
    module's real ``forward`` (as ``training_step`` does), not ``module(...)``."""
    original = module.forward

    def redirected(*_):
        module.forward = original
        return step()

    module.forward = redirected
    try:
        return engine(torch.zeros(1))
    finally:
        del module.forward  # back to the class's method


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """mmkit's ``DeepSpeedStrategy`` minus Lightning's CUDA-only check, so that mmkit's modules run
    under the real strategy (config completed from the module, model built whole, engine built by
    Lightning, DeepSpeed's backward/step/clipping/checkpointing) on CPU processes over gloo.
    Test-only."""

    def setup_environment(self) -> None:
        skip_shm_kernel()
        DDPStrategy.setup_environment(self)  # what DeepSpeedStrategy does after its CUDA check

    @property
    def parallel_devices(self):
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices) -> None:
        # DeepSpeed takes the local rank from the device index (a GPU's); "cpu:i" is the CPU too.
        self._parallel_devices = None if devices is None else [torch.device("cpu", i) for i in range(len(devices))]


class RecordDeepSpeed(L.Callback):
    """Writes, at the end of fit, what the engine was built with and the fp32 master value of the
    temperature (``<out>/engine.json`` on rank 0)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        engine = trainer.strategy.model
        master = safe_get_full_fp32_param(pl_module.model.log_scale_parameter())  # a collective
        if trainer.is_global_zero:
            record = {
                "engine": type(engine).__name__,
                "zero_stage": int(engine.zero_optimization_stage()),
                "gradient_clipping": float(engine.gradient_clipping()),
                "world_size": trainer.world_size,
                "master_log_scale": float(master),
                "global_step": trainer.global_step,
            }
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "engine.json"), "w") as f:
                json.dump(record, f)
