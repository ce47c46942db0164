"""The loss protocol: what a technique gives a loss, what it gets back, and when it sets it up.

Every technique calls its loss the same way (``DualEncoderModule.compute_loss``):

    terms = loss(**inputs)

**Inputs**, all keyword arguments:

- the model's outputs (after the technique's ``project``): ``image_features`` (b, d),
  ``text_features`` (b, d), ``logit_scale`` (scalar, already exponentiated), ``logit_bias``
  (SigLIP-style models only), ``pair_logits`` (the MLP similarity head, where used); KDStudent adds
  the teacher's as ``teacher_image_features``, ``teacher_text_features``, ``teacher_logit_scale``;
- the context (``CONTEXT``): ``step``, the global training step (an int), and ``image_ids``, the
  (b,) id of each row's image (None where the batch has none), so that another caption of the same
  image is never a negative.

A loss receives the keywords its ``forward`` names, or all of them if it takes ``**kwargs``
(read from the signature once per class: ``call_loss``). So a loss that needs only the features
declares ``forward(self, image_features, text_features)`` and nothing else reaches it.

**Returns** a dict of named tensors: the ``*_loss`` terms are summed and optimised, every other
entry is a detached statistic that is only logged (``train/<name>``). A loss is exact across
ranks: N processes with batch b give the value (averaged over ranks) and the gradients (after
DDP's averaging) of one process with batch N·b. Gather features with
``mmkit.distributed.all_gather_with_grad`` and divide a rank's sum of terms by
``mmkit.distributed.mean_divisor`` / ``global_mean_divisor``.

**Declarations**, read by the technique's ``configure_model``:

- ``uses_logit_scale`` (default True): False where the loss never reads the temperature (hinge
  losses); when no loss of a technique reads it, the temperature is frozen: DDP's reducer
  would otherwise wait for its gradient and fail on the next step.
- ``uses_logit_bias`` (``PairedLoss``: False; SigLIP's loss: True): likewise for the bias.
- ``setup(embed_dim, device)``: called once the model exists and before DDP wraps the module, to
  create what depends on the embedding width (the memory queue's buffers). Idempotent.

``PairedLoss`` is the base class with these defaults; a plain ``nn.Module`` with such a ``forward``
works too (it counts as using the temperature and the bias, and has no setup). ``LossSum`` adds up
several losses with weights; every technique's ``loss:`` takes one loss or a list of them.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mmkit.config_checks import Range, check_settings

CONTEXT = ("step", "image_ids")
LOSS_SUFFIX = "_loss"  # entries ending in it are optimised; the others are statistics


class PairedLoss(nn.Module):
    """Base class of mmkit's losses on a batch of paired image and text features (see the module
    docstring for the protocol). A subclass implements ``forward`` and, where it needs them,
    overrides the declarations and ``setup``."""

    uses_logit_scale: bool = True
    uses_logit_bias: bool = False

    def setup(self, embed_dim: int, device: torch.device | str | None = None) -> None:
        """Create what depends on the embedding width, before DDP wraps the module (idempotent).
        Default: set up the losses this one holds."""
        for child in self.children():
            setup_loss(child, embed_dim, device)

    def forward(self, image_features: Tensor, text_features: Tensor, **inputs: Any) -> dict[str, Tensor]:
        raise NotImplementedError


@functools.lru_cache(maxsize=None)
def _accepted(cls: type) -> frozenset[str] | None:
    """Keyword names a loss class's ``forward`` takes; None if it takes ``**kwargs``."""
    params = inspect.signature(cls.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


def call_loss(loss: nn.Module, inputs: dict[str, Any]) -> dict[str, Tensor]:
    """``loss(**inputs)`` with only the inputs its ``forward`` declares."""
    accepted = _accepted(type(loss))
    return loss(**(inputs if accepted is None else {k: v for k, v in inputs.items() if k in accepted}))


def loss_context(step: int, batch: dict) -> dict[str, Any]:
    """The context every technique passes to its loss with the model outputs."""
    return {"step": step, "image_ids": batch.get("image_id")}


def scale_terms(terms: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    """``terms`` with the ``*_loss`` entries multiplied by ``weight`` (statistics unchanged)."""
    if weight == 1:
        return terms
    return {k: weight * v if k.endswith(LOSS_SUFFIX) else v for k, v in terms.items()}


def uses_logit_scale(loss: nn.Module) -> bool:
    return bool(getattr(loss, "uses_logit_scale", True))


def uses_logit_bias(loss: nn.Module) -> bool:
    # A loss that never reads the temperature has no logits for a bias to shift.
    return uses_logit_scale(loss) and bool(getattr(loss, "uses_logit_bias", True))


def setup_loss(loss: nn.Module, embed_dim: int, device: torch.device | str | None = None) -> None:
    """Call ``loss.setup`` where the loss has one."""
    setup = getattr(loss, "setup", None)
    if callable(setup):
        setup(embed_dim, device)


class LossSum(PairedLoss):
    """The weighted sum of several losses: each is called through the protocol (``call_loss``),
    its ``*_loss`` terms are multiplied by its weight, and all terms are returned under their own
    names (two losses returning the same name is an error: give them distinct ``name`` settings).

    Uses the temperature (bias) if any of its losses does; ``setup`` sets up each of them. Indexing
    gives the losses in order (``loss_sum[0]``). Every technique wraps its ``loss:`` in one, so a
    list in the config (``loss: [...]``) is the same as ``LossSum`` with weights 1.

    Args:
        losses: the losses, each following the protocol.
        weights: one weight per loss (default: 1 each). A loss with a ``weight`` setting of its own
            (``RankingLoss``) applies that too.
    """

    setting_ranges = {"weights": Range(ge=0, each=True, none="1 each")}

    def __init__(self, losses: list[nn.Module], weights: list[float] | None = None) -> None:
        check_settings(self, locals(), LossSum.setting_ranges)
        super().__init__()
        losses = list(losses)
        if not losses:
            raise ValueError("LossSum: give at least one loss")
        if weights is not None and len(weights) != len(losses):
            raise ValueError(f"LossSum: {len(weights)} weights for {len(losses)} losses")
        names = [getattr(l, "name", None) for l in losses]
        named = [n for n in names if n is not None]
        if len(named) != len(set(named)):
            raise ValueError(f"LossSum: losses need distinct names to be combined, got {names}")
        for i, loss in enumerate(losses):  # registered as "0", "1", ...: state-dict keys loss.0.<...>
            self.add_module(str(i), loss)
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(losses)

    def __getitem__(self, i: int) -> nn.Module:
        return list(self.children())[i]

    def __len__(self) -> int:
        return len(self.weights)

    @property
    def uses_logit_scale(self) -> bool:  # type: ignore[override]
        return any(uses_logit_scale(l) for l in self.children())

    @property
    def uses_logit_bias(self) -> bool:  # type: ignore[override]
        return any(uses_logit_bias(l) for l in self.children())

    def forward(self, **inputs: Any) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for loss, weight in zip(self.children(), self.weights):
            out = scale_terms(call_loss(loss, inputs), weight)
            clash = terms.keys() & out.keys()
            if clash:
                raise ValueError(f"LossSum: two losses return {sorted(clash)}; give them distinct names")
            terms.update(out)
        return terms


def as_loss(loss: nn.Module | Sequence[nn.Module] | None, default: type[nn.Module]) -> LossSum:
    """A technique's ``loss:`` argument as a ``LossSum``: ``default()`` for None, one loss or a
    list wrapped, a ``LossSum`` as it is."""
    if isinstance(loss, LossSum):
        return loss
    if loss is None:
        return LossSum([default()])
    if isinstance(loss, nn.Module) and not isinstance(loss, nn.ModuleList):
        return LossSum([loss])
    return LossSum(list(loss))
