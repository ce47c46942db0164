"""Elastic Weight Consolidation: diagonal empirical Fisher estimates and the quadratic penalty.

EWC (Kirkpatrick et al. 2017) keeps parameters that mattered for earlier tasks near the values
they had after those tasks: ``λ/2 · Σ_i F_i (θ_i − θ*_i)²`` with ``F`` the diagonal Fisher
information of the earlier task at its end point ``θ*``. Here ``F`` is the *empirical* Fisher,
the mean squared gradient of the training loss (no labels are sampled from the model: an
image–text alignment loss has no per-sample predictive distribution to sample from).

Per-sample vs per-batch gradients
---------------------------------
- ``per_batch``: ``F = mean_b (∇ L_b)²`` over batches ``b``, with ``L_b`` the batch's mean loss.
  Works for any loss and model head; ``F`` shrinks roughly with the batch size (the batch mean
  averages away per-sample noise), so ``λ`` must be set for the batch size used.
- ``per_sample``: ``F = mean_i g_i²``. InfoNCE has no per-sample loss on its own (a batch of one
  pair has loss 0: it needs the others as negatives), so a sample's gradient is defined as its
  share of the batch gradient: the part of ``B · ∇ L_b`` that flows through the sample's own
  image and text encodings, with the loss's dependence on the rest of the batch (the negatives)
  taken at the batch's values, ``g_i = B · J_iᵀ ∂L_b/∂f_i + J_sᵀ ∂L_b/∂s``. Batch-level scalars
  ``s`` (temperature, logit bias) have no per-sample share: each sample carries their batch
  gradient, so their Fisher equals the per-batch one. By construction ``mean_i g_i = ∇ L_b``
  exactly. It costs one extra single-sample forward/backward per sample (GradCache-style: the
  batch is first encoded without autograd), and needs the cosine similarity head.

Both estimators return sums and a count so that ranks can add them up before dividing
(``reduce_fisher``): every rank then holds the same Fisher. Batches are scored rank-locally
(``mmkit.distributed.local_only``): a sample's negatives are its own rank's batch, which keeps the
estimate free of collectives inside the loop (ranks may see different sample counts).

Sharded parameters (FSDP2 DTensors)
-----------------------------------
Fisher, anchors and sums live in the parameters' own layout: a DTensor parameter's Fisher and
anchor are DTensors with the same placements, so each rank stores only its shard. Every function
here works on the local shards; the penalty's value adds the shards' parts over ranks (one
all-reduce), its gradient ``λ F (θ − θ*)`` is elementwise and stays local. Replicated (plain)
parameters next to sharded ones (FSDP2 leaves 0-dim parameters unsharded) are counted once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from mmkit import distributed as D
from mmkit.distributed import is_dtensor, like, local, shard_like  # noqa: F401  (re-exported)
from mmkit.config_checks import Range, check_settings

Forward = Callable[[Tensor, Any], dict[str, Any]]
LossFn = Callable[..., dict[str, Tensor]]
GradsFn = Callable[[Tensor, dict[str, Tensor]], list[Tensor]]
_FEATURES = ("image_features", "text_features")


def _weighted_diff(param: Tensor, anchor: Tensor, fisher: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(F (θ − θ*), θ − θ*)``, F ≡ 1 when ``fisher`` is None: the penalty is ½λ Σ of their product,
    its gradient λ times the first."""
    diff = param - anchor
    return (diff if fisher is None else fisher * diff), diff


def _total(terms: dict[str, Tensor]) -> Tensor:
    return sum(v for k, v in terms.items() if k.endswith("_loss"))


def _rows(texts: Any, i: int) -> Any:
    if isinstance(texts, dict):
        return {k: v[i : i + 1] for k, v in texts.items()}
    return texts[i : i + 1]


def autograd_grads(output: Tensor, params: dict[str, Tensor]) -> list[Tensor]:
    """The gradient of ``output`` for each parameter, without touching ``p.grad``."""
    # autograd.grad, not backward(): nothing lands in p.grad, so DDP's and DeepSpeed ZeRO's
    # gradient hooks (post-accumulate hooks) stay idle.
    grads = torch.autograd.grad(output, list(params.values()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]


def fisher_sums(
    params: dict[str, Tensor],
    batches: Iterable[tuple[Tensor, Any]],
    forward: Forward,
    loss_fn: LossFn,
    max_samples: int,
    estimator: Literal["per_sample", "per_batch"] = "per_sample",
    grads_fn: GradsFn = autograd_grads,
) -> tuple[dict[str, Tensor], int]:
    """Sums of squared gradients and how many gradients were summed, on this rank's data.

    Args:
        params: name → parameter whose Fisher is estimated (the trainable ones).
        batches: ``(images, texts)`` pairs, already on the parameters' device.
        forward: ``forward(images, texts)`` → the model's output dict.
        loss_fn: takes the output dict as keyword arguments and returns ``*_loss`` terms (their
            sum is the loss; the mean over the batch, as every mmkit loss).
        max_samples: stop after this many samples (a batch is cut to fit).
        estimator: ``per_sample`` or ``per_batch`` (see the module docstring).
        grads_fn: ``grads_fn(output, params)`` → each parameter's gradient of the scalar
            ``output`` (its local shard for a DTensor parameter); default ``torch.autograd.grad``.

    Returns:
        ``({name: Σ g²}, count)``: count is the number of samples (``per_sample``) or batches;
        the sums of DTensor parameters are their local shards (plain tensors).
    """
    if estimator not in ("per_sample", "per_batch"):
        raise ValueError(f"estimator must be 'per_sample' or 'per_batch', got {estimator!r}")
    sums = {n: torch.zeros_like(local(p), dtype=torch.float32) for n, p in params.items()}
    count, seen = 0, 0
    # Batches are drawn outside local_only: a batch source may communicate (FSDP: every rank's
    # batches on every rank); the scoring itself is rank-local.
    for images, texts in batches:
        take = min(images.shape[0], max_samples - seen)
        if take <= 0:
            break
        if take < images.shape[0]:
            images = images[:take]
            texts = {k: v[:take] for k, v in texts.items()} if isinstance(texts, dict) else texts[:take]
        seen += take
        with D.local_only(), torch.enable_grad():
            if estimator == "per_batch":
                for s, g in zip(sums.values(), grads_fn(_total(loss_fn(**forward(images, texts))), params)):
                    s.add_(g.float().square())
                count += 1
            else:
                for g_i in _per_sample_grads(params, images, texts, forward, loss_fn, grads_fn):
                    for s, g in zip(sums.values(), g_i):
                        s.add_(g.float().square())
                    count += 1
    return sums, count


def _per_sample_grads(params, images: Tensor, texts: Any, forward: Forward, loss_fn: LossFn, grads_fn: GradsFn):
    """Yields each sample's gradient share ``g_i`` (see the module docstring)."""
    n = images.shape[0]
    with torch.no_grad():
        cached = forward(images, texts)
    if "pair_logits" in cached:
        raise ValueError("per_sample Fisher needs the cosine similarity head; use estimator='per_batch'")
    leaves = {k: v.detach().requires_grad_() for k, v in cached.items() if isinstance(v, Tensor)}
    # Gradient of the batch loss w.r.t. the features and scalars, once for the whole batch.
    total = _total(loss_fn(**leaves))
    upstream = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()), allow_unused=True)))
    for i in range(n):
        out = forward(images[i : i + 1], _rows(texts, i))
        surrogate = images.new_zeros((), dtype=torch.float32)
        for key, value in out.items():
            g = upstream.get(key)
            if g is None or not isinstance(value, Tensor):
                continue
            if key in _FEATURES:
                surrogate = surrogate + n * (value * g[i : i + 1]).sum()
            else:  # a batch-level scalar: every sample carries its whole batch gradient
                surrogate = surrogate + (value * g).sum()
        yield grads_fn(surrogate, params)


def reduce_fisher(sums: dict[str, Tensor], count: int) -> dict[str, Tensor]:
    """Add up every rank's sums and counts and divide: the same Fisher on every rank."""
    names = list(sums)
    if not names:
        return {}
    flat = torch.cat([sums[n].reshape(-1) for n in names] + [sums[names[0]].new_tensor([float(count)])])
    flat = D.all_reduce_sum(flat)  # one collective for every parameter
    total = float(flat[-1])
    if total == 0:
        raise ValueError("Fisher estimate saw no samples on any rank")
    out, offset = {}, 0
    for n in names:
        k = sums[n].numel()
        out[n] = (flat[offset : offset + k] / total).reshape(sums[n].shape)
        offset += k
    return out


def fisher_in_layout(sums: dict[str, Tensor], count: int, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The Fisher from sums that already cover every rank's samples (no reduction), in the
    parameters' layout: a DTensor parameter's Fisher is a DTensor holding this rank's shard."""
    if count == 0:
        raise ValueError("Fisher estimate saw no samples on any rank")
    return {n: like(s / count, params[n]) for n, s in sums.items()}


def global_sum(tensors: Iterable[Tensor]) -> float:
    """Sum of every element over all ranks: DTensors' local shards are added over ranks (one
    all-reduce, a collective when any is a DTensor), plain (replicated) tensors counted once."""
    tensors = list(tensors)
    sharded = [local(t).double().sum() for t in tensors if is_dtensor(t)]
    total = sum(float(t.double().sum()) for t in tensors if not is_dtensor(t))
    if sharded:
        total += float(D.all_reduce_sum(torch.stack(sharded).sum().reshape(1)))
    return total


def normalize_mean(fisher: dict[str, Tensor]) -> dict[str, Tensor]:
    """Scale a Fisher so its mean over every tracked element is 1. Then ``λ`` means the same as in
    the uniform-importance L2 baseline (same total stiffness, redistributed by importance) and
    does not depend on the loss scale, the estimator or the batch size. Sharded Fishers: the
    mean over the whole (global) Fisher, a collective."""
    total = global_sum(fisher.values())
    numel = sum(f.numel() for f in fisher.values())  # a DTensor's numel is its global one
    mean = total / max(numel, 1)
    if not math.isfinite(mean) or mean <= 0:
        raise ValueError(f"cannot normalise a Fisher estimate with mean {mean}")
    return {n: f / mean for n, f in fisher.items()}


class EWCPenalty:
    """The consolidated tasks and their penalty ``λ/2 · Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²``.

    - ``separate``: one (Fisher, anchor) pair per consolidated task, each penalised on its own.
    - ``online`` (Schwarz et al. 2018): one running Fisher ``F ← γ F + F_new`` and one anchor, the
      parameters after the latest task; memory stays constant over the stream.

    A Fisher of ``None`` means uniform importance (``F ≡ 1``): plain L2 to the anchor(s). Fisher
    and anchor of a DTensor parameter are DTensors in its layout (see the module docstring).

    Args:
        mode: ``separate`` or ``online``.
        gamma: decay of the running Fisher in online mode (1: no decay).
    """

    setting_ranges = {"gamma": Range(ge=0, le=1)}

    def __init__(self, mode: Literal["separate", "online"] = "separate", gamma: float = 1.0) -> None:
        check_settings(self, locals(), EWCPenalty.setting_ranges)
        if mode not in ("separate", "online"):
            raise ValueError(f"mode must be 'separate' or 'online', got {mode!r}")
        self.mode = mode
        self.gamma = gamma
        self.terms: list[dict[str, dict[str, Tensor] | None]] = []  # [{"fisher": ..., "anchor": ...}]
        self.tasks_consolidated = 0

    def consolidate(self, anchor: dict[str, Tensor], fisher: dict[str, Tensor] | None) -> None:
        """Add the task that just ended: its end point ``anchor`` and its Fisher (None: F ≡ 1)."""
        anchor = {n: t.detach().clone() for n, t in anchor.items()}
        fisher = None if fisher is None else {n: f.detach().clone() for n, f in fisher.items()}
        if fisher is not None and set(fisher) != set(anchor):
            raise ValueError("Fisher and anchor must cover the same parameters")
        if self.mode == "online" and self.terms:
            old = self.terms[0]["fisher"]
            if (old is None) != (fisher is None):
                raise ValueError("online EWC cannot mix uniform and Fisher importance")
            if fisher is not None:
                fisher = {n: self.gamma * old[n] + f for n, f in fisher.items()}
            self.terms = [{"fisher": fisher, "anchor": anchor}]
        else:
            self.terms.append({"fisher": fisher, "anchor": anchor})
        self.tasks_consolidated += 1

    def __call__(self, params: dict[str, Tensor], lam: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The penalty's value and its analytic gradient ``λ Σ_t F_t (θ − θ*_t)`` per parameter.

        Computed without autograd, so the caller can add the gradient to ``p.grad`` after the data
        loss's backward (and after DDP averaged it: the penalty is the same on every rank). For a
        DTensor parameter the gradient is this rank's local shard (``like`` puts it back in the
        parameter's layout), and the value adds every rank's shards: a collective whenever a
        parameter is a DTensor, so every rank must call it.
        """
        value = torch.zeros((), dtype=torch.float32, device=_device(params))
        grads: dict[str, Tensor] = {}
        if lam == 0 or not self.terms:
            return value, grads
        sharded = torch.zeros((), dtype=torch.float32, device=value.device)
        any_sharded = False
        with torch.no_grad():
            for term in self.terms:
                fisher, anchor = term["fisher"], term["anchor"]
                for n, p in params.items():
                    weighted, diff = _weighted_diff(local(p.detach()), local(anchor[n]), None if fisher is None else local(fisher[n]))
                    part = 0.5 * lam * (weighted * diff).sum().float()
                    if is_dtensor(p):
                        sharded, any_sharded = sharded + part, True
                    else:
                        value = value + part
                    g = lam * weighted
                    grads[n] = grads[n] + g if n in grads else g
        if any_sharded:  # each rank holds a part of the sharded parameters' sum
            value = value + D.all_reduce_sum(sharded.reshape(1))[0]
        return value, grads

    def loss(self, params: dict[str, Tensor], lam: float) -> Tensor:
        """The penalty as a differentiable scalar whose gradient is the analytic ``λ Σ_t F_t (θ − θ*_t)``
        (in each parameter's layout: a DTensor parameter gets its local shard's part), so one
        backward carries it with the data loss under any strategy. The value adds every rank's
        shards: a collective whenever a parameter is a DTensor (every rank must call it)."""
        if lam == 0 or not self.terms:
            return torch.zeros((), dtype=torch.float32, device=_device(params))
        names = list(params)
        return _AnalyticPenalty.apply(self, lam, names, *params.values())

    def place(self, params: dict[str, Tensor]) -> EWCPenalty:
        """Put every stored tensor in its parameter's layout and on its device: full tensors
        restored from a checkpoint become this rank's shard of a DTensor parameter (no
        communication: each rank cuts its own copy), whatever the world size that wrote them."""
        for term in self.terms:
            for key in ("fisher", "anchor"):
                if term[key] is not None:
                    term[key] = {
                        n: t.to(params[n].device) if is_dtensor(t) or not is_dtensor(params[n]) else shard_like(t, params[n])
                        for n, t in term[key].items()
                    }
        return self

    def state_dict(self) -> dict[str, Any]:
        """The penalty's state with whole tensors. DTensors are gathered (a collective: call it
        on every rank) one at a time, and kept, on the CPU, by rank 0 only, the rank that writes
        the checkpoint; other ranks get ``terms: None``."""
        terms = self.terms
        if any(is_dtensor(t) for term in terms for part in term.values() if part for t in part.values()):
            keep = D.rank() == 0

            def whole(t: Tensor) -> Tensor | None:
                full = t.full_tensor() if is_dtensor(t) else t  # every rank takes part in the gather
                return full.cpu() if keep else None

            terms = [
                {key: None if part is None else {n: whole(t) for n, t in part.items()} for key, part in term.items()}
                for term in terms
            ]
            if not keep:
                terms = None
        return {"mode": self.mode, "gamma": self.gamma, "terms": terms, "tasks_consolidated": self.tasks_consolidated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint holds a {state['mode']!r} EWC penalty, this run is {self.mode!r}")
        self.gamma = float(state["gamma"])
        self.terms = [
            {k: None if v is None else dict(v) for k, v in term.items()} for term in state["terms"]
        ]
        self.tasks_consolidated = int(state["tasks_consolidated"])


def _device(params: dict[str, Tensor]) -> torch.device:
    return next(iter(params.values())).device if params else torch.device("cpu")


class _AnalyticPenalty(torch.autograd.Function):
    """``EWCPenalty``'s value, with its analytic gradient (``EWCPenalty.__call__``) as backward."""

    @staticmethod
    def forward(ctx, penalty: EWCPenalty, lam: float, names: list[str], *params: Tensor) -> Tensor:
        value, grads = penalty(dict(zip(names, params)), lam)
        ctx.grads = [None if n not in grads else like(grads[n].to(p.dtype), p) for n, p in zip(names, params)]
        return value

    @staticmethod
    def backward(ctx, grad_value: Tensor):
        scale = float(grad_value)  # a Python number: multiplies a DTensor gradient without layout questions
        grads = [None if g is None else (g if scale == 1.0 else g * scale) for g in ctx.grads]
        ctx.grads = None
        return (None, None, None, *grads)
