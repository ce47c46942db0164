"""FSDP2 sharding of a dual encoder, applied in ``configure_model`` under Lightning's
``ModelParallelStrategy`` (which provides the device mesh)."""

from __future__ import annotations

from torch import nn

from mmkit import distributed as D


def _blocks(module: nn.Module) -> list[nn.Module]:
    # Every layer of every layer stack (transformer blocks of both towers, HF encoder layers).
    out: list[nn.Module] = []
    for child in module.modules():
        if isinstance(child, nn.ModuleList) and len(child) > 1:
            out.extend(child)
    return out


def shard_dual_encoder(model: nn.Module, mesh) -> nn.Module:
    """Shard each transformer block separately (so only one block's full weights exist at a time
    during forward/backward), then the remaining parameters (embeddings, heads) as one group at
    the root.

    FSDP2 cannot shard 0-dim parameters (the temperature and logit bias): they stay replicated
    and ``average_replicated_grads`` must run after backward, as DDP would do for them.
    """
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(replicated_params(model)))
    return model


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.ndim == 0]


def average_replicated_grads(model: nn.Module) -> None:
    for p in replicated_params(model):
        if p.grad is not None:
            p.grad.copy_(D.all_reduce_sum(p.grad) / D.world_size())


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict:
    """The unsharded state dict on every rank (a collective: call it on all ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
