"""Hinge (ranking) losses between matched image and text embeddings: pairwise contrastive with
margin, VSE++ max-violation (with a sum-of-hinges warm-up) and triplet loss.

For an anchor a (an image, or a caption) with positive p (its caption, or its image) and a
chosen negative n (another caption, or another image), each term is

    max(0, margin + d(a, p) − d(a, n)).

Which negatives are chosen is ``mmkit.losses.negative_mining``; extra negatives can come from a
``MemoryQueue`` of past batches. Negatives are drawn from the global batch: features are
gathered across ranks with gradients and each rank computes the terms of its own anchors
against every candidate, normalised so that N processes with batch b give the value (averaged
over ranks) and the gradients (after DDP's averaging) of one process with batch N·b — the
convention of ``ClipLoss(local_loss=True)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkit import distributed as D
from mmkit.config_checks import Range, check_settings
from mmkit.losses.memory_queue import MemoryQueue
from mmkit.losses.protocol import PairedLoss
from mmkit.losses.negative_mining import NegativeStrategy, random_keys, select_negatives

Distance = Literal["cosine", "euclidean"]
Directions = Literal["both", "image_to_text", "text_to_image"]


class RankingLoss(PairedLoss):
    """Bidirectional hinge ranking loss (VSE / VSE++).

    With ``negatives: all`` and ``reduction: sum`` this is the pairwise contrastive loss with
    margin, ``max(0, d(t,i) − d(t,i′) + margin)`` summed over every in-batch negative in both
    directions (VSE's sum of hinges). With ``negatives: hardest`` it is VSE++'s max-violation
    loss; ``sum_warmup_steps`` trains with the sum of hinges for the first steps, since the
    hardest negatives of a random embedding stall early training.

    Returns ``<name>_loss`` and detached statistics over the selected (anchor, negative) terms
    of the global batch: ``<name>_active`` (fraction of non-zero hinges), ``<name>_pos_sim`` /
    ``<name>_neg_sim`` (mean cosine similarity of positives / selected negatives; ``_pos_dist``
    / ``_neg_dist`` for the Euclidean distance) and ``<name>_gap`` (mean d(a,n) − d(a,p): a term
    is active where it is below the margin).

    Args:
        margin: the hinge margin.
        distance: ``cosine`` (1 − cosine similarity) or ``euclidean``. The towers return unit
            vectors; only MetricAlign's projection head with ``normalize: false`` gives this
            loss un-normalised embeddings, which matters for ``euclidean`` only.
        negatives: which negatives each anchor is ranked against: ``all``, ``hardest``,
            ``semi_hard``, ``top_k`` or ``random`` (see ``negative_mining.select_negatives``).
        num_negatives: negatives per anchor for ``top_k`` and ``random``.
        sum_warmup_steps: use ``all`` negatives (sum of hinges) while the training step is
            below this, then ``negatives``. Needs the ``step`` argument (every technique passes
            its global step).
        reduction: ``sum`` over each anchor's selected negatives, averaged over anchors and
            summed over the two directions (VSE++); ``mean`` over all selected triplets.
        directions: ``both``, or only image anchors (``image_to_text``) or text anchors.
        memory_size: keep this many past (detached) image and text embeddings of the global
            batch as extra negatives (0: none). Used and updated in training only; validation
            ranks against in-batch negatives, so its loss is comparable across settings.
        weight: multiplies the loss (to combine several losses).
        seed: seed of ``random`` negatives (combined with the step; the same on every rank).
        gather: draw negatives from the global batch across ranks (turn off only to study
            per-rank negatives).
        name: prefix of the returned keys (distinct names let several losses be combined).
    """

    uses_logit_scale = False  # the temperature plays no part in a hinge loss

    setting_ranges = {
        "margin": Range(ge=0),
        "num_negatives": Range(ge=1, integer=True),
        "sum_warmup_steps": Range(ge=0, integer=True),
        "memory_size": Range(ge=0, integer=True),
        "weight": Range(ge=0),
        "seed": Range(integer=True),  # hashed: any integer works
    }

    def __init__(
        self,
        margin: float = 0.2,
        distance: Distance = "cosine",
        negatives: NegativeStrategy = "all",
        num_negatives: int = 1,
        sum_warmup_steps: int = 0,
        reduction: Literal["sum", "mean"] = "sum",
        directions: Directions = "both",
        memory_size: int = 0,
        weight: float = 1.0,
        seed: int = 0,
        gather: bool = True,
        name: str = "ranking",
    ) -> None:
        check_settings(self, locals(), RankingLoss.setting_ranges)
        super().__init__()
        if distance not in ("cosine", "euclidean"):
            raise ValueError(f"distance must be 'cosine' or 'euclidean', got {distance!r}")
        if negatives not in ("all", "hardest", "semi_hard", "top_k", "random"):
            raise ValueError(f"unknown negatives strategy {negatives!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if directions not in ("both", "image_to_text", "text_to_image"):
            raise ValueError(f"unknown directions {directions!r}")
        self.margin = margin
        self.distance = distance
        self.negatives = negatives
        self.num_negatives = num_negatives
        self.sum_warmup_steps = sum_warmup_steps
        self.reduction = reduction
        self.directions = directions
        self.weight = weight
        self.seed = seed
        self.gather = gather
        self.name = name
        self.memory = MemoryQueue(memory_size) if memory_size > 0 else None

    def setup(self, embed_dim: int, device: torch.device | str | None = None) -> None:
        """The memory queue's buffers, before DDP wraps the module (it broadcasts buffers)."""
        if self.memory is not None:
            self.memory.allocate(embed_dim, device)

    def strategy_at(self, step: int | None) -> str:
        """The negative strategy used at training step ``step``."""
        if self.sum_warmup_steps > 0:
            if step is None:
                raise ValueError(f"{type(self).__name__}: sum_warmup_steps needs the training step (pass step=...)")
            if step < self.sum_warmup_steps:
                return "all"
        return self.negatives

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        step: int | None = None,
        image_ids: Tensor | None = None,
        pair_logits: object = None,
        **_: object,
    ) -> dict[str, Tensor]:
        """Args: the model's outputs; ``step``: the global training step (warm-up, random
        negatives); ``image_ids``: (b,) integer id of each row's image, so other captions of the
        same image are never negatives (negative ids: unknown)."""
        if pair_logits is not None:
            raise ValueError(f"{type(self).__name__} ranks by a distance: use a model with similarity 'cosine', not 'mlp'")
        strategy = self.strategy_at(step)
        device, n_local = image_features.device, image_features.shape[0]
        if image_ids is None:
            ids = torch.full((n_local,), -1, dtype=torch.long, device=device)
        else:
            ids = torch.as_tensor(image_ids, device=device).long().reshape(-1)
        if self.gather:
            all_image, offset = D.all_gather_with_grad(image_features)
            all_text, _ = D.all_gather_with_grad(text_features)
            all_ids = D.all_gather_no_grad(ids)
        else:
            all_image, all_text, all_ids, offset = image_features, text_features, ids, 0
        n_global = all_image.shape[0]

        memory = self.memory.entries() if self.memory is not None and self.training and len(self.memory) else None
        runs = []
        if self.directions in ("both", "image_to_text"):
            runs.append((0, image_features, all_text, None if memory is None else memory[1]))
        if self.directions in ("both", "text_to_image"):
            runs.append((1, text_features, all_image, None if memory is None else memory[0]))

        total = image_features.new_zeros(())
        # count, active, sum of negative scores, sum of gaps, sum of positive scores, anchors
        stats = torch.zeros(6, dtype=torch.float64, device=device)
        for direction, anchors, candidates, extra in runs:
            cand_ids = all_ids
            if extra is not None:
                candidates = torch.cat([candidates, extra.to(candidates.dtype)])
                cand_ids = torch.cat([all_ids, memory[2]])
            dist = self._distance(anchors, candidates)
            rows = torch.arange(n_local, device=device)
            d_pos = dist[rows, rows + offset]
            valid = torch.ones_like(dist, dtype=torch.bool)
            valid[rows, rows + offset] = False
            valid &= ~((ids[:, None] == cand_ids[None, :]) & (ids[:, None] >= 0))
            keys = None
            if strategy == "random":
                keys = random_keys(self.seed, step or 0, direction, offset, n_local, dist.shape[1], device)
            chosen = select_negatives(-dist, -d_pos, valid, strategy, self.num_negatives, keys)
            hinge = torch.where(chosen, (self.margin + d_pos[:, None] - dist).clamp_min(0), 0.0)
            total = total + hinge.sum()
            with torch.no_grad():
                score = (1 - dist) if self.distance == "cosine" else dist
                pos_score = (1 - d_pos) if self.distance == "cosine" else d_pos
                gap = dist - d_pos[:, None]
                stats += torch.stack([
                    chosen.sum(), (hinge > 0).sum(), score[chosen].sum(), gap[chosen].sum(),
                    pos_score.sum(), torch.tensor(n_local, device=device),
                ]).double()
        if self.gather:
            stats = D.all_reduce_sum(stats)

        # Each rank sums the terms of its own anchors: the mean over anchors, or over selected terms.
        count = n_global if self.reduction == "sum" else float(stats[0])
        loss = total * (self.weight / D.mean_divisor(count, partitioned=self.gather))

        if self.memory is not None and self.training:
            feats = torch.cat([all_image.detach(), all_text.detach()])
            if bool(torch.isfinite(feats).all()):  # a skipped (non-finite) step must not poison the queue
                self.memory.enqueue(all_image.detach(), all_text.detach(), all_ids)

        count, active, neg, gap, pos, anchors = (float(x) for x in stats)
        unit = "sim" if self.distance == "cosine" else "dist"
        per = lambda x, n: torch.tensor(x / n if n else 0.0, device=device)  # noqa: E731
        return {
            f"{self.name}_loss": loss,
            f"{self.name}_active": per(active, count),
            f"{self.name}_pos_{unit}": per(pos, anchors),
            f"{self.name}_neg_{unit}": per(neg, count),
            f"{self.name}_gap": per(gap, count),
        }

    def _distance(self, a: Tensor, b: Tensor) -> Tensor:
        if self.distance == "cosine":
            return 1 - F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
        sq = a.pow(2).sum(-1)[:, None] + b.pow(2).sum(-1)[None, :] - 2 * a @ b.T
        # Clamped so that coinciding points (distance 0) get a zero, not a NaN, gradient.
        return sq.clamp_min(1e-12).sqrt()


class TripletLoss(RankingLoss):
    """Triplet loss on (anchor, positive, negative) triplets across modalities (FaceNet-style):
    by default Euclidean distance, semi-hard negatives and the mean over all selected triplets.
    Same statistics and exactness as ``RankingLoss``, whose other settings it accepts.

    Args:
        margin: the hinge margin.
        distance: ``euclidean`` or ``cosine``.
        negatives: ``semi_hard``, ``hardest``, ``all``, ``top_k`` or ``random``.
        num_negatives: negatives per anchor for ``top_k`` and ``random``.
        sum_warmup_steps: use all negatives while the training step is below this.
        reduction: ``mean`` over the selected triplets, or ``sum`` (see ``RankingLoss``).
        directions: ``both``, ``image_to_text`` (image anchors) or ``text_to_image``.
        memory_size: past embeddings kept as extra negatives (0: none).
        weight: multiplies the loss.
        seed: seed of ``random`` negatives.
        gather: draw negatives from the global batch across ranks.
        name: prefix of the returned keys.
    """

    def __init__(
        self,
        margin: float = 0.2,
        distance: Distance = "euclidean",
        negatives: NegativeStrategy = "semi_hard",
        num_negatives: int = 1,
        sum_warmup_steps: int = 0,
        reduction: Literal["sum", "mean"] = "mean",
        directions: Directions = "both",
        memory_size: int = 0,
        weight: float = 1.0,
        seed: int = 0,
        gather: bool = True,
        name: str = "triplet",
    ) -> None:
        super().__init__(
            margin, distance, negatives, num_negatives, sum_warmup_steps, reduction, directions,
            memory_size, weight, seed, gather, name,
        )
