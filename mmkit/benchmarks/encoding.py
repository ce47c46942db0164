"""Encoding a benchmark's images and texts with a model, split over ranks and gathered once.

Item i is encoded on rank ``i % world_size`` (no padding, so no item twice); one gather puts every
item's features back in item order on every rank, so each rank scores the whole benchmark and gets
the numbers one process gets. Every rank runs the same number of forward passes (a rank short of
batches repeats one and drops it): a model whose parameters are sharded (FSDP2, ZeRO-3) gathers
them inside each forward, a collective.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mmkit import distributed as D


class BenchmarkEncoder:
    """What a benchmark needs of a model: its evaluation image transform, and normalised image and
    text features from its ``forward(images, texts)`` (a ``DualEncoderModule``, whose forward adds
    a technique's ``project``, or a bare ``DualEncoder``).

    Args:
        model: the module whose forward is called (in eval mode, without gradients).
        preprocessing: the model's ``Preprocessing`` (eval image transform and tokenizer).
        device: where batches go.
        context: a factory of extra context around the whole evaluation (e.g. the trainer's
            precision autocast, or gathering ZeRO-3 parameters).
    """

    def __init__(self, model: nn.Module, preprocessing, device: torch.device | str = "cpu",
                 context: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        towers = getattr(model, "student_towers", "both")  # KDStudent: a single-tower student has one
        if towers != "both":
            raise ValueError(
                f"benchmarks score both towers of one model; this {type(model).__name__} trains only its {towers} "
                "tower (student_towers), the other is its teacher's")
        self.model = model
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.context = context

    @property
    def image_transform(self):
        return self.preprocessing.image_transform(False)

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode (each submodule's own mode put back afterwards), no gradients, the extra context."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad(), (self.context() if self.context else contextlib.nullcontext()):
                yield self
        finally:
            for m, training in modes:
                m.training = training

    def encode_images(self, images: Tensor) -> Tensor:
        return self._features(self.model(images.to(self.device), None), "image_features")

    def encode_texts(self, texts: list[str]) -> Tensor:
        tokens = move_data_to_device(self.preprocessing.tokenize(list(texts)), self.device)
        return self._features(self.model(None, tokens), "text_features")

    def _features(self, outputs: dict, key: str) -> Tensor:
        if outputs.get(key) is None:  # e.g. a single-tower student, whose other modality is its teacher's
            raise ValueError(f"benchmarks need both towers: {type(self.model).__name__}'s forward gives no {key!r}")
        return outputs[key].float()


class _TransformedImages(Dataset):
    """Some items of an image source, loaded and transformed (in loader workers when there are)."""

    def __init__(self, images, items: Sequence[int], transform, where: str) -> None:
        self.images, self.items, self.transform, self.where = images, list(items), transform, where

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tensor:
        image = self.images.load(self.items[i])
        if isinstance(image, str):  # a benchmark's score is only comparable on all of its images
            raise ValueError(f"benchmark {self.where}: {image}")  # noqa: TRY004 (a bad file, not a wrong type)
        return self.transform(image)


def my_items(count: int) -> list[int]:
    """The items this rank encodes: every ``world_size``-th, from its rank on."""
    return list(range(D.rank(), count, D.world_size()))


def _gather_in_order(local: Tensor, count: int, dim: int, device: torch.device) -> Tensor:
    world = D.world_size()
    local = local if local.numel() else torch.empty(0, dim, device=device)
    gathered = D.all_gather_no_grad(local.to(device))
    if gathered.shape[0] != count:
        raise RuntimeError(f"gathered {gathered.shape[0]} rows for {count} items")
    order = torch.cat([torch.arange(r, count, world) for r in range(world)]).to(gathered.device)
    out = torch.empty_like(gathered)
    out[order] = gathered  # rank r held items r, r + world, ...: back to item order
    return out


def _in_lockstep(batches: Iterable, n_batches: int, encode: Callable, spare: Callable[[], object],
                 device: torch.device) -> tuple[Tensor, int]:
    """Encode this rank's batches, then repeat forwards until every rank has run as many."""
    most = max(D.gather_sizes(n_batches, device))
    parts: list[Tensor] = []
    last = None
    for batch in batches:
        parts.append(encode(batch))
        last = batch
    for _ in range(most - n_batches):
        out = encode(last if last is not None else spare())  # result dropped
        parts = parts or [out[:0]]
    # A rank with nothing to encode still needs the width for the gather: ask the others.
    dim = max(D.gather_sizes(int(parts[0].shape[1]) if parts else 0, device))
    local = torch.cat(parts) if parts else torch.empty(0, dim, device=device)
    return local, dim


def encode_images(encoder: BenchmarkEncoder, images, batch_size: int, num_workers: int, where: str) -> Tensor:
    """(N, D) float32 features of every image of ``images`` (an ``ImageFiles``/``ShapesImages``), on every rank."""
    items = my_items(len(images))
    dataset = _TransformedImages(images, items, encoder.image_transform, where)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    spare = _TransformedImages(images, [0], encoder.image_transform, where)

    def spare_batch():
        return spare[0][None]

    local, dim = _in_lockstep(loader, math.ceil(len(items) / batch_size), encoder.encode_images, spare_batch, encoder.device)
    return _gather_in_order(local, len(images), dim, encoder.device)


def encode_texts(encoder: BenchmarkEncoder, texts: Sequence[str], batch_size: int) -> Tensor:
    """(T, D) float32 features of every text, on every rank."""
    items = my_items(len(texts))

    def batches() -> Iterator[list[str]]:
        for s in range(0, len(items), batch_size):
            yield [texts[i] for i in items[s:s + batch_size]]

    local, dim = _in_lockstep(batches(), math.ceil(len(items) / batch_size), encoder.encode_texts,
                              lambda: [texts[0]], encoder.device)
    return _gather_in_order(local, len(texts), dim, encoder.device)
