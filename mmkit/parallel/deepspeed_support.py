"""DeepSpeed mechanics behind ``mmkit.parallel.ops.DeepSpeedOps`` and mmkit's ``DeepSpeedStrategy``
(``mmkit.parallel.deepspeed_strategy``; ZeRO stages 2 and 3 are tested, stage 1 takes the same
code paths but is not).

DeepSpeed takes over parts of the step that mmkit's manual optimisation does itself elsewhere:

- gradient clipping happens inside ``engine.step()`` from the config's ``gradient_clipping``
  (Lightning's ``clip_gradients`` does nothing under DeepSpeed), so the module's ``grad_clip_norm``
  is written into the DeepSpeed config before the engine is built (by mmkit's strategy);
- the optimizer updates fp32 master weights and copies them over the model's parameters, so an
  in-place edit of a parameter (the temperature clamp) must reach the master copy too;
- ZeRO reduces gradients inside every ``engine.backward``; exact chunked accumulation calls it once
  per chunk, and under ZeRO-2 the chunks' reductions do not add up (measured: the gradient lost
  30–50 %), so the chunks' backward passes run inside ``engine.coalesce_grad_reduction()``;
- under ZeRO-3, Lightning's own strategy runs ``configure_model`` inside ``deepspeed.zero.Init``, which
  partitions each submodule's parameters as soon as that submodule is constructed. open_clip then
  initialises and loads weights from the parent module, on already-partitioned (empty) tensors,
  and the optimizer's parameter groups see every weight as 1-D (so nothing would get weight
  decay). mmkit's strategy therefore builds the full model without that context (for every technique,
  including parts a subclass adds in its ``configure_model``) and lets ``deepspeed.initialize``
  partition it: the same initial weights, pretrained weights and weight-decay groups as under
  DDP, at the price of one full fp32 copy of the model per process in CPU memory while it is
  built (a few GiB even for ViT-bigG);
- DeepSpeed cannot broadcast 0-dim parameters (the temperature): see ``patch_scalar_params``,
  which mmkit's strategy applies only while it builds the engine.

What the techniques own beside the model goes where its kind says (tested: CLIPPretrain,
MetricAlign, KDStudent and AlignGAN's ``gradient_reversal`` mode, ZeRO-2 and ZeRO-3):
trainable submodules (MetricAlign's projection heads, a loss's own parameters such as KD's
projection, AlignGAN's D) are inside the engine like the model, so DeepSpeed reduces, partitions
and steps them; buffers (MetricAlign's memory queue, D's spectral-norm vectors) stay whole on every
process; KD's frozen teacher is not a submodule, so DeepSpeed never sees it: whole on every
process, in neither the optimizer nor the partitions. AlignGAN's ``alternating`` mode (two
optimizers) is refused: Lightning's ``DeepSpeedStrategy`` takes one.

Sharded checkpoints are read back into one state dict by ``consolidated_state_dict`` (used by
``mmkit export``). DeepSpeed loads its files with ``torch.load(weights_only=False)``, which runs any
code a crafted file carries: mmkit checks every file of a folder first
(``mmkit.parallel.sharded_checkpoint.verify_deepspeed_checkpoint``) and runs DeepSpeed's reading, for export
and for resume, with every ``torch.load`` forced to ``weights_only`` (resume: ``mmkit.parallel.deepspeed_strategy``).
Nothing here imports DeepSpeed unless the strategy, engine, parameters or checkpoint are
DeepSpeed's, or a command names it (``import_quietly_if_named``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from mmkit.safe_unpickle import deepspeed_globals, weights_only_everywhere
from mmkit.parallel.sharded_checkpoint import is_deepspeed_checkpoint  # noqa: F401  (re-exported: cli, tests)
from mmkit.parallel.sharded_checkpoint import verify_deepspeed_checkpoint


def import_quietly_if_named(argv: list[str]) -> None:
    """Import DeepSpeed now, with its log handler on stderr, when a command names it (in an
    argument or a ``--config`` file).

    DeepSpeed's logger writes to the ``sys.stdout`` of the moment it is first imported, and
    jsonargparse imports it while resolving ``DeepSpeedStrategy``'s signature: a line such as
    "Setting accelerator to CPU" would land inside the YAML of ``--print_config``."""
    if "deepspeed" in sys.modules or importlib.util.find_spec("deepspeed") is None:
        return
    texts = list(argv)
    for flag, value in zip(argv, argv[1:]):
        if flag in ("--config", "-c") and Path(value).is_file():
            texts.append(Path(value).read_text())
    texts += [Path(a.split("=", 1)[1]).read_text() for a in argv if a.startswith("--config=") and Path(a.split("=", 1)[1]).is_file()]
    if any("deepspeed" in t.lower() for t in texts):
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401


def patch_scalar_params() -> None:
    """Let DeepSpeed build engines for models with 0-dim parameters (open_clip's ``logit_scale``
    and ``logit_bias``). The one patch of DeepSpeed's classes mmkit makes, and only while
    ``DeepSpeedStrategy.setup`` builds the engine: see ``deepspeed_strategy.broadcastable_0dim_params``,
    which undoes it afterwards.

    DeepSpeed (seen in 0.19.8) broadcasts parameters from rank 0 as ``p.data.view(torch.uint8)``,
    which PyTorch refuses for a 0-dim float tensor, in two places every CLIP model goes through:
    the engine's initial broadcast of replicated parameters (all stages) and the partitioning of a
    new parameter under ZeRO-3. For 0-dim parameters only, both now broadcast a 1-element view of
    the same storage instead; everything else still runs DeepSpeed's own code. Idempotent.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    if getattr(DeepSpeedEngine._broadcast_model, "_mmkit_scalar_safe", False):
        return
    engine_broadcast, init_param = DeepSpeedEngine._broadcast_model, Init._zero_init_param

    def broadcast_model(self) -> None:
        # DeepSpeed's loop skips parameters marked ``ds_optim_param``: hide the scalars from it.
        scalars = [p for p in self.module.parameters() if p.dim() == 0 and not hasattr(p, "ds_optim_param")]
        for p in scalars:
            p.ds_optim_param = True
        try:
            engine_broadcast(self)
        finally:
            for p in scalars:
                del p.ds_optim_param
        if self.dist_backend is not None:
            from deepspeed import comm
            from deepspeed.utils import groups

            for p in scalars:
                comm.broadcast(p.data.view(1), groups._get_broadcast_src_rank(), group=self.seq_data_parallel_group)

    def zero_init_param(self, param) -> None:
        if param.dim() != 0:
            return init_param(self, param)
        from deepspeed import comm

        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        src = 0 if comm.get_world_group() == group else comm.get_global_rank(group, 0)
        comm.broadcast(param.data.view(1), src, group)
        param.partition()

    broadcast_model._mmkit_scalar_safe = True
    DeepSpeedEngine._broadcast_model = broadcast_model
    Init._zero_init_param = zero_init_param


def is_deepspeed_engine(model) -> bool:
    if "deepspeed" not in sys.modules:
        return False
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


def coalesced_backward(engine, num_backward: int) -> contextlib.AbstractContextManager:
    """Context for a step that calls ``engine.backward`` ``num_backward`` times (one per chunk of
    exact accumulation): one gradient reduction for all of them under ZeRO 1–3. Outside DeepSpeed,
    or with a single backward, a no-op."""
    if num_backward <= 1 or not is_deepspeed_engine(engine) or engine.zero_optimization_stage() == 0:
        return contextlib.nullcontext()
    if not hasattr(engine, "coalesce_grad_reduction"):
        import deepspeed

        raise RuntimeError(
            f"accumulate_chunks > 1 under DeepSpeed ZeRO needs engine.coalesce_grad_reduction(), which DeepSpeed "
            f"{deepspeed.__version__} lacks: upgrade DeepSpeed (tested: 0.19.8) or set accumulate_chunks: 1"
        )
    return engine.coalesce_grad_reduction()


def no_sync(engine) -> contextlib.AbstractContextManager:
    """``no_sync`` for the chunks before the last: DDP's, or DeepSpeed's without ZeRO; under ZeRO
    the reduction is already deferred by ``coalesced_backward`` (and ``engine.no_sync`` refuses
    ZeRO 2/3)."""
    if is_deepspeed_engine(engine) and engine.zero_optimization_stage() > 0:
        return contextlib.nullcontext()
    return engine.no_sync() if hasattr(engine, "no_sync") else contextlib.nullcontext()


def holds(model: nn.Module) -> bool:
    """Whether DeepSpeed manages the model's parameters (an engine was built over it)."""
    return any(is_deepspeed_param(p) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full fp32 state dict on every rank, from DeepSpeed's fp32 master weights (the
    model's own copy may be bf16/fp16, and is partitioned under ZeRO-3). A collective: call it on
    every rank."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:  # a frozen parameter has no master copy: gather the model's own
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                full = p.detach().clone()
        state[name] = full.detach().float().cpu().reshape(getattr(p, "ds_shape", p.shape))
    for name, value in model.state_dict().items():  # buffers are replicated, never partitioned
        state.setdefault(name, value.detach().cpu())
    return state


def gathered(module: nn.Module) -> contextlib.AbstractContextManager:
    """Whole parameters for code that calls a model outside any module's ``forward`` (ZeRO-3
    gathers partitioned parameters only from forward hooks); a no-op unless ZeRO-3 holds them.
    A collective under ZeRO-3: every rank must enter it."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def is_deepspeed_param(p: torch.Tensor) -> bool:
    # ZeRO-3 parameters carry ``ds_id``; ZeRO-1/2 and bf16 parameters a link to their fp32 master.
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


@torch.no_grad()
def clamp_(p: nn.Parameter, low: float, high: float) -> None:
    """Clamp a parameter in place, including its optimizer-side fp32 master copy under DeepSpeed
    (a clamp of the model's copy alone would be overwritten by the next step). Local only: every
    rank clamps the parts it holds, no collective."""
    if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition, its master slice, and the full copy if gathered
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        p.ds_tensor.clamp_(low, high)
        if p.requires_grad and getattr(p, "_z3_optimizer", None) is not None:
            master = safe_get_local_fp32_param(p)
            safe_set_local_fp32_param(p, master.clamp(low, high))
    elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2: this rank's slice of the master
        p._hp_mapping.get_hp_fragment().clamp_(low, high)
    if p.numel() > 0:
        p.clamp_(low, high)


def consolidated_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a (sharded) DeepSpeed checkpoint directory, with the module's
    own keys (as ``LightningModule.state_dict()`` has them): DeepSpeed's zero_to_fp32 merges the
    ZeRO partitions of every rank. Reads only what is on disk; needs no process group. Every file
    is checked first, and zero_to_fp32's loads run with ``weights_only`` forced."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(path)
    verify_deepspeed_checkpoint(path)
    tag = None if (path / "latest").is_file() else _only_tag(path)
    with weights_only_everywhere(deepspeed_globals()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    # Older Lightning versions wrapped the module before handing it to DeepSpeed.
    prefix = "_forward_module."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _only_tag(path: Path) -> str:
    tags = sorted({p.parent.name for p in path.glob("*/*model_states.pt")})
    if len(tags) != 1:
        raise ValueError(f"{path}: expected one DeepSpeed checkpoint tag folder, found {tags or 'none'}")
    return tags[0]


def is_deepspeed_strategy(strategy) -> bool:
    """Whether ``strategy`` is Lightning's ``DeepSpeedStrategy`` (or a subclass); imports nothing new."""
    if strategy is None:
        return False
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)
