"""Image–text data: sources, bad-sample handling, distributed batching and the datamodule.

Names are imported on first use: DataLoader workers started with spawn/forkserver (the default
on macOS and from Python 3.14 on Linux) re-import the modules their dataset needs, and a source
should not drag Lightning into every worker.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "BadDataError": "mmkit.data.bad_samples",
    "BadSampleTracker": "mmkit.data.bad_samples",
    "BadSample": "mmkit.data.sample",
    "ImageTextCollate": "mmkit.data.collate",
    "ImageTextDataModule": "mmkit.data.datamodule",
    "build_loader": "mmkit.data.loaders",
    "Preprocessing": "mmkit.data.preprocessing",
    "DistributedBatchSampler": "mmkit.data.sampler",
    "HFImageTextDataset": "mmkit.data.sources.hf",
    "ManifestDataset": "mmkit.data.sources.manifest",
    "SyntheticShapes": "mmkit.data.sources.synthetic",
    "WebDatasetShards": "mmkit.data.sources.shards",
    "TaskStreamDataModule": "mmkit.data.task_stream",
    "TeacherEmbeddings": "mmkit.data.teacher_embeddings",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from mmkit.data.bad_samples import BadDataError, BadSampleTracker
    from mmkit.data.collate import ImageTextCollate
    from mmkit.data.datamodule import ImageTextDataModule
    from mmkit.data.loaders import build_loader
    from mmkit.data.preprocessing import Preprocessing
    from mmkit.data.sample import BadSample
    from mmkit.data.sampler import DistributedBatchSampler
    from mmkit.data.sources import HFImageTextDataset, ManifestDataset, SyntheticShapes, WebDatasetShards
    from mmkit.data.task_stream import TaskStreamDataModule
    from mmkit.data.teacher_embeddings import TeacherEmbeddings


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmkit.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
