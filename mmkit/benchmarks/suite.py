"""A list of benchmarks from YAML, run on one model, and the flat metric names they log under.

The YAML (a file, or the same list inline in a recipe)::

    benchmarks:
      - {task: zeroshot_classification, name: imagenet1k, images: /data/imagenet/val,
         class_names: imagenet1k, templates: openai_imagenet}
      - {task: retrieval, name: flickr30k, karpathy: /data/flickr30k/dataset_flickr30k.json,
         image_root: /data/flickr30k/images, split: test}

Every other key of an entry is an argument of the task's class (``ZeroShotClassification``,
``Retrieval``). Relative paths are read from the working directory, like a recipe's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from mmkit.benchmarks.encoding import BenchmarkEncoder
from mmkit.benchmarks.tasks import Benchmark, Retrieval, ZeroShotClassification

TASKS: dict[str, type[Benchmark]] = {
    "zeroshot_classification": ZeroShotClassification,
    "zeroshot": ZeroShotClassification,
    "retrieval": Retrieval,
}


def load_benchmarks(spec: str | list[dict[str, Any]]) -> list[Benchmark]:
    """Benchmarks from a YAML file (a list, or an object with a ``benchmarks`` list) or a list of entries."""
    where = "benchmarks"
    if isinstance(spec, (str, os.PathLike)):
        where = str(spec)
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"benchmarks file not found: {where!r}")
        spec = yaml.safe_load(Path(spec).read_text(encoding="utf-8"))
        if isinstance(spec, dict):
            spec = spec.get("benchmarks")
    if not isinstance(spec, list) or not spec:
        raise ValueError(f"{where}: expected a non-empty list of benchmarks (under the key 'benchmarks' in a file)")
    out: list[Benchmark] = []
    for i, entry in enumerate(spec):
        if isinstance(entry, Benchmark):
            out.append(entry)
            continue
        if not isinstance(entry, dict) or "task" not in entry:
            raise ValueError(f"{where}: benchmark #{i + 1} needs a 'task' ({', '.join(TASKS)}), got {entry!r}")
        settings = dict(entry)
        task = settings.pop("task")
        if task not in TASKS:
            raise ValueError(f"{where}: benchmark #{i + 1} has task {task!r}; tasks: {', '.join(TASKS)}")
        try:
            out.append(TASKS[task](**settings))
        except TypeError as e:  # an unknown key: name it with the benchmark
            raise TypeError(f"{where}: benchmark #{i + 1} ({settings.get('name')!r}, {task}): {e}") from None
    names = [b.name for b in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: benchmark names must be unique; repeated: {repeated}")
    return out


def run_benchmarks(benchmarks: list[Benchmark], encoder: BenchmarkEncoder) -> dict[str, dict[str, Any]]:
    """``{name: {task, size, metrics}}`` for each benchmark, in order; the same on every rank
    (every rank must call it)."""
    return {
        b.name: {"task": b.task, "size": b.size(), "metrics": b.evaluate(encoder)}
        for b in benchmarks
    }


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``<task>/<name>/<metric>`` -> value (``zeroshot/imagenet1k/top1``, ``retrieval/coco/i2t_R@1``)."""
    return {f"{r['task']}/{name}/{metric}": value
            for name, r in results.items() for metric, value in r["metrics"].items()}
