"""Every shipped recipe runs: the installed `mmkit` command (or the launcher its header names) with
the overrides the header documents, made short and small for the test budget. A recipe that only
parses can still fail the moment a user starts it (a launch line that does not match the trainer
settings, weights that need another activation, an overlay that does not merge)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from user_runs import MMKIT, RECIPES, REPO, run_to_exit

pytestmark = pytest.mark.slow

# Where the recipes not run in this file are run as users run them (same overrides rule).
RUN_ELSEWHERE = {
    "default.yaml": "tests/e2e/test_default_recipe.py",
    "align_gan.yaml": "tests/techniques/test_align_gan.py",
    "metric_align.yaml": "tests/techniques/test_metric_align.py",
    "kd_student.yaml": "tests/techniques/test_kd_student.py",
    "ewc_incremental.yaml": "tests/techniques/test_ewc_incremental.py",
    "clip_fsdp.yaml": "tests/techniques/test_fsdp_recipe.py",
    "clip_deepspeed_zero2.yaml": "tests/techniques/test_deepspeed.py",
    "clip_deepspeed_zero3.yaml": "tests/techniques/test_deepspeed.py",
}
RUN_HERE = {"siglip.yaml", "lit_minilm.yaml", "csv_finetune.yaml", "webdataset_vitb32_ddp.yaml", "own_data.yaml"}

# Short and small (the test budget): a few steps, small evaluation splits, small batches.
SHORT = ["--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false"]


def test_every_shipped_recipe_is_run_by_a_test():
    shipped = {p.name for p in RECIPES.glob("*.yaml")}
    assert shipped == set(RUN_ELSEWHERE) | RUN_HERE
    for recipe, test_file in RUN_ELSEWHERE.items():
        assert recipe in (REPO / test_file).read_text(), f"{test_file} does not run recipes/{recipe}"


def test_siglip_overlay_runs_after_the_default_recipe(tmp_path):
    run_to_exit([MMKIT, "fit", "--config", str(RECIPES / "default.yaml"), "--config", str(RECIPES / "siglip.yaml"), *SHORT,
                 "--trainer.val_check_interval", "3", "--data.init_args.batch_size", "32",
                 "--data.init_args.val.init_args.size", "64", "--data.init_args.test.init_args.size", "64"],
                cwd=tmp_path, timeout=300)
    run = tmp_path / "runs" / "siglip"
    metrics = (run / "metrics.csv").read_text()
    assert "train/sigmoid_loss" in metrics and "test/i2t_R@1" in metrics
    config = json.loads((run / "export" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32  # the demo's size, merged under the overlay
    assert "init_logit_bias" in config["model_cfg"]  # SigLIP's learnable bias is part of the export


def test_lit_minilm_trains_the_image_tower_into_minilms_space(tmp_path):
    run_to_exit([MMKIT, "fit", "--config", str(RECIPES / "lit_minilm.yaml"), *SHORT,
                 "--trainer.val_check_interval", "3", "--data.init_args.batch_size", "16",
                 "--data.init_args.val.init_args.size", "32"],
                cwd=tmp_path, timeout=300)
    run = tmp_path / "runs" / "lit_minilm"
    assert (run / "export" / "open_clip_config.json").is_file()
    assert (run / "report" / "metrics.json").is_file() and (run / "metrics.csv").is_file()


def _write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    colors = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (200, 200, 30)]
    names = []
    for i in range(n):
        Image.new("RGB", (48 + 8 * i, 40), colors[i % 4]).save(folder / f"{i}.jpg")
        names.append(f"{i}.jpg")
    return names


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_csv_finetune_with_openai_weights_as_its_header_shows(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from hub_cache import add_to_hub_cache

    images = _write_images(tmp_path / "data" / "img", 8)
    for split in ("train", "val"):
        _write_csv(tmp_path / "data" / f"{split}.csv",
                   [{"image": f"img/{name}", "caption": f"a photo number {i}"} for i, name in enumerate(images)])
    # The offline cluster of the header: a Hugging Face cache holding the `openai` tag's hub repo, here
    # with a stand-in for OpenAI's ViT-B/32 weights (same architecture and format, random values).
    repo = open_clip.get_pretrained_cfg("ViT-B-32-quickgelu", "openai")["hf_hub"].strip("/")
    weights = tmp_path / "ViT-B-32-openai.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model("ViT-B-32-quickgelu").state_dict().items()}, str(weights))
    add_to_hub_cache(tmp_path / "hf" / "hub", repo, {"open_clip_model.safetensors": weights}, move=True)
    run_to_exit([MMKIT, "fit", "--config", str(RECIPES / "csv_finetune.yaml"),
                 "--data.init_args.train.init_args.path", "data/train.csv", "--data.init_args.val.init_args.path", "data/val.csv",
                 *SHORT, "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
                 # bf16 autocast of a ViT-B/32 step takes ~80 s on a CPU without bf16 units (fp32: 2 s)
                 "--trainer.precision", "32-true"],
                cwd=tmp_path, timeout=600, env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    run = tmp_path / "runs" / "csv_finetune"
    assert any(run.rglob("last.ckpt")) and (run / "export" / "open_clip_model.safetensors").is_file()
    config = json.loads((run / "export" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["quick_gelu"] is True


def test_own_data_recipe_with_its_placeholders_filled(tmp_path):
    """As a user edits it: the CHANGE_ME manifest paths replaced by a folder of one's own, the run
    folder moved with its one knob. Only the length, batch size and workers are shortened."""
    shipped = (RECIPES / "own_data.yaml").read_text()
    assert shipped.count("path: CHANGE_ME/") == 2 and "SyntheticShapes" not in shipped
    images = _write_images(tmp_path / "my_data" / "img", 8)
    for split in ("train", "val"):
        _write_csv(tmp_path / "my_data" / f"{split}.csv",
                   [{"image": f"img/{name}", "caption": f"a photo of colour block {i}"} for i, name in enumerate(images)])
    recipe = tmp_path / "own_data.yaml"
    recipe.write_text(shipped.replace("CHANGE_ME/", "my_data/"))
    out = run_to_exit([MMKIT, "fit", "--config", str(recipe), *SHORT, "--trainer.default_root_dir", "runs/mine",
                       "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"],
                      cwd=tmp_path, timeout=400)
    assert "validation never runs" not in out
    run = tmp_path / "runs" / "mine"
    assert not (tmp_path / "runs" / "own_data").exists()  # the knob moved everything
    assert "val/i2t_R@1" in (run / "metrics.csv").read_text()  # validated at the end of epoch 1 (2 steps)
    assert (run / "report" / "metrics.json").is_file() and (run / "config.yaml").is_file()
    assert any((run / "checkpoints").glob("*.ckpt"))
    assert (run / "export" / "open_clip_model.safetensors").is_file()


def _write_shard(path: Path, start: int, n: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            buf = io.BytesIO()
            Image.new("RGB", (40, 40), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"colour number {i}".encode()), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_cluster_webdataset_recipe_through_the_torchrun_launcher(tmp_path):
    """Its header's launcher with 2 processes on this CPU. Deviations, each needed here: the CPU
    accelerator (no GPU), the tiny preset for ViT-B/32 (two ViT-B/32 processes take minutes on
    2 cores), and local shards and a val CSV for the cluster's /data paths."""
    for k, start in enumerate((0, 16)):
        _write_shard(tmp_path / f"laion-{k}.tar", start, 16)
    _write_shard(tmp_path / "cc-0.tar", 100, 16)
    images = _write_images(tmp_path / "val" / "img", 6)
    _write_csv(tmp_path / "val" / "coco_val.csv", [{"image": f"img/{n}", "caption": f"image {n}"} for n in images])
    import sys

    env = {"NPROC_PER_NODE": "2", "MASTER_PORT": "29523", "PYTHON": sys.executable}
    run_to_exit(["bash", str(REPO / "recipes" / "launch" / "torchrun.sh"), str(RECIPES / "webdataset_vitb32_ddp.yaml"),
                 "--trainer.accelerator", "cpu", "--model.init_args.model.init_args.arch", "mmkit-tiny",
                 "--data.init_args.train.init_args.urls", json.dumps([str(tmp_path / "laion-{0..1}.tar"), str(tmp_path / "cc-0.tar")]),
                 "--data.init_args.train.init_args.samples_per_epoch", "32", "--data.init_args.train.init_args.shuffle_buffer", "8",
                 "--data.init_args.val.init_args.path", str(tmp_path / "val" / "coco_val.csv"),
                 *SHORT, "--trainer.val_check_interval", "3", "--data.init_args.batch_size", "4",
                 "--data.init_args.eval_batch_size", "4", "--data.init_args.num_workers", "1"],
                cwd=tmp_path, timeout=400, env=env)
    run = tmp_path / "runs" / "vitb32_wds"
    assert (run / "export" / "open_clip_model.safetensors").is_file()
    assert any(run.rglob("metrics.json"))
