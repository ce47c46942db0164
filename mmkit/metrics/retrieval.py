"""Image↔text retrieval Recall@K and median rank over a whole evaluation split.

Rows are image–caption pairs; several rows may share an ``image_id`` (one image, several
captions). Images are deduplicated by id before ranking, so the gallery holds each image once:

- text→image: a caption's only correct image is its own image.
- image→text: an image is correct at rank k if ANY of its captions is in the top k, i.e. its
  rank is the rank of its best-scoring caption.

Ranks are 1-based and ties count against the query (a candidate scoring exactly as high as the
correct one is ranked above it), so a collapsed model that maps everything to one point gets
the worst rank, not a perfect one. The similarity is computed in query chunks, never as a full
captions × images matrix.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from mmkit import distributed as D


def _first_occurrence(keys: Tensor) -> tuple[Tensor, Tensor]:
    """For each distinct key (sorted), the position of its first row; and each row's key slot."""
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    positions = torch.arange(keys.numel(), device=keys.device)
    first = torch.full((uniq.numel(),), keys.numel(), dtype=torch.long, device=keys.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return first, inverse


@torch.no_grad()
def retrieval_ranks(
    images: Tensor, texts: Tensor, text_to_image: Tensor, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """1-based ranks of the correct item for every image query and every text query.

    Args:
        images: (I, D) unique-image embeddings.
        texts: (T, D) caption embeddings.
        text_to_image: (T,) row of ``images`` that each caption describes; every image must
            have at least one caption.
        chunk_size: queries scored at once; peak memory is chunk_size × max(I, T) scores.

    Returns:
        ``(i2t_ranks (I,), t2i_ranks (T,))``.
    """
    n_img, n_txt = images.shape[0], texts.shape[0]
    # Scores are always compared with scores read out of the same matmul, so the comparisons
    # are exact; a separately computed dot product could differ in the last bits.
    t2i = torch.empty(n_txt, dtype=torch.long, device=texts.device)
    for s in range(0, n_txt, chunk_size):
        sim = texts[s : s + chunk_size] @ images.T
        correct = sim.gather(1, text_to_image[s : s + chunk_size, None])
        # The count includes the correct image itself, so it is already the 1-based rank.
        t2i[s : s + chunk_size] = (sim >= correct).sum(1, dtype=torch.int32)

    # Captions sorted by image make each image chunk's positives one contiguous column block,
    # so no chunk × captions positive mask is ever built.
    order = torch.argsort(text_to_image, stable=True)
    texts, owner = texts[order], text_to_image[order]
    bounds = torch.searchsorted(owner, torch.arange(n_img + 1, device=owner.device))
    i2t = torch.empty(n_img, dtype=torch.long, device=images.device)
    for s in range(0, n_img, chunk_size):
        e = min(s + chunk_size, n_img)
        lo, hi = int(bounds[s]), int(bounds[e])
        sim = images[s:e] @ texts.T
        positive = owner[None, lo:hi] == torch.arange(s, e, device=owner.device)[:, None]
        best = sim[:, lo:hi].masked_fill(~positive, float("-inf")).amax(1, keepdim=True)
        # Only negatives can push the best caption down, so positives at or above it are removed.
        at_or_above = (sim >= best).sum(1, dtype=torch.int32)
        positives_at_or_above = ((sim[:, lo:hi] >= best) & positive).sum(1, dtype=torch.int32)
        i2t[s:e] = 1 + at_or_above - positives_at_or_above
    return i2t, t2i


def _summarise(ranks: Tensor, prefix: str, ks: Sequence[int]) -> dict[str, Tensor]:
    ranks = ranks.float()
    out = {f"{prefix}_R@{k}": (ranks <= k).float().mean() for k in ks}
    # Midpoint median (mean of the two middle ranks for an even count), as numpy's median.
    out[f"{prefix}_medr"] = torch.quantile(ranks, 0.5, interpolation="midpoint")
    return out


@torch.no_grad()
def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    image_id: Tensor,
    index: Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """Recall@K (fractions in [0, 1]), median rank and ``rsum`` (sum of all recalls) for a split.

    Args:
        image_features: (N, D) one row per image–caption pair (the image repeats for each caption).
        text_features: (N, D) caption embeddings.
        image_id: (N,) integer id of each row's image; images are deduplicated by it.
        index: (N,) optional integer id of each row; rows repeating an index (e.g. padding added
            by ``DistributedSampler``) are counted once.
        ks: the K of Recall@K.
        chunk_size: queries scored at once.
    """
    if image_features.shape[0] == 0:
        raise ValueError("retrieval_metrics got no rows")
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1)
    image_id = image_id.long()
    if index is not None:
        keep, _ = _first_occurrence(index.long())
        images, texts, image_id = images[keep], texts[keep], image_id[keep]
    first, text_to_image = _first_occurrence(image_id)
    i2t, t2i = retrieval_ranks(images[first], texts, text_to_image, chunk_size)
    out = {**_summarise(i2t, "i2t", ks), **_summarise(t2i, "t2i", ks)}
    out["rsum"] = sum(v for k, v in out.items() if "_R@" in k)
    return out


class RetrievalMetrics(Metric):
    """Accumulates a split's embeddings and computes :func:`retrieval_metrics` on all of it.

    Call ``update`` per batch and ``compute`` once per split; under DDP every rank gets the
    numbers of the whole split. Rows may arrive from ranks in any order and in uneven counts
    (including none on some rank). Keys: ``i2t_R@{k}``, ``t2i_R@{k}``, ``i2t_medr``, ``t2i_medr``,
    ``rsum``.

    Args:
        ks: the K of Recall@K.
        chunk_size: queries scored at once in ``compute``.
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``compute_on_cpu=True`` to keep the
            accumulated embeddings off the accelerator).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    _feature_states: tuple[str, ...] = ("image_features", "text_features")  # (N, D) states gathered padded

    def __init__(self, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        self.chunk_size = chunk_size
        # "cat" keeps reset/state_dict/forward semantics; the actual gather is _sync_dist below.
        for name in ("image_features", "text_features", "image_id", "index"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        image_features: Tensor,
        text_features: Tensor,
        image_id: Tensor | Sequence[int],
        index: Tensor | Sequence[int] | None = None,
    ) -> None:
        """Add rows: (B, D) image and text embeddings, (B,) integer image ids, optional (B,) row ids."""
        n = image_features.shape[0]
        if text_features.shape[0] != n:
            raise ValueError(f"{n} image rows but {text_features.shape[0]} text rows")
        device = image_features.device
        image_id = torch.as_tensor(image_id, device=device).long().reshape(-1)
        # -1 marks "no index given"; mixing both kinds in one split is rejected in compute.
        index = torch.full((n,), -1, device=device) if index is None else index
        index = torch.as_tensor(index, device=device).long().reshape(-1)
        if image_id.numel() != n or index.numel() != n:
            raise ValueError("image_id and index need one entry per row")
        # float32 so every rank gathers the same dtype whatever precision the model ran in.
        self.image_features.append(F.normalize(image_features.detach().float(), dim=-1))
        self.text_features.append(F.normalize(text_features.detach().float(), dim=-1))
        self.image_id.append(image_id)
        self.index.append(index)

    def _local(self, name: str, dim: int | None) -> Tensor:
        state = getattr(self, name)
        if isinstance(state, Tensor):
            return state
        if state:
            return dim_zero_cat(state)
        if dim is None:
            return torch.empty(0, dtype=torch.long, device=self.device)
        return torch.empty(0, dim, dtype=torch.float32, device=self.device)

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        # Replaces torchmetrics' gather, which breaks on a rank that saw no rows (it pads with a
        # 1-D empty tensor) and bypasses mmkit.distributed. Called by torchmetrics' sync() only
        # when torch.distributed is initialised; every rank runs the same collectives.
        if process_group is not None:
            raise NotImplementedError("RetrievalMetrics gathers over the default process group only")
        for name in self._feature_states:
            state = getattr(self, name)
            if isinstance(state, Tensor):
                width = int(state.shape[1])
            else:
                width = int(state[0].shape[1]) if state else 0
            # A rank with no rows still needs the feature width to join the padded all_gather.
            dim = max(D.gather_sizes(width, self.device))
            setattr(self, name, self._gather(self._local(name, dim)))
        for name in ("image_id", "index"):
            setattr(self, name, self._gather(self._local(name, None)))

    def _gather(self, local: Tensor) -> Tensor:
        # With compute_on_cpu the rows wait on the CPU, but NCCL gathers only device tensors.
        return D.all_gather_no_grad(local.to(self.device)).to(local.device)

    def compute(self) -> dict[str, Tensor]:
        index = self._local("index", None)
        given = index >= 0
        if given.any() and not given.all():
            raise ValueError("pass `index` to every update of a split or to none")
        return retrieval_metrics(
            self._local("image_features", 0),
            self._local("text_features", 0),
            self._local("image_id", None),
            index if given.any() else None,
            ks=self.ks,
            chunk_size=self.chunk_size,
        )
