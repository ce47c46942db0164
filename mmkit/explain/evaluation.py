"""Measures of whether relevance maps mean something.

- Pointing game (Zhang et al. 2016): a map "points" at its maximum (the map upsampled to the
  image like the heatmap shown); a hit when that pixel lies inside the box of the object the
  caption names. Chance for a uniformly random point is the box's area fraction.
- Deletion and insertion (Petsiuk et al. 2018, RISE): remove (or reveal, starting from a
  blank image) patches in order of relevance and track the image–text score; the area under the
  curve (score averaged over the fraction of patches removed/revealed) is low for deletion and
  high for insertion when the order is faithful to what the model uses. Compare with a random
  order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkit.explain.baselines import occlude_patch
from mmkit.explain.scoring import PairScorer
from mmkit.explain.texts import Texts, texts_to
from mmkit.explain.towers import Towers, towers_for


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, gh, gw] -> [B, H, W], bilinear (as the overlay shows it)."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def pointing_hits(maps: Tensor, boxes: list[tuple[float, float, float, float]], size: tuple[int, int]) -> Tensor:
    """[B] bool: the maximum of map i (upsampled to ``size`` = (H, W)) falls inside box i
    ((x0, y0, x1, y1) in pixels; a pixel counts by its centre)."""
    if len(boxes) != maps.shape[0]:
        raise ValueError(f"pointing_hits: {maps.shape[0]} maps but {len(boxes)} boxes")
    up = upsample(maps, size).flatten(1)
    peak = up.argmax(dim=1)
    ys, xs = (peak // size[1]).float() + 0.5, (peak % size[1]).float() + 0.5
    box = torch.tensor(boxes, dtype=torch.float32, device=maps.device)
    return (xs >= box[:, 0]) & (xs <= box[:, 2]) & (ys >= box[:, 1]) & (ys <= box[:, 3])


def box_area_fraction(box: tuple[float, float, float, float], size: tuple[int, int]) -> float:
    """The share of the image's pixels (by centre) inside ``box``: a random point's hit chance."""
    h, w = size
    xs, ys = torch.arange(w) + 0.5, torch.arange(h) + 0.5
    inside_x = ((xs >= box[0]) & (xs <= box[2])).sum().item()
    inside_y = ((ys >= box[1]) & (ys <= box[3])).sum().item()
    return inside_x * inside_y / (h * w)


def curve_steps(num_cells: int, max_steps: int = 64) -> list[int]:
    """How many patches are removed (revealed) at each point of a curve: 0 .. num_cells."""
    if num_cells <= max_steps:
        return list(range(num_cells + 1))
    return sorted({round(i * num_cells / max_steps) for i in range(max_steps + 1)})


@torch.no_grad()
def deletion_insertion(scorer: PairScorer, towers: Towers, images: Tensor, texts: Texts, order: Tensor,
                       fill: float = 0.0, chunk: int = 256, max_steps: int = 64) -> dict[str, Tensor]:
    """Scores along the deletion and insertion curves of each pair, patches taken in ``order``
    ([B, gh*gw] cell indices, most relevant first). Returns ``fraction`` [S] (of patches
    removed/revealed), ``deletion`` and ``insertion`` [B, S] scores, and their areas
    ``deletion_auc`` and ``insertion_auc`` [B] (trapezoid rule over the fraction)."""
    device = scorer.device
    images, texts, order = images.to(device), texts_to(texts, device), order.to(device)
    batch = images.shape[0]
    gh, gw = towers.grid(images)
    steps = curve_steps(gh * gw, max_steps)
    text_f = scorer.features(texts=texts)["text_features"]
    blank = torch.full_like(images[0], fill)

    def masked(b: int, k: int, reveal: bool) -> Tensor:
        out = blank.clone() if reveal else images[b].clone()
        for cell in order[b, :k].tolist():
            r, c = divmod(cell, gw)
            if reveal:
                ph, pw = towers.patch_size
                out[..., r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = images[b, :, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
            else:
                out = occlude_patch(out, towers.patch_size, r, c, fill)
        return out

    curves = {}
    for name, reveal in (("deletion", False), ("insertion", True)):
        variants = [(b, s) for b in range(batch) for s in range(len(steps))]
        scores = torch.empty(batch, len(steps), device=device)
        was_training = scorer.model.training
        scorer.model.eval()
        for start in range(0, len(variants), chunk):
            part = variants[start:start + chunk]
            pix = torch.stack([masked(b, steps[s], reveal) for b, s in part])
            b_idx = torch.tensor([b for b, _ in part], device=device)
            s_idx = torch.tensor([s for _, s in part], device=device)
            scores[b_idx, s_idx] = scorer.score(scorer.features(images=pix)["image_features"], text_f[b_idx])
        scorer.model.train(was_training)
        curves[name] = scores
    fraction = torch.tensor(steps, dtype=torch.float32, device=device) / (gh * gw)
    return {"fraction": fraction, **curves,
            "deletion_auc": torch.trapezoid(curves["deletion"], fraction, dim=1),
            "insertion_auc": torch.trapezoid(curves["insertion"], fraction, dim=1)}


def relevance_order(maps: Tensor) -> Tensor:
    """[B, gh*gw] cell indices, most relevant first (ties by position, so the order is deterministic)."""
    return torch.sort(maps.flatten(1), dim=1, descending=True, stable=True).indices


def random_order(batch: int, num_cells: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_cells, generator=generator) for _ in range(batch)])


def shape_queries(dataset, indices) -> list[dict]:
    """One query per shape of each SyntheticShapes sample: ``index``, ``phrase`` (the caption
    naming that shape, e.g. "a small red circle"), its ``box`` and the ``others``' boxes (in a
    two-shape image the other shape is a distractor the map should not point at)."""
    queries = []
    for i in indices:
        objects = dataset.boxes(i)
        for k, obj in enumerate(objects):
            queries.append({"index": i, "phrase": obj["phrase"], "box": obj["box"],
                            "others": [o["box"] for j, o in enumerate(objects) if j != k]})
    return queries


def pointing_game(model, preprocessing, dataset, queries: list[dict], methods, project=None, batch_size: int = 64,
                  seed: int = 0) -> dict[str, dict[str, float]]:
    """Pointing game of each method, and of a ``random`` map, on ``queries`` (``shape_queries``).
    Per method: ``accuracy`` (the map's maximum inside the named shape's box), ``distractor``
    (inside another shape's box instead) and ``n``; plus ``"chance"``: the mean box area
    fraction. The dataset's images must be the model's input size (boxes are in its pixels)."""
    from mmkit.explain.api import explain_pairs

    if not queries:
        raise ValueError("pointing_game: no queries")
    transform = preprocessing.image_transform(False)
    generator = torch.Generator().manual_seed(seed)
    hits: dict[str, list[Tensor]] = {m: [] for m in [*methods, "random"]}
    misses: dict[str, list[Tensor]] = {m: [] for m in hits}
    size = None
    for start in range(0, len(queries), batch_size):
        part = queries[start:start + batch_size]
        images = torch.stack([transform(dataset[q["index"]]["image"]) for q in part])
        if tuple(images.shape[-2:]) != (dataset.image_size, dataset.image_size):
            raise ValueError(f"pointing_game: the model sees {tuple(images.shape[-2:])} pixels but the dataset's images "
                             f"are {dataset.image_size}; use SyntheticShapes(image_size=...) of the model's size")
        size = tuple(images.shape[-2:])
        texts = preprocessing.tokenize([q["phrase"] for q in part])
        maps = {m: explain_pairs(model, images, texts, m, project).patches.cpu() for m in methods}
        gh, gw = towers_for(model).grid(images)
        maps["random"] = torch.rand(len(part), gh, gw, generator=generator)
        for method, m in maps.items():
            named = pointing_hits(m, [q["box"] for q in part], size)
            other = torch.zeros_like(named)
            for k in range(max(len(q["others"]) for q in part)):
                boxes = [q["others"][k] if k < len(q["others"]) else (-1, -1, -1, -1) for q in part]
                other |= pointing_hits(m, boxes, size)
            hits[method].append(named)
            misses[method].append(other & ~named)
    result = {m: {"accuracy": torch.cat(hits[m]).float().mean().item(),
                  "distractor": torch.cat(misses[m]).float().mean().item(), "n": len(queries)} for m in hits}
    result["chance"] = {"accuracy": sum(box_area_fraction(q["box"], size) for q in queries) / len(queries),
                        "distractor": float("nan"), "n": len(queries)}
    return result
