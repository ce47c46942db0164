"""mmkit: image–text alignment training on Lightning, from one CPU to GPU clusters."""

import importlib

__version__ = "0.1.0"

# The five techniques, imported on first use: `import mmkit.losses` (e.g. in a spawned worker)
# should not pay for Lightning.
_MODULES = {
    "CLIPPretrain": "mmkit.techniques.clip_pretrain",
    "MetricAlign": "mmkit.techniques.metric_align",
    "AlignGAN": "mmkit.techniques.align_gan",
    "EWCIncremental": "mmkit.techniques.ewc_incremental",
    "KDStudent": "mmkit.techniques.kd_student",
}
__all__ = [*_MODULES, "__version__"]


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module 'mmkit' has no attribute {name!r}")
