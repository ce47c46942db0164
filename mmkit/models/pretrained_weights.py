"""Which of open_clip's published weights a local file holds, where that can be told.

open_clip checks that an architecture's activation matches its weights (OpenAI's CLIPs were
trained with QuickGELU, most LAION ones with GELU) only when it is given a pretrained tag; a
local file loads into either without a word, and the model is then silently wrong. Two kinds of
file can be recognised: one inside a Hugging Face cache folder of a tag's hub repository
(``models--timm--vit_base_patch32_clip_224.openai/snapshots/...``), and OpenAI's original
TorchScript file, whose sha256 is part of its download URL.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import open_clip

from mmkit.checksum import file_digest

QUICKGELU_SUFFIX = "-quickgelu"


def _tags(arch: str):
    """(tag, pretrained config) for ``arch`` and its QuickGELU / GELU sibling."""
    base = arch.removesuffix(QUICKGELU_SUFFIX)
    for name in (base, base + QUICKGELU_SUFFIX):
        for tag in open_clip.list_pretrained_tags_by_model(name):
            yield tag, open_clip.get_pretrained_cfg(name, tag)


def _is_torchscript(path: Path) -> bool:
    # A TorchScript archive is a zip with a `code/` folder; state-dict files have none.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


def identify(arch: str, path: str) -> tuple[str, bool] | None:
    """``(tag, trained with QuickGELU)`` of the open_clip weights of ``arch``'s family that
    ``path`` holds, or None when the file cannot be recognised."""
    where = str(Path(path).absolute())  # not resolved: a cache snapshot links into blobs/
    tags = list(_tags(arch))
    for tag, cfg in tags:
        hub = (cfg.get("hf_hub") or "").strip("/")
        if hub and f"models--{hub.replace('/', '--')}" in where:
            return tag, bool(cfg.get("quick_gelu"))
    hashes = {m.group(1): (tag, bool(cfg.get("quick_gelu")))
              for tag, cfg in tags if (m := re.search(r"/([0-9a-f]{64})/", cfg.get("url") or ""))}
    if hashes and _is_torchscript(Path(path)):  # hash only what may be OpenAI's original file
        return hashes.get(file_digest(path, "sha256"))
    return None


def check_activation(arch: str, arch_cfg: dict, path: str) -> None:
    """Raise when ``path`` holds weights trained with another activation than ``arch`` uses."""
    known = identify(arch, path)
    if known is not None:
        _check_pair(arch, arch_cfg, f"pretrained={path!r} holds open_clip's {{base}} '{known[0]}' weights", known[1])


def check_tag_activation(arch: str, arch_cfg: dict, tag: str) -> None:
    """Raise when open_clip's ``tag`` weights of ``arch`` were trained with another activation
    than ``arch`` uses (open_clip itself only warns)."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    _check_pair(arch, arch_cfg, f"pretrained={tag!r} names open_clip's {{base}} '{tag}' weights", bool(cfg.get("quick_gelu")))


def _check_pair(arch: str, arch_cfg: dict, what: str, needs_quick_gelu: bool) -> None:
    if needs_quick_gelu == bool(arch_cfg.get("quick_gelu")):
        return
    base = arch.removesuffix(QUICKGELU_SUFFIX)
    fix = base + QUICKGELU_SUFFIX if needs_quick_gelu else base
    act = {True: "QuickGELU", False: "GELU"}
    raise ValueError(
        f"OpenCLIP: {what.format(base=base)}, trained with "
        f"{act[needs_quick_gelu]}, but arch={arch!r} uses {act[not needs_quick_gelu]}: use arch={fix!r}"
    )
