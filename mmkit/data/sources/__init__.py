"""Image–text sources. Each yields sample dicts or BadSample markers (see mmkit.data.sample)."""

from mmkit.data.sources.hf import HFImageTextDataset
from mmkit.data.sources.manifest import ManifestDataset
from mmkit.data.sources.shards import WebDatasetShards
from mmkit.data.sources.synthetic import SyntheticShapes

__all__ = ["HFImageTextDataset", "ManifestDataset", "SyntheticShapes", "WebDatasetShards"]
