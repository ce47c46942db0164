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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from mmkit import distributed as D

Forward = Callable[[Tensor, Any], dict[str, Any]]
LossFn = Callable[..., dict[str, Tensor]]
_FEATURES = ("image_features", "text_features")


def _total(terms: dict[str, Tensor]) -> Tensor:
    return sum(v for k, v in terms.items() if k.endswith("_loss"))


def _rows(texts: Any, i: int) -> Any:
    if isinstance(texts, dict):
        return {k: v[i : i + 1] for k, v in texts.items()}
    return texts[i : i + 1]


def _grads(output: Tensor, params: dict[str, Tensor]) -> list[Tensor]:
    # autograd.grad, not backward(): nothing lands in p.grad, so DDP's gradient hooks stay idle.
    grads = torch.autograd.grad(output, list(params.values()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]


def fisher_sums(
    params: dict[str, Tensor],
    batches: Iterable[tuple[Tensor, Any]],
    forward: Forward,
    loss_fn: LossFn,
    max_samples: int,
    estimator: Literal["per_sample", "per_batch"] = "per_sample",
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

    Returns:
        ``({name: Σ g²}, count)``: count is the number of samples (``per_sample``) or batches.
    """
    if estimator not in ("per_sample", "per_batch"):
        raise ValueError(f"estimator must be 'per_sample' or 'per_batch', got {estimator!r}")
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count, seen = 0, 0
    with D.local_only(), torch.enable_grad():
        for images, texts in batches:
            take = min(images.shape[0], max_samples - seen)
            if take <= 0:
                break
            if take < images.shape[0]:
                images = images[:take]
                texts = {k: v[:take] for k, v in texts.items()} if isinstance(texts, dict) else texts[:take]
            seen += take
            if estimator == "per_batch":
                for s, g in zip(sums.values(), _grads(_total(loss_fn(**forward(images, texts))), params)):
                    s.add_(g.float().square())
                count += 1
            else:
                for g_i in _per_sample_grads(params, images, texts, forward, loss_fn):
                    for s, g in zip(sums.values(), g_i):
                        s.add_(g.float().square())
                    count += 1
    return sums, count


def _per_sample_grads(params, images: Tensor, texts: Any, forward: Forward, loss_fn: LossFn):
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
        yield _grads(surrogate, params)


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


def normalize_mean(fisher: dict[str, Tensor]) -> dict[str, Tensor]:
    """Scale a Fisher so its mean over every tracked element is 1. Then ``λ`` means the same as in
    the uniform-importance L2 baseline (same total stiffness, redistributed by importance) and
    does not depend on the loss scale, the estimator or the batch size."""
    total = sum(float(f.double().sum()) for f in fisher.values())
    numel = sum(f.numel() for f in fisher.values())
    mean = total / max(numel, 1)
    if not math.isfinite(mean) or mean <= 0:
        raise ValueError(f"cannot normalise a Fisher estimate with mean {mean}")
    return {n: f / mean for n, f in fisher.items()}


class EWCPenalty:
    """The consolidated tasks and their penalty ``λ/2 · Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²``.

    - ``separate``: one (Fisher, anchor) pair per consolidated task, each penalised on its own.
    - ``online`` (Schwarz et al. 2018): one running Fisher ``F ← γ F + F_new`` and one anchor, the
      parameters after the latest task; memory stays constant over the stream.

    A Fisher of ``None`` means uniform importance (``F ≡ 1``): plain L2 to the anchor(s).

    Args:
        mode: ``separate`` or ``online``.
        gamma: decay of the running Fisher in online mode (1: no decay).
    """

    def __init__(self, mode: Literal["separate", "online"] = "separate", gamma: float = 1.0) -> None:
        if mode not in ("separate", "online"):
            raise ValueError(f"mode must be 'separate' or 'online', got {mode!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
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
        loss's backward (and after DDP averaged it: the penalty is the same on every rank).
        """
        value = torch.zeros((), dtype=torch.float32, device=_device(params))
        grads: dict[str, Tensor] = {}
        if lam == 0 or not self.terms:
            return value, grads
        with torch.no_grad():
            for term in self.terms:
                fisher, anchor = term["fisher"], term["anchor"]
                for n, p in params.items():
                    diff = p.detach() - anchor[n]
                    weighted = diff if fisher is None else fisher[n] * diff
                    value = value + 0.5 * lam * (weighted * diff).sum().float()
                    g = lam * weighted
                    grads[n] = grads[n] + g if n in grads else g
        return value, grads

    def to(self, device: torch.device | str) -> EWCPenalty:
        for term in self.terms:
            for key in ("fisher", "anchor"):
                if term[key] is not None:
                    term[key] = {n: t.to(device) for n, t in term[key].items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "gamma": self.gamma, "terms": self.terms, "tasks_consolidated": self.tasks_consolidated}

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
