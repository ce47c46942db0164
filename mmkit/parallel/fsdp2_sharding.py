"""FSDP2 sharding under Lightning's ``ModelParallelStrategy`` (which provides the device mesh),
applied in ``configure_model``: the trained dual encoder (``shard_dual_encoder``) and a frozen
module run beside it, such as a distillation teacher (``shard_frozen``).

What stays replicated: 0-dim parameters (FSDP2 cannot shard them: the temperature, the logit
bias) and small trainable modules kept beside the model (MetricAlign's projection heads, a
distillation loss's projection, AlignGAN's discriminator): plain tensors, the same on every rank
as long as every rank builds them alike (seeded), as for the sharded model. After backward,
``average_replicated_grads`` averages their gradients over ranks, as DDP would;
``clip_grad_norm_`` clips them together with the sharded ones, and
``split_replicated_groups`` keeps them in optimizer groups of their own.
"""

from __future__ import annotations

import torch
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


def shard_frozen(module: nn.Module, mesh) -> nn.Module:
    """Shard a frozen module that only runs forward (no gradients; e.g. ``FrozenTeacher``) by the
    same block rule, so each rank keeps about 1/N of its weights. Every call of its ``forward``
    is then a collective: all ranks must call it equally often. Its blocks and its root are
    freed again after each forward (there is no backward to keep them for); 0-dim parameters
    stay replicated. Only ``forward`` gathers the root's parameters: call the module itself."""
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(module):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, reshard_after_forward=True, ignored_params=set(replicated_params(module)))
    return module


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.ndim == 0]


def average_replicated_grads(params) -> None:
    """Average over ranks the gradients of the parameters FSDP does not manage (not DTensors) among
    ``params`` (a module or an iterable of parameters): a sharded model's 0-dim ones and, given the
    LightningModule, the trainable modules kept replicated beside the model."""
    from torch.distributed.tensor import DTensor

    params = params.parameters() if isinstance(params, nn.Module) else params
    D.average_gradients_([p for p in params if not isinstance(p, DTensor)])


def split_replicated_groups(groups: list[dict]) -> list[dict]:
    """Optimizer parameter groups with the sharded (DTensor) and the replicated (plain) parameters
    of each group apart, same settings: torch's multi-tensor AdamW kernels (fused, foreach) refuse
    a list that mixes them."""
    from torch.distributed.tensor import DTensor

    out = []
    for group in groups:
        sharded = [p for p in group["params"] if isinstance(p, DTensor)]
        plain = [p for p in group["params"] if not isinstance(p, DTensor)]
        out += [{**group, "params": params} for params in (sharded, plain) if params]
    return out


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of FSDP-sharded (DTensor) and replicated (plain) parameters
    together, as one process would; torch's ``clip_grad_norm_`` refuses such a mix (beyond 0-dim
    tensors). Replicated gradients must already be averaged (identical on every rank). Returns
    the norm before clipping."""
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    groups = [g for g in ([p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]) if g]
    if not groups:
        return torch.zeros(())
    norms = []
    for group in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # sharded: reduced over ranks
    total = torch.linalg.vector_norm(torch.stack([n.float().to(norms[0].device) for n in norms]))
    for group in groups:
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict:
    """The unsharded state dict on every rank (a collective: call it on all ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def reshard(model: nn.Module) -> nn.Module:
    """Free FSDP2's unsharded parameters and register the sharded ones again. A forward without a
    backward (evaluation) leaves the root's parameters unsharded (FSDP2 does not reshard the root
    after forward), and ``named_parameters()`` would then return whole plain tensors. Local, no
    communication."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return model
