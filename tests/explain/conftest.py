import pytest
import torch

from mmkit.data.sources.synthetic import SyntheticShapes
from mmkit.models.spec import OpenCLIP


@pytest.fixture
def tiny(tiny_arch):
    """A 1-layer open_clip model (16 px, 2×2 patches) with random weights, in eval mode, and its preprocessing."""
    torch.manual_seed(0)
    spec = OpenCLIP(arch=tiny_arch)
    return spec.build().eval(), spec.preprocessing


@pytest.fixture
def tiny_batch(tiny):
    _, pre = tiny
    ds = SyntheticShapes(size=4, seed=3, image_size=16)
    images = torch.stack([pre.image_transform(False)(ds[i]["image"]) for i in range(4)])
    texts = pre.tokenize([ds[i]["caption"] for i in range(4)])
    return images, texts
