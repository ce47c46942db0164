"""A local weights file that is recognisably one of open_clip's published checkpoints must be
paired with the activation it was trained with (OpenAI's: QuickGELU), or the spec refuses it."""

import hashlib

import open_clip
import pytest
import torch

from mmkit.models import OpenCLIP
from mmkit.models.pretrained_weights import identify


def _in_hub_cache(tmp_path, repo: str):
    """A file where huggingface_hub puts a repo's weights (contents do not matter: only the
    path is read)."""
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    path = snapshot / "open_clip_pytorch_model.bin"
    path.write_bytes(b"not read")
    return str(path)


def test_openai_weights_from_the_hub_cache_need_quickgelu(tmp_path):
    weights = _in_hub_cache(tmp_path, "timm/vit_base_patch32_clip_224.openai")
    with pytest.raises(ValueError, match=r"'openai' weights, trained with QuickGELU.*use arch='ViT-B-32-quickgelu'"):
        OpenCLIP("ViT-B-32", pretrained=weights)
    OpenCLIP("ViT-B-32-quickgelu", pretrained=weights)  # the matching pair is accepted


def test_gelu_weights_refuse_a_quickgelu_arch(tmp_path):
    weights = _in_hub_cache(tmp_path, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert identify("ViT-B-32", weights) == ("laion2b_s34b_b79k", False)
    with pytest.raises(ValueError, match=r"trained with GELU.*use arch='ViT-B-32'"):
        OpenCLIP("ViT-B-32-quickgelu", pretrained=weights)
    OpenCLIP("ViT-B-32", pretrained=weights)


def test_openais_original_torchscript_file_is_recognised_by_its_sha256(tmp_path, monkeypatch):
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    # A stand-in for OpenAI's file: open_clip's 'openai' entry pointing at this file's hash.
    entry = dict(open_clip.pretrained._PRETRAINED["ViT-B-32"]["openai"], url=f"https://example.invalid/{sha}/ViT-B-32.pt")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED["ViT-B-32"], "openai", entry)
    assert identify("ViT-B-32", str(path)) == ("openai", True)
    with pytest.raises(ValueError, match="QuickGELU"):
        OpenCLIP("ViT-B-32", pretrained=str(path))


def test_an_unrecognised_file_is_left_to_the_user(tmp_path):
    path = tmp_path / "my_weights.pt"
    torch.save({"w": torch.zeros(1)}, path)
    assert identify("ViT-B-32", str(path)) is None
    OpenCLIP("ViT-B-32", pretrained=str(path))
