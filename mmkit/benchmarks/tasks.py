"""The two kinds of benchmark: zero-shot classification and image–text retrieval.

Each is a small configuration object (YAML-friendly) that reads its data once, on first use, and
scores a ``BenchmarkEncoder`` on all of it. Scores are computed over every rank's features, so
every rank returns the same numbers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mmkit.benchmarks import sources
from mmkit.benchmarks.encoding import BenchmarkEncoder, encode_images, encode_texts
from mmkit.benchmarks.metadata import prompt, resolve_class_names, resolve_templates
from mmkit.metrics.classification import classification_scores
from mmkit.metrics.retrieval import retrieval_metrics
from mmkit.metrics.zeroshot import build_zeroshot_classifier


def _one_source(where: str, **given) -> str:
    chosen = [k for k, v in given.items() if v is not None]
    if len(chosen) != 1:
        raise ValueError(f"{where}: give exactly one of {', '.join(given)} (got {chosen or 'none'})")
    return chosen[0]


def _exists(where: str, path: str, folder: bool = False) -> None:
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise FileNotFoundError(f"{where}: {path!r} is not {'a folder' if folder else 'a file'}")


def _shapes(settings: dict):
    from mmkit.data.sources.synthetic import SyntheticShapes

    return SyntheticShapes(**{"two_shapes_prob": 0.0, **settings})


class Benchmark:
    """A named benchmark; ``evaluate`` returns its scores (floats) by metric name."""

    task = ""  # the metric prefix: zeroshot/<name>/<metric>

    def __init__(self, name: str, batch_size: int = 64, num_workers: int = 0) -> None:
        if not name or "/" in name:
            raise ValueError(f"a benchmark needs a name without '/', got {name!r}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"benchmark {name}: batch_size must be >= 1 and num_workers >= 0")
        self.name, self.batch_size, self.num_workers = name, batch_size, num_workers

    def evaluate(self, encoder: BenchmarkEncoder) -> dict[str, float]:
        raise NotImplementedError

    def size(self) -> dict[str, int]:
        """How much data the scores are over (for the results table)."""
        raise NotImplementedError


class ZeroShotClassification(Benchmark):
    """Zero-shot classification: each image is given the class whose prompts it is most similar to.

    Data (exactly one): ``images`` an ImageFolder-style folder (a subfolder per class, sorted
    order = label order); ``manifest`` a CSV/TSV/JSONL with ``image_column`` and ``label_column``
    (integer labels, or class names); ``shapes`` settings of ``mmkit.data.SyntheticShapes``
    (``{size, seed, image_size, label_attribute}``; one shape per image), which needs no files.

    Args:
        name: the name metrics are logged under (``zeroshot/<name>/top1``).
        class_names: class names in label order: a built-in set (``imagenet1k``, from open_clip),
            a ``.txt`` (one per line) or ``.json`` file, or a list. Default: the folder names
            (``_`` read as a space), the manifest's text labels, or the shapes' classes.
        templates: prompt templates with ``{}``: a built-in set (``openai_imagenet``: 80
            prompts, ``simple_imagenet``: 7, from open_clip), a file, or a list.
        image_root: folder relative manifest image paths start from (default: the manifest's).
        batch_size: images (and prompts) per forward on each rank.
        num_workers: image-loading worker processes per rank.
        top_k: the k of top-k accuracy (a k of at least the number of classes is left out).
    """

    task = "zeroshot"

    def __init__(
        self,
        name: str,
        images: str | None = None,
        manifest: str | None = None,
        shapes: dict | None = None,
        class_names: str | list[str] | None = None,
        templates: str | list[str] = "openai_imagenet",
        image_column: str = "image",
        label_column: str = "label",
        image_root: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        top_k: Sequence[int] = (1, 5),
    ) -> None:
        super().__init__(name, batch_size, num_workers)
        where = f"zero-shot benchmark {name!r}"
        self.source = _one_source(where, images=images, manifest=manifest, shapes=shapes)
        if images is not None:
            _exists(where, images, folder=True)
        if manifest is not None:
            _exists(where, manifest)
        self.images, self.manifest, self.shapes = images, manifest, shapes
        self.image_column, self.label_column, self.image_root = image_column, label_column, image_root
        self.class_names = resolve_class_names(class_names, where) if class_names is not None else None
        self.templates = resolve_templates(templates, where)
        self.top_k = tuple(top_k)
        self._data: sources.LabelledImages | None = None

    def data(self) -> sources.LabelledImages:
        if self._data is None:
            if self.source == "images":
                self._data = sources.image_folder(self.images, self.class_names)
            elif self.source == "manifest":
                self._data = sources.classification_manifest(
                    self.manifest, self.image_column, self.label_column, self.image_root, self.class_names)
            else:
                self._data = sources.shapes_classification(_shapes(self.shapes), self.class_names)
        return self._data

    def size(self) -> dict[str, int]:
        data = self.data()
        return {"images": len(data.images), "classes": len(data.class_names), "prompts": len(self.templates)}

    def classifier(self, encoder: BenchmarkEncoder) -> torch.Tensor:
        """(C, D) class embeddings: every class's prompts encoded (split over ranks), each
        normalised, averaged and renormalised (``mmkit.metrics.zeroshot``)."""
        names = self.data().class_names
        prompts = [prompt(t, c) for c in names for t in self.templates]
        features = encode_texts(encoder, prompts, self.batch_size)
        row = {p: i for i, p in enumerate(prompts)}  # a repeated class name gives the same prompts and rows
        return build_zeroshot_classifier(names, self.templates, lambda ps: features[[row[p] for p in ps]])

    def evaluate(self, encoder: BenchmarkEncoder) -> dict[str, float]:
        data = self.data()
        with encoder.evaluating():
            classifier = self.classifier(encoder)
            images = encode_images(encoder, data.images, self.batch_size, self.num_workers, self.name)
        logits = F.normalize(images, dim=-1) @ classifier.T
        scores = classification_scores(logits, torch.tensor(data.labels), self.top_k)
        return {k: float(v) for k, v in scores.items()}


class Retrieval(Benchmark):
    """Image↔text retrieval Recall@K; an image may have several captions (COCO/Flickr30k: 5):
    image→text counts a hit when any of its captions is in the top K, text→image when its image is.

    Data (exactly one): ``karpathy`` a Karpathy split file (``dataset_coco.json``,
    ``dataset_flickr30k.json``) and its ``split``; ``manifest`` a CSV/TSV/JSONL, one caption per
    row (rows with the same image path are one image), or a list of captions per JSONL line;
    ``shapes`` settings of ``mmkit.data.SyntheticShapes`` (one caption per image).

    Args:
        name: the name metrics are logged under (``retrieval/<name>/i2t_R@1``).
        split: the Karpathy split scored (``test``, ``val``, ``train``, ``restval``; None: all).
        image_root: folder image paths start from; default: the file's folder. COCO's
            ``filepath`` (``val2014``) is joined under it.
        batch_size: images (and captions) per forward on each rank.
        num_workers: image-loading worker processes per rank.
        ks: the K of Recall@K.
    """

    task = "retrieval"

    def __init__(
        self,
        name: str,
        karpathy: str | None = None,
        manifest: str | None = None,
        shapes: dict | None = None,
        split: str | None = "test",
        image_column: str = "image",
        caption_column: str = "caption",
        image_root: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        ks: Sequence[int] = (1, 5, 10),
    ) -> None:
        super().__init__(name, batch_size, num_workers)
        where = f"retrieval benchmark {name!r}"
        self.source = _one_source(where, karpathy=karpathy, manifest=manifest, shapes=shapes)
        for path in (karpathy, manifest):
            if path is not None:
                _exists(where, path)
        self.karpathy, self.manifest, self.shapes, self.split = karpathy, manifest, shapes, split
        self.image_column, self.caption_column, self.image_root = image_column, caption_column, image_root
        self.ks = tuple(ks)
        self._data: sources.CaptionedImages | None = None

    def data(self) -> sources.CaptionedImages:
        if self._data is None:
            if self.source == "karpathy":
                self._data = sources.karpathy_json(self.karpathy, self.split, self.image_root)
            elif self.source == "manifest":
                self._data = sources.retrieval_manifest(self.manifest, self.image_column, self.caption_column, self.image_root)
            else:
                self._data = sources.shapes_retrieval(_shapes(self.shapes))
        return self._data

    def size(self) -> dict[str, int]:
        data = self.data()
        return {"images": len(data.images), "captions": len(data.captions)}

    def evaluate(self, encoder: BenchmarkEncoder) -> dict[str, float]:
        data = self.data()
        with encoder.evaluating():
            texts = encode_texts(encoder, data.captions, self.batch_size)
            images = encode_images(encoder, data.images, self.batch_size, self.num_workers, self.name)
        owner = torch.tensor(data.caption_image, device=images.device)
        # One row per caption with its image; retrieval_metrics keeps each image once (by id).
        scores = retrieval_metrics(images[owner], texts, owner, ks=self.ks)
        return {k: float(v) for k, v in scores.items()}
