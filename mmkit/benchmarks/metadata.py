"""Class names and prompt templates of a zero-shot benchmark: by name from open_clip's built-in
metadata, from a file, or given as a list.

open_clip ships the metadata of one dataset, ImageNet-1k (``open_clip.zero_shot_metadata``): its
1000 class names in the standard label order (sorted WordNet ids, as an ImageFolder of
``train/n01440764/...`` numbers them) and two template sets, OpenAI's 80 and a 7-prompt subset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

Template = str | Callable[[str], str]


def _imagenet(attribute: str):
    from open_clip import zero_shot_metadata

    return getattr(zero_shot_metadata, attribute)


# name -> open_clip attribute; the imagenet names are the spellings CLIP_benchmark and open_clip use.
BUILTIN_CLASS_NAMES = {"imagenet1k": "IMAGENET_CLASSNAMES", "imagenet": "IMAGENET_CLASSNAMES"}
BUILTIN_TEMPLATES = {
    "openai_imagenet": "OPENAI_IMAGENET_TEMPLATES",
    "imagenet1k": "OPENAI_IMAGENET_TEMPLATES",
    "simple_imagenet": "SIMPLE_IMAGENET_TEMPLATES",
}


def _read_list(path: str, what: str) -> list:
    """A list from a ``.json`` file (a list, or an object ``{"0": name, "1": name, ...}`` keyed by
    label) or a text file (one entry per line, blank lines skipped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path!r}")
    if path.endswith(".json"):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(data, dict):
            try:
                keys = sorted(data, key=int)
            except ValueError:
                raise ValueError(f"{path}: a {what} object must be keyed by integer labels, got keys {list(data)[:5]}") from None
            if [int(k) for k in keys] != list(range(len(keys))):
                raise ValueError(f"{path}: {what} labels must be 0..{len(keys) - 1} without gaps, got {keys[:10]}")
            data = [data[k] for k in keys]
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"{path}: expected a JSON list of strings (or an object of label -> string) of {what}")
        return data
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").strip() for line in f if line.strip()]


def _builtin_file_or_list(value: str | Sequence, builtins: dict, what: str, where: str) -> list:
    """The list ``value`` names: one of open_clip's built-in sets, a .txt/.json file, or the list itself."""
    if not isinstance(value, str):
        return list(value)
    if value in builtins:
        return list(_imagenet(builtins[value]))
    if not os.path.exists(value):
        raise ValueError(
            f"{where}: {what}={value!r} is neither a built-in set ({', '.join(sorted(builtins))}) "
            "nor an existing .txt/.json file"
        )
    return _read_list(value, what.replace("_", " "))


def resolve_class_names(value: str | Sequence[str], where: str) -> list[str]:
    """Class names in label order from a built-in name (``imagenet1k``), a ``.txt``/``.json`` file
    or a list."""
    names = [str(n) for n in _builtin_file_or_list(value, BUILTIN_CLASS_NAMES, "class_names", where)]
    if not names:
        raise ValueError(f"{where}: class_names is empty")
    return names


def resolve_templates(value: str | Sequence[str], where: str) -> list[Template]:
    """Prompt templates from a built-in set (``openai_imagenet``, ``simple_imagenet``), a
    ``.txt``/``.json`` file or a list; each written template must contain ``{}`` (the class name)."""
    templates = _builtin_file_or_list(value, BUILTIN_TEMPLATES, "templates", where)
    if not templates:
        raise ValueError(f"{where}: templates is empty")
    bad = [t for t in templates if isinstance(t, str) and "{}" not in t]
    if bad:
        raise ValueError(f"{where}: every template needs '{{}}' where the class name goes; these have none: {bad[:5]}")
    return templates


def prompt(template: Template, class_name: str) -> str:
    return template(class_name) if callable(template) else template.format(class_name)
