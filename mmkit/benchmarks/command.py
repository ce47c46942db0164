"""``mmkit benchmark``: score any model on a list of benchmarks without training, like
CLIP_benchmark, and write ``results.json`` and ``results.md``.

``--model`` is one of:

- an mmkit checkpoint (a Lightning ``.ckpt`` file or a sharded checkpoint folder) with its recipe
  (``--config``; default: the ``config.yaml`` of the run folder the checkpoint is in);
- an export folder (``mmkit export`` or the end of a fit): open_clip ``local-dir`` or HFTowers;
- a recipe YAML: its model as the recipe builds it (e.g. from its ``pretrained`` weights);
- an open_clip architecture (``ViT-B-32``, an mmkit preset, a config ``.json``) with
  ``--pretrained`` weights, as ``mmkit.models.OpenCLIP`` accepts them.

Launched by ``torchrun --nproc_per_node N`` (or any launcher that sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), each process takes a share of every benchmark
(NCCL on GPUs, gloo on CPUs) and rank 0 writes the results, which equal one process's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from mmkit import distributed as D
from mmkit.benchmarks.encoding import BenchmarkEncoder
from mmkit.benchmarks.results import markdown, write_results
from mmkit.benchmarks.suite import load_benchmarks, run_benchmarks

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _is_checkpoint(path: Path) -> bool:
    from mmkit.parallel.sharded_checkpoint import (
        is_deepspeed_checkpoint,
        is_distributed_checkpoint,
    )

    return (path.is_file() and path.suffix == ".ckpt") or (path.is_dir() and (
        is_deepspeed_checkpoint(str(path)) or is_distributed_checkpoint(str(path))))


def _run_config(ckpt: Path) -> str:
    """The ``config.yaml`` a fit saved in the run folder that holds ``ckpt`` (``<run>/checkpoints/x.ckpt``)."""
    for folder in (ckpt.parent, ckpt.parent.parent, ckpt.parent.parent.parent):
        if (folder / "config.yaml").is_file():
            return str(folder / "config.yaml")
    raise FileNotFoundError(
        f"--model {ckpt}: no config.yaml in the run folder around it; give the recipe it was trained with as --config"
    )


def load_encoder(model: str, pretrained: str | None, configs: list[str], overrides: list[str],
                 device: torch.device) -> BenchmarkEncoder:
    """A ``BenchmarkEncoder`` for any of the ``--model`` forms (see the module docstring)."""
    from mmkit.cli import module_from_checkpoint

    path = Path(model)
    if path.suffix in (".ckpt", ".yaml", ".yml") and not path.exists():
        raise FileNotFoundError(f"--model {model}: no such file")
    if pretrained is not None and (path.suffix in (".ckpt", ".yaml", ".yml") or path.is_dir()):
        raise ValueError(f"--pretrained is for an open_clip architecture; --model {model} carries its own weights")
    if configs and not _is_checkpoint(path):
        raise ValueError(f"--config is the recipe of a checkpoint; --model {model} is not an mmkit checkpoint")
    if _is_checkpoint(path):
        module = module_from_checkpoint(configs or [_run_config(path)], str(path), overrides, "mmkit benchmark")
        return BenchmarkEncoder(module.to(device), module.preprocessing, device)
    if overrides:
        raise ValueError(f"unrecognized arguments: {' '.join(overrides)} (--model.… overrides go with a checkpoint)")
    if path.suffix in (".yaml", ".yml"):
        module = module_from_checkpoint([str(path)], None, [], "mmkit benchmark")
        return BenchmarkEncoder(module.to(device), module.preprocessing, device)
    if path.is_dir() and (path / "mmkit_dual_encoder.json").is_file():
        from mmkit.models.hf_model import load_hf_export

        hf_model, preprocessing = load_hf_export(path)
        return BenchmarkEncoder(hf_model.to(device), preprocessing, device)
    from mmkit.models.spec import OpenCLIP

    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"--model {model}: a folder that is neither a checkpoint nor an export (no open_clip_config.json "
                "or mmkit_dual_encoder.json in it)")
        spec = OpenCLIP(arch=f"local-dir:{path}")
    else:
        if _random_weights(model, pretrained):
            warnings.warn(f"mmkit benchmark: --model {model} without --pretrained scores randomly initialised "
                          "weights (give --pretrained TAG or FILE, or a checkpoint or export as --model)", stacklevel=2)
        spec = OpenCLIP(arch=model, pretrained=pretrained)
    return BenchmarkEncoder(spec.build().to(device), spec.preprocessing, device)


def _random_weights(model: str, pretrained: str | None) -> bool:
    # An open_clip architecture with no weights named; hf-hub: models bring their own.
    path = Path(model)
    return (pretrained is None and not model.startswith("hf-hub:") and path.suffix not in (".ckpt", ".yaml", ".yml")
            and not path.is_dir())


@contextlib.contextmanager
def _process_group(device_kind: str):
    """The launcher's process group (``WORLD_SIZE`` > 1 and none yet), torn down afterwards."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def benchmark(argv: list[str]) -> dict:
    """``mmkit benchmark --model M --benchmarks FILE --out DIR``; returns the results."""
    ap = argparse.ArgumentParser(prog="mmkit benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint, export folder, recipe YAML or open_clip architecture")
    ap.add_argument("--pretrained", default=None, help="with an open_clip architecture: its weights, as OpenCLIP's pretrained")
    ap.add_argument("--config", action="append", default=[], help="with a checkpoint: the recipe (repeatable, merged in order)")
    ap.add_argument("--benchmarks", required=True, help="the benchmarks YAML (see mmkit.benchmarks.suite)")
    ap.add_argument("--out", required=True, help="folder for results.json and results.md")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="32", choices=list(PRECISIONS), help="autocast the forward passes (CUDA)")
    args, overrides = ap.parse_known_args(argv)
    benchmarks = load_benchmarks(args.benchmarks)  # a bad file fails before a model is built
    device = D.device_from_flag(args.device)
    if PRECISIONS[args.precision] is not None and device.type != "cuda":
        raise ValueError(f"--precision {args.precision} needs --device cuda (on CPU the benchmark runs in float32)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with _process_group(device.type):
        encoder = load_encoder(args.model, args.pretrained, args.config, overrides, device)
        if PRECISIONS[args.precision] is not None:
            encoder.context = lambda: torch.autocast("cuda", dtype=PRECISIONS[args.precision])
        results = run_benchmarks(benchmarks, encoder)
        name = args.model + (f" (pretrained {args.pretrained})" if args.pretrained else "")
        if _random_weights(args.model, args.pretrained):
            name += " (random weights)"
        if not dist.is_initialized() or dist.get_rank() == 0:
            json_path, _ = write_results(results, args.out, name)
            print(markdown(results, name))
            print(f"mmkit: benchmark results in {json_path.parent}", flush=True)
    return results
