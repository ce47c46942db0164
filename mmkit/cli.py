"""``mmkit fit|validate|test|predict --config recipes/....yaml`` and ``mmkit export``.

A LightningCLI over every mmkit module and data module: the recipe YAML names classes by
``class_path`` and ``--print_config`` shows every knob. Run-time values never go in YAML: the
model's transforms and tokenizer are linked into the data module when both are instantiated.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Offline by construction: nothing may be fetched from a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from mmkit.callbacks.bad_samples import BadSampleCallback  # noqa: E402
from mmkit.callbacks.embedding_writer import EmbeddingWriter  # noqa: E402
from mmkit.callbacks.resume_state import ResumeState  # noqa: E402
from mmkit.callbacks.throughput import Throughput  # noqa: E402
from mmkit.checkpoint_io import load_checkpoint, resolve_ckpt_path  # noqa: E402
from mmkit.data.datamodule import ImageTextDataModule  # noqa: E402
from mmkit.modules.base import DualEncoderModule  # noqa: E402
from mmkit.strategies import FSDP2Strategy  # noqa: E402,F401  (registers `strategy: fsdp2`)


class MMKitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            "model", "data.init_args.preprocessing", compute_fn=lambda m: m.preprocessing, apply_on="instantiate"
        )
        # Always-on callbacks, configurable under their own keys in the recipe.
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(BadSampleCallback, "bad_samples")
        parser.add_lightning_class_args(ResumeState, "resume_state")  # RNG states in checkpoints: exact resume
        parser.add_argument("--test_after_fit", type=bool, default=True, help="run `test` after `fit` when the data has a test split")
        parser.set_defaults({"trainer.use_distributed_sampler": False})

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Lightning reads a given checkpoint's hyperparameters right after parsing: check the file
        # first, so that a truncated or corrupt one fails with its name, not a bare unpickling error.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            load_checkpoint(ckpt_path, mmap=True)

    def before_fit(self) -> None:
        # `--ckpt_path last`: the newest checkpoint that loads, skipping (and naming) broken ones;
        # an explicit path is checked now, so a broken file fails with its name before training.
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = resolve_ckpt_path(config.get("ckpt_path"), self.trainer)

    def after_fit(self) -> None:
        # A finished fit makes SLURM preemption checkpoints stale; left in place, Lightning would
        # load them for the test below and for any rerun of the job script.
        if self.trainer.is_global_zero:
            remove_hpc_checkpoints(self.trainer.default_root_dir)
        self.trainer.strategy.barrier("mmkit_after_fit")
        dm = self.datamodule
        if self._get(self.config, "test_after_fit") and getattr(dm, "test", None) is not None:
            self.trainer.test(self.model, datamodule=dm)

    def before_predict(self) -> None:
        if not any(isinstance(c, EmbeddingWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(EmbeddingWriter())


def remove_hpc_checkpoints(root: str | Path) -> list[Path]:
    removed = sorted(Path(root).glob("hpc_ckpt_*.ckpt"))
    for path in removed:
        path.unlink()
        print(f"mmkit: fit finished; removed the preemption checkpoint {path}")
    return removed


def export(argv: list[str]) -> None:
    """``mmkit export --config RECIPE --ckpt_path CKPT --out DIR [--model.… overrides]``: write a
    checkpoint's model in its native loadable format (open_clip local-dir or transformers
    folders). Only the recipe's ``model`` section is used: no data needs to exist."""
    import argparse

    import yaml
    from jsonargparse import ArgumentParser

    ap = argparse.ArgumentParser(prog="mmkit export", description=export.__doc__)
    ap.add_argument("--config", required=True, action="append", help="recipe YAML (repeatable, merged in order)")
    ap.add_argument("--ckpt_path", required=True)
    ap.add_argument("--out", required=True)
    args, overrides = ap.parse_known_args(argv)
    model_cfg: dict = {}
    for path in args.config:
        section = (yaml.safe_load(Path(path).read_text()) or {}).get("model") or {}
        if section.get("class_path") not in (None, model_cfg.get("class_path")):
            model_cfg = {}
        model_cfg = _merge(model_cfg, section)
    parser = ArgumentParser(prog="mmkit export")
    parser.add_subclass_arguments(DualEncoderModule, "model", required=True)
    cfg = parser.parse_args(["--model", json.dumps(model_cfg), *overrides])
    module = parser.instantiate_classes(cfg).model
    module.configure_model()
    module.load_state_dict(_checkpoint_state_dict(args.ckpt_path))
    out = module.model.export(Path(args.out))
    print(f"mmkit: exported {args.ckpt_path} to {out}")


def _checkpoint_state_dict(path: str) -> dict:
    """The module state dict of a Lightning ``.ckpt`` file, or of a sharded checkpoint directory
    (DeepSpeed's, or FSDP2's ``torch.distributed.checkpoint`` folder), merged to full weights in memory."""
    from mmkit.modules.deepspeed_support import consolidated_state_dict
    from mmkit.sharded_checkpoint import distributed_checkpoint_state_dict, is_deepspeed_checkpoint, is_distributed_checkpoint

    if is_deepspeed_checkpoint(path):
        return consolidated_state_dict(path)
    if is_distributed_checkpoint(path):
        return distributed_checkpoint_state_dict(path)
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_cli(argv: list[str] | None = None) -> MMKitCLI:
    """Run ``mmkit fit|validate|test|predict ...`` and return the CLI (its model, trainer, ...)."""
    return MMKitCLI(
        DualEncoderModule,
        ImageTextDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=argv,  # None: LightningCLI reads sys.argv itself (and does not warn)
    )


def main(argv: list[str] | None = None) -> None:
    words = list(sys.argv[1:] if argv is None else argv)
    from mmkit.modules.deepspeed_support import import_quietly_if_named

    import_quietly_if_named(words)  # keeps DeepSpeed's log lines out of stdout (--print_config)
    if words and words[0] == "export":
        export(words[1:])
        return
    run_cli(argv)


if __name__ == "__main__":
    main()
