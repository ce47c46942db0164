"""``DeepSpeedStrategy``: Lightning's DeepSpeed strategy, set up the way mmkit's modules need.

DeepSpeed takes over parts of the step that mmkit's manual optimisation does itself under the
other strategies, and Lightning's strategy builds the model in a way that does not suit open_clip.
This subclass changes three things, each an override of a public method of Lightning's class:

- ``setup``, before Lightning formats the DeepSpeed config and builds the engine: the module's
  ``grad_clip_norm`` goes into the config's ``gradient_clipping`` (DeepSpeed clips inside
  ``engine.step()``; Lightning's ``clip_gradients`` does nothing under it), refusing a config that
  asks for a different value; and ``train_micro_batch_size_per_gpu`` (DeepSpeed only logs with it)
  comes from the data module's ``batch_size``: Lightning would read it from the loader's
  ``batch_sampler``, which mmkit's loaders do not have (their sampler yields whole batches).
- ``model_sharded_context``, around ``configure_model``: no ``deepspeed.zero.Init``. Under ZeRO-3
  that context partitions each submodule's parameters as soon as the submodule is constructed;
  open_clip then initialises and loads weights from the parent module, on already-partitioned
  (empty) tensors, and the optimizer's parameter groups see every weight as 1-D (so nothing gets
  weight decay). The full model is built instead (for every technique, including parts a subclass
  adds in its ``configure_model``) and ``deepspeed.initialize`` partitions it: the same initial
  weights, pretrained weights and weight-decay groups as under DDP, at the price of one full fp32
  copy of the model per process in CPU memory while it is built (a few GiB even for ViT-bigG).
- ``load_checkpoint`` (resume, and evaluation of a checkpoint): DeepSpeed's engine reads its files
  with ``torch.load(weights_only=False)``, which runs any code a crafted file carries; every file
  of the folder is checked first (``verify_deepspeed_checkpoint``) and the engine's reading runs
  with every ``torch.load`` forced to ``weights_only``.

One patch of DeepSpeed's own classes remains, in force only while ``setup`` builds the engine:
``broadcastable_0dim_params`` (DeepSpeed cannot broadcast open_clip's 0-dim temperature).

Importing this module (``mmkit fit`` does) registers the class under each of Lightning's DeepSpeed
names with an ``mmkit_`` prefix and the same settings: ``strategy: mmkit_deepspeed_stage_2``,
``mmkit_deepspeed_stage_3``, ``mmkit_deepspeed_stage_3_offload``, ... (Lightning's own names stay
Lightning's). With a DeepSpeed JSON: ``class_path: mmkit.parallel.deepspeed_strategy.DeepSpeedStrategy``,
``init_args: {config: recipes/deepspeed/zero2.json}``. mmkit's modules refuse Lightning's own
class (``require_mmkit_deepspeed``), which would train them without their gradient clipping and,
under ZeRO-3, from weights initialised on empty partitions.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from lightning.pytorch.strategies import StrategyRegistry

from mmkit.parallel.sharded_checkpoint import verify_deepspeed_checkpoint
from mmkit.safe_unpickle import deepspeed_globals, weights_only_everywhere

PREFIX = "mmkit_"


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` (same arguments) for mmkit's modules: gradient clipping
    from the module, the model built whole and partitioned by DeepSpeed, checkpoints checked
    before DeepSpeed unpickles them. See the module docstring."""

    def setup(self, trainer) -> None:
        # Before Lightning completes the config (it keeps values already there) and builds the engine.
        self._config_from_module()
        with broadcastable_0dim_params():
            super().setup(trainer)

    @contextlib.contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        # Lightning's opens ``deepspeed.zero.Init`` here (and completes the config, which ``setup`` does).
        yield

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:  # the caller trusts the checkpoint explicitly
            return super().load_checkpoint(checkpoint_path, weights_only)
        if Path(checkpoint_path).is_dir():  # a single file (load_full_weights) goes through CheckpointIO
            verify_deepspeed_checkpoint(checkpoint_path)
        with weights_only_everywhere(deepspeed_globals()):
            return super().load_checkpoint(checkpoint_path, weights_only)

    def _config_from_module(self) -> None:
        module, config = self.lightning_module, self.config
        if module is None or config is None or not hasattr(module, "grad_clip_norm"):
            return  # not an mmkit module: Lightning's defaults (the trainer's gradient_clip_val)
        want = float(module.grad_clip_norm or 0.0)
        have = float(config.get("gradient_clipping") or 0.0)
        if have not in (0.0, want):
            raise ValueError(
                f"the DeepSpeed config sets gradient_clipping={have} but the module has grad_clip_norm={module.grad_clip_norm}: "
                "remove gradient_clipping from the DeepSpeed config and set model.init_args.grad_clip_norm"
            )
        config["gradient_clipping"] = want
        batch_size = getattr(module.trainer.datamodule, "batch_size", None)
        config.setdefault("train_micro_batch_size_per_gpu", batch_size if isinstance(batch_size, int) else 1)


@contextlib.contextmanager
def broadcastable_0dim_params() -> Iterator[None]:
    """While inside, DeepSpeed builds engines for models with 0-dim parameters (open_clip's
    ``logit_scale`` and ``logit_bias``): ``deepspeed_support.patch_scalar_params``, the one patch of
    DeepSpeed's classes mmkit makes, undone on exit. ``DeepSpeedStrategy.setup`` builds its engine
    inside; so do tests that call ``deepspeed.initialize`` themselves.

    DeepSpeed (seen in 0.19.8) broadcasts parameters from rank 0 as ``p.data.view(torch.uint8)``,
    which PyTorch refuses for a 0-dim float tensor, while an engine is built: the engine's initial
    broadcast of replicated parameters (``DeepSpeedEngine._broadcast_model``, all stages) and
    ZeRO-3's partitioning of each parameter (``Init._zero_init_param``); nothing calls them later.

    Holding the temperature and bias as 1-element parameters instead (open_clip's
    ``nonscalar_logit_scale``) makes the patch unnecessary (measured: every DeepSpeed test passes
    without it), but FSDP2 would then shard them (``fsdp2_sharding`` keeps only 0-dim parameters
    replicated), and the training step reads the temperature outside any forward.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    from mmkit.parallel.deepspeed_support import patch_scalar_params

    saved = DeepSpeedEngine._broadcast_model, Init._zero_init_param
    patch_scalar_params()  # idempotent: nested, the outer context restores DeepSpeed's own
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model, Init._zero_init_param = saved


def require_mmkit_deepspeed(strategy: object) -> None:
    """Raise if ``strategy`` is Lightning's own ``DeepSpeedStrategy`` rather than mmkit's subclass."""
    if not isinstance(strategy, LightningDeepSpeedStrategy) or isinstance(strategy, DeepSpeedStrategy):
        return
    stage = ((strategy.config or {}).get("zero_optimization") or {}).get("stage", 2)
    raise TypeError(
        f"mmkit's modules run under DeepSpeed with mmkit.parallel.deepspeed_strategy.DeepSpeedStrategy "
        f"(e.g. strategy: {PREFIX}deepspeed_stage_{stage}, or class_path: "
        f"mmkit.parallel.deepspeed_strategy.DeepSpeedStrategy with the same init_args), not "
        f"{type(strategy).__module__}.{type(strategy).__qualname__}: Lightning's own would build the model "
        "inside deepspeed.zero.Init and ignore the module's grad_clip_norm"
    )


def _register() -> None:
    # Lightning's DeepSpeed names, as Lightning registers them now (no copy of its list to drift).
    for name, entry in list(StrategyRegistry.items()):
        if entry["strategy"] is LightningDeepSpeedStrategy and PREFIX + name not in StrategyRegistry:
            StrategyRegistry.register(
                PREFIX + name, DeepSpeedStrategy, description=f"{entry['description']} (mmkit)", **entry["init_params"]
            )


_register()
