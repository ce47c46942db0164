"""The model ``mmkit explain`` explains: an export folder (``local-dir:DIR``) or any open_clip
architecture mmkit builds, or an mmkit module checkpoint with the recipe it was trained with
(built the way ``mmkit export`` builds it: only the recipe's ``model`` section is read)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmkit.distributed import device_from_flag
from mmkit.models.dual_encoder import DualEncoder

HF_EXPORT_MARKER = "mmkit_dual_encoder.json"  # what HFDualEncoder.export writes beside vision/ and text/


@dataclass
class ExplainableModel:
    model: DualEncoder
    preprocessing: object  # mmkit.data.preprocessing.Preprocessing: image_transform(train), tokenize
    project: Callable[[dict], dict] | None = None  # the mmkit module's projection hook, if any

    @property
    def tokenizer(self):
        return getattr(self.preprocessing, "_tokenizer", None)

    @property
    def pixel_stats(self) -> tuple[tuple, tuple] | None:
        cfg = getattr(self.model, "preprocess_cfg", None) or {}
        if "mean" in cfg and "std" in cfg:
            return tuple(cfg["mean"]), tuple(cfg["std"])
        mean, std = getattr(self.preprocessing, "mean", None), getattr(self.preprocessing, "std", None)  # HFPreprocessing
        return (tuple(mean), tuple(std)) if mean is not None and std is not None else None


def load_model(model: str | None = None, configs: Sequence[str] = (), ckpt_path: str | None = None,
               overrides: Sequence[str] = (), device: str = "cpu") -> ExplainableModel:
    """``model``: ``local-dir:DIR`` (an ``mmkit export`` folder: open_clip, or ``HFTowers``
    with ``mmkit_dual_encoder.json``) or an open_clip architecture name (random weights: a sanity-check baseline); or ``configs`` (recipe YAMLs, merged in
    order) with ``ckpt_path`` (a module checkpoint) and ``--model.…`` overrides."""
    if (model is None) == (ckpt_path is None):
        raise ValueError("give either --model (local-dir:DIR or an open_clip architecture) or --config RECIPE with --ckpt_path CKPT")
    if model is not None and model.startswith("local-dir:") and (Path(model[len("local-dir:"):]) / HF_EXPORT_MARKER).is_file():
        from mmkit.models.hf_model import load_hf_export

        loaded = ExplainableModel(*load_hf_export(model[len("local-dir:"):]))
    elif model is not None:
        from mmkit.models.spec import OpenCLIP

        spec = OpenCLIP(arch=model)
        loaded = ExplainableModel(spec.build(), spec.preprocessing)
    else:
        if not configs:
            raise ValueError("--ckpt_path needs --config RECIPE (the recipe the checkpoint was trained with)")
        if not Path(ckpt_path).exists():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint")
        from mmkit.cli import module_from_checkpoint

        module = module_from_checkpoint(list(configs), ckpt_path, list(overrides), "mmkit explain")
        loaded = ExplainableModel(module.model, module.preprocessing, module.project)
    loaded.model.to(device_from_flag(device)).eval()
    return loaded
