"""The ``compile`` setting of the techniques: off, on with torch's defaults, or torch.compile's options."""

from __future__ import annotations

# torch.compile's keyword arguments that make sense for the towers (not ``model``).
COMPILE_KEYS = ("mode", "dynamic", "fullgraph", "backend", "options")


def compile_options(value: bool | dict | None, owner: str = "compile") -> dict | None:
    """The keyword arguments for ``torch.compile`` that ``value`` asks for; None when it is off.

    ``value`` is ``False``/``None`` (off), ``True`` (torch's defaults: inductor, default mode) or a
    dict of ``torch.compile`` options, e.g. ``{mode: max-autotune-no-cudagraphs, dynamic: false}``.
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{owner}: expected false, true or a dict of torch.compile options, got {value!r}")
    unknown = sorted(set(value) - set(COMPILE_KEYS))
    if unknown:
        raise ValueError(f"{owner}: unknown torch.compile option(s) {unknown}; expected some of {list(COMPILE_KEYS)}")
    return dict(value)
