"""The shipped FSDP2 recipe (recipes/clip_fsdp.yaml, ``strategy: fsdp2``) run by ``mmkit fit`` on 2 CPU
processes (gloo), changed only by command-line overrides (CPU, fp32, a tiny model): it trains to
the weights of the same recipe on one process with the double batch and evaluates (retrieval, zero-shot) to its numbers, writes a sharded checkpoint
folder (one shard per rank), and ``mmkit export`` turns that folder into exactly the weights
exported at the end of fit; `--ckpt_path last` finds such a folder (and skips an unfinished one)
and resumes from it."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARCH = str(ROOT / "tests" / "models" / "tiny_test_arch.json")
WORLD, PER_RANK = 2, 4


def _fit(out: Path, devices: int, batch: int, strategy: str, *extra: str) -> str:
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(out / "ckpt"), "save_last": True}},
                 {"class_path": "mmkit.callbacks.RunReport", "init_args": {"examples": 8}}]
    cmd = [
        sys.executable, "-m", "mmkit.cli", "fit", "--config", "recipes/clip_fsdp.yaml",
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.strategy", strategy,
        "--trainer.precision", "32-true",
        "--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                                        "init_args": {"save_dir": str(out), "name": "", "version": ""}}),
        "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "2",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(out),
        "--trainer.callbacks", json.dumps(callbacks),
        "--model.init_args.model.init_args.arch", ARCH,
        "--model.init_args.warmup_steps", "1", "--model.init_args.grad_clip_norm", "0.5",
        "--model.init_args.export_dir", str(out / "export"),
        "--data.init_args.train", "{class_path: mmkit.data.SyntheticShapes, init_args: {size: 64, seed: 0, image_size: 16}}",
        "--data.init_args.val", "{class_path: mmkit.data.SyntheticShapes, init_args: {size: 16, seed: 1, image_size: 16}}",
        "--data.init_args.eval_batch_size", "4", "--model.init_args.zero_shot_classes", "[circle, square, triangle, cross, star]",
        "--data.init_args.batch_size", str(batch), "--data.init_args.num_workers", "0",
        "--data.init_args.persistent_workers", "false", "--data.init_args.pin_memory", "false",
        "--data.init_args.train_augment", "false", "--test_after_fit", "false",
        *(extra or ("--trainer.max_steps", "2")),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(cmd, timeout=900, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def _exported(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "open_clip_model.safetensors"))


def _val_metrics(out: Path) -> dict[str, float]:
    with (out / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


def test_fsdp2_recipe_on_two_processes_matches_one_process_and_exports_its_sharded_checkpoint(tmp_path):
    _fit(tmp_path / "fsdp", WORLD, PER_RANK, "fsdp2")
    _fit(tmp_path / "ref", 1, WORLD * PER_RANK, "auto")

    fsdp, ref = _exported(tmp_path / "fsdp" / "export"), _exported(tmp_path / "ref" / "export")
    assert set(fsdp) == set(ref)
    for name, value in ref.items():
        assert torch.allclose(fsdp[name], value, rtol=0, atol=2e-5), name
    # Trained, not just equal at init: the temperature moved off CLIP's initial log(1/0.07).
    assert abs(float(fsdp["logit_scale"]) - math.log(1 / 0.07)) > 1e-6

    # Evaluation under FSDP2, zero-shot included (its classifier is built outside any forward, with the
    # root's weights gathered), gives the one-process numbers.
    fsdp_val, ref_val = _val_metrics(tmp_path / "fsdp"), _val_metrics(tmp_path / "ref")
    assert "val/zeroshot_top1" in ref_val and set(fsdp_val) == set(ref_val)
    for name, value in ref_val.items():
        assert math.isclose(fsdp_val[name], value, rel_tol=1e-4, abs_tol=1e-5), (name, fsdp_val[name], value)

    # The run report: one process draws its pictures; under FSDP2 a forward on rank 0 alone would
    # wait for the other rank, so they are left out (with a note) and the run ends by itself.
    assert (tmp_path / "ref" / "report" / "similarity.png").is_file()
    fsdp_report = (tmp_path / "fsdp" / "report" / "report.md").read_text()
    assert "No example pictures: the parameters are sharded" in fsdp_report and "## Curves" in fsdp_report
    assert not (tmp_path / "fsdp" / "report" / "similarity.png").exists()

    # A torch.distributed.checkpoint folder with one shard per rank, not a single file.
    ckpt = tmp_path / "fsdp" / "ckpt" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()
    assert len(list(ckpt.glob("*.distcp"))) == WORLD

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("model:\n  class_path: mmkit.CLIPPretrain\n  init_args:\n"
                      f"    model: {{class_path: mmkit.models.OpenCLIP, init_args: {{arch: {ARCH}}}}}\n")
    from mmkit.cli import main

    main(["export", "--config", str(recipe), "--ckpt_path", str(ckpt), "--out", str(tmp_path / "from_ckpt")])
    from_ckpt = _exported(tmp_path / "from_ckpt")
    assert set(from_ckpt) == set(fsdp)
    for name, value in from_ckpt.items():
        assert torch.equal(value, fsdp[name]), name


    # `--ckpt_path last` takes finished sharded folders and names an unfinished one; a resumed run
    # continues from step 2.
    from mmkit.checkpoint_io import check_resumable, find_resumable_checkpoint

    found, skipped = find_resumable_checkpoint([ckpt.parent], recursive=False)
    assert found is not None and found.is_dir() and check_resumable(found)["global_step"] == 2 and not skipped
    broken = ckpt.parent / "zzz-unfinished.ckpt"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"partial")
    found, skipped = find_resumable_checkpoint([ckpt.parent], recursive=False)
    assert found is not None and found != broken
    assert [p for p, _ in skipped] == [broken] and "incomplete" in skipped[0][1]
    broken.rename(tmp_path / "unfinished.ckpt")

    out = _fit(tmp_path / "fsdp", WORLD, PER_RANK, "fsdp2", "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert "--ckpt_path last: resuming from" in out
    assert check_resumable(ckpt)["global_step"] == 3
