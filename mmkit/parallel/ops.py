"""The one boundary between a training step and the distributed strategy.

A technique's step asks ``parallel_ops(module)`` for what differs between strategies and never
tests which strategy runs. Three implementations, chosen from the trainer's strategy and the
model's parameters:

- ``ReplicatedOps``: one device, DDP (and DeepSpeed-free Lightning strategies in general). Every
  rank holds every parameter whole.
- ``FSDP2Ops``: Lightning's ``ModelParallelStrategy`` (mmkit's ``fsdp2``): the towers are sharded
  DTensors, parameters beside them (the 0-dim temperature, MetricAlign's heads, a loss's own
  projection, AlignGAN's D) stay replicated and are averaged here after backward, as DDP would.
- ``DeepSpeedOps``: DeepSpeed ZeRO 0–3: DeepSpeed reduces, partitions, clips and steps inside its
  engine; mmkit defers the chunks' reductions, clamps its fp32 master copy, gathers ZeRO-3's
  partitions where a model runs outside a forward.

The operations (what a step needs, in the order it needs them): ``shard`` / ``shard_frozen``
(``configure_model``), ``optimizer_groups``, ``reshard``, ``backward_scope`` and ``no_sync`` (exact chunked
accumulation), ``after_backward``, ``clip_gradients``, ``clamp_``, ``gathered``,
``full_state_dict``, ``broadcast_replicated_``, and the facts ``shards_parameters`` /
``partitions_parameters``.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import Tensor, nn

from mmkit import distributed as D
from mmkit.parallel import deepspeed_support as ds
from mmkit.parallel import fsdp2_sharding as fsdp2


class ReplicatedOps:
    """Every rank holds every parameter whole (one device, DDP)."""

    shards_parameters = False  # FSDP2: parameters are DTensor shards outside a forward
    partitions_parameters = False  # ZeRO-3: parameters are empty outside a forward
    supports_several_optimizers = True  # Lightning's DeepSpeedStrategy takes one

    def __init__(self, module) -> None:
        self.module = module

    # -- building ----------------------------------------------------------------------------
    def shard(self, model: nn.Module) -> nn.Module:
        """Shard the trained model (``configure_model``); a no-op unless parameters are sharded."""
        return model

    def shard_frozen(self, module: nn.Module) -> nn.Module:
        """Shard a frozen module run beside the model (a distillation teacher); a no-op here."""
        return module

    def optimizer_groups(self, groups: list[dict]) -> list[dict]:
        return groups

    def reshard(self, model: nn.Module) -> nn.Module:
        """The model with its parameters as the optimizer holds them (FSDP2: sharded again after
        a forward without backward); a no-op here."""
        return model

    # -- backward ----------------------------------------------------------------------------
    def _wrapper(self):
        trainer = getattr(self.module, "_trainer", None)
        return trainer.strategy.model if trainer is not None else None

    def backward_scope(self, num_backward: int) -> contextlib.AbstractContextManager:
        """Around all backward passes of one step (one per chunk of exact accumulation)."""
        return contextlib.nullcontext()

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Around a backward whose gradients must not be reduced yet (every chunk but the last)."""
        wrapper = self._wrapper()
        return wrapper.no_sync() if hasattr(wrapper, "no_sync") else contextlib.nullcontext()

    def after_backward(self, params: Iterable[nn.Parameter] | None = None) -> None:
        """Average over ranks the gradients the strategy did not reduce: here those of parameters
        kept out of DDP (``_ddp_params_and_buffers_to_ignore``, e.g. AlignGAN's D). ``params``:
        only these (e.g. D's, after a critic step)."""
        ignored = set(getattr(self.module, "_ddp_params_and_buffers_to_ignore", ()))
        if D.world_size() == 1 or not ignored:
            return
        named = [(n, p) for n, p in self.module.named_parameters() if n in ignored]
        wanted = None if params is None else {id(p) for p in params}
        D.average_gradients_([p for _, p in named if wanted is None or id(p) in wanted])

    def clip_gradients(self, optimizer, max_norm: float | None) -> None:
        """Clip the global gradient norm of ``optimizer``'s parameters to ``max_norm`` (None: no-op)."""
        if not max_norm:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if getattr(optimizer, "defaults", {}).get("fused"):
            # Lightning's mixed-precision plugin refuses to clip for a fused optimizer (made for
            # fp16's scaler, which the fused kernel unscales itself); fused is never chosen with
            # fp16 (``DualEncoderModule._fused``), so the gradients are unscaled: clip them directly.
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return
        # Through Lightning (its precision plugin unscales fp16 gradients first).
        self.module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    # -- parameters --------------------------------------------------------------------------
    @torch.no_grad()
    def clamp_(self, param: Tensor, low: float, high: float) -> None:
        """Clamp a parameter in place (after the optimizer step)."""
        param.clamp_(low, high)

    def gathered(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """Whole parameters for code that runs a model outside any module's forward."""
        return contextlib.nullcontext()

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The model's whole state dict, or None when the model's own tensors are already whole.
        A collective where it is not None: call it on every rank."""
        return None

    @torch.no_grad()
    def broadcast_replicated_(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers of a module the strategy does not manage (kept
        out of DDP, replicated beside an FSDP2 model) to every rank."""
        D.broadcast_from_rank_zero_([p.data for p in module.parameters()] + list(module.buffers()))


class FSDP2Ops(ReplicatedOps):
    """FSDP2 (``fully_shard`` over the data-parallel mesh of ``ModelParallelStrategy``)."""

    shards_parameters = True

    def _mesh(self):
        return self.module.device_mesh["data_parallel"]

    def shard(self, model: nn.Module) -> nn.Module:
        return model if fsdp2.is_sharded(model) else fsdp2.shard_dual_encoder(model, self._mesh())

    def shard_frozen(self, module: nn.Module) -> nn.Module:
        return module if fsdp2.is_sharded(module) else fsdp2.shard_frozen(module, self._mesh())

    def reshard(self, model: nn.Module) -> nn.Module:
        return fsdp2.reshard(model)

    def optimizer_groups(self, groups: list[dict]) -> list[dict]:
        # torch's fused and foreach AdamW kernels take one kind of tensor per group.
        return fsdp2.split_replicated_groups(groups)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # FSDP2 reduces every backward; exactness holds (a sum of chunks)

    def after_backward(self, params: Iterable[nn.Parameter] | None = None) -> None:
        # Everything not sharded: the temperature, heads, a loss's projection, D.
        fsdp2.average_replicated_grads(self.module if params is None else params)

    def clip_gradients(self, optimizer, max_norm: float | None) -> None:
        if max_norm:
            # torch's clip refuses sharded gradients mixed with replicated non-scalar ones.
            fsdp2.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_norm)

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor] | None:
        return fsdp2.full_state_dict(model)


class DeepSpeedOps(ReplicatedOps):
    """DeepSpeed ZeRO 0–3 (Lightning's ``DeepSpeedStrategy`` or an engine built over the module)."""

    supports_several_optimizers = False

    @property
    def partitions_parameters(self) -> bool:  # type: ignore[override]
        return any(hasattr(p, "ds_id") for p in self.module.parameters())

    def backward_scope(self, num_backward: int) -> contextlib.AbstractContextManager:
        return ds.coalesced_backward(self._wrapper(), num_backward)  # one reduction for all chunks

    def no_sync(self) -> contextlib.AbstractContextManager:
        return ds.no_sync(self._wrapper())

    def after_backward(self, params: Iterable[nn.Parameter] | None = None) -> None:
        pass  # the engine reduced everything it holds

    def clip_gradients(self, optimizer, max_norm: float | None) -> None:
        pass  # inside engine.step(), from the config's gradient_clipping (set from grad_clip_norm)

    def clamp_(self, param: Tensor, low: float, high: float) -> None:
        ds.clamp_(param, low, high)  # its fp32 master copy too

    def gathered(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return ds.gathered(module)

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor] | None:
        return ds.full_state_dict(model) if ds.holds(model) else None

    @torch.no_grad()
    def broadcast_replicated_(self, module: nn.Module) -> None:
        # DeepSpeed broadcast the parameters it holds when it built the engine (and keeps their
        # master copy apart, which a copy here would miss): buffers and parameters it does not hold.
        tensors = [p.data for p in module.parameters() if not ds.is_deepspeed_param(p)]
        D.broadcast_from_rank_zero_(tensors + list(module.buffers()))


def parallel_ops(module) -> ReplicatedOps:
    """The operations for the strategy ``module`` (a LightningModule) runs under."""
    trainer = getattr(module, "_trainer", None)
    strategy = trainer.strategy if trainer is not None else None
    model = getattr(module, "model", None)
    kind = _kind(strategy, model, getattr(module, "device_mesh", None))
    cached = getattr(module, "_mmkit_parallel_ops", None)
    if type(cached) is not kind:
        cached = kind(module)
        object.__setattr__(module, "_mmkit_parallel_ops", cached)  # not an nn.Module attribute
    return cached


def check_strategy(strategy) -> None:
    """Refuse a strategy that would build or train mmkit's modules wrongly, naming the one to use
    (Lightning's own ``DeepSpeedStrategy``: mmkit's subclass builds the model outside
    ``zero.Init`` and hands the module's clipping to DeepSpeed)."""
    from mmkit.parallel.deepspeed_strategy import require_mmkit_deepspeed

    require_mmkit_deepspeed(strategy)


def _kind(strategy, model: nn.Module | None, mesh) -> type[ReplicatedOps]:
    if ds.is_deepspeed_strategy(strategy) or (model is not None and ds.holds(model)):
        return DeepSpeedOps
    if mesh is not None or (model is not None and fsdp2.is_sharded(model)):
        return FSDP2Ops
    return ReplicatedOps
