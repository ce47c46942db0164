"""mmkit: image–text alignment training on Lightning, from one CPU to GPU clusters."""

__version__ = "0.1.0"
__all__ = ["CLIPPretrain", "__version__"]


def __getattr__(name: str):
    # Lazy: `import mmkit.losses` (e.g. in a spawned worker) should not pay for Lightning.
    if name == "CLIPPretrain":
        from mmkit.modules import CLIPPretrain

        return CLIPPretrain
    raise AttributeError(f"module 'mmkit' has no attribute {name!r}")
