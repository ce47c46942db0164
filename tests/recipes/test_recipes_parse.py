"""Every shipped recipe parses against the modules' and data modules' signatures, and its
numeric settings (given or defaulted) are in the ranges their classes check at construction."""

import importlib
from pathlib import Path

import pytest
import yaml

from mmkit.callbacks import BadSampleCallback, Throughput
from mmkit.cli import main
from mmkit.config_checks import check_range, ranges_of

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
# Overlays are merged after the base recipe their launch line names.
OVERLAYS = {"siglip.yaml": "default.yaml"}


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"default.yaml", "csv_finetune.yaml", "lit_minilm.yaml", "webdataset_vitb32_ddp.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_states_its_launch_command(recipe, capsys):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# Launch") and "mmkit" in first and recipe.name in first
    configs = [recipe.parent / OVERLAYS[recipe.name], recipe] if recipe.name in OVERLAYS else [recipe]
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"].startswith("mmkit.")
    assert cfg["data"]["class_path"] in ("mmkit.data.ImageTextDataModule", "mmkit.data.TaskStreamDataModule")
    # Run-time values are linked, never written in a recipe.
    assert "preprocessing" not in cfg["data"]["init_args"]
    # Without building anything (weights and data files need not exist here).
    assert check_numeric_settings(cfg) > 10


# Callbacks the CLI always adds, configured under their own top-level keys.
CLI_CALLBACKS = {"throughput": Throughput, "bad_samples": BadSampleCallback}


def check_numeric_settings(cfg) -> int:
    """Check every numeric setting of every mmkit class in a parsed config against the ranges
    that class checks at construction (``setting_ranges``); returns how many were checked."""
    checked = 0

    def check(cls: type, init_args: dict) -> None:
        nonlocal checked
        for name, spec in ranges_of(cls).items():
            if name in init_args:
                check_range(cls.__name__, name, init_args[name], spec)  # raises ValueError
                checked += 1

    def walk(node) -> None:
        if isinstance(node, dict):
            path = node.get("class_path")
            if isinstance(path, str) and path.startswith("mmkit."):
                module, _, name = path.rpartition(".")
                check(getattr(importlib.import_module(module), name), node.get("init_args") or {})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(cfg)
    for key, cls in CLI_CALLBACKS.items():
        check(cls, cfg.get(key) or {})
    return checked


def test_numeric_settings_check_finds_a_bad_value():
    cfg = {"model": {"class_path": "mmkit.CLIPPretrain", "init_args": {"grad_clip_norm": -1}}}
    with pytest.raises(ValueError, match=r"CLIPPretrain: grad_clip_norm must be > 0 or null \(no clipping\), got -1"):
        check_numeric_settings(cfg)
    with pytest.raises(ValueError, match=r"BadSampleCallback: max_bad_fraction must be in \[0, 1\]"):
        check_numeric_settings({"bad_samples": {"max_bad_fraction": -1}})


def test_unknown_key_in_recipe_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    text = (RECIPES[0].parent / "default.yaml").read_text().replace("warmup_steps:", "warmup_stepz:")
    bad.write_text(text)
    from mmkit.cli import command

    assert command(["fit", "--config", str(bad), "--print_config"]) == 2
    err = capsys.readouterr().err
    assert "mmkit: error: model: Problem with given class_path 'mmkit.CLIPPretrain'" in err and "warmup_stepz" in err
    assert "Traceback" not in err


def test_finished_fit_removes_stale_preemption_checkpoints(tmp_path):
    from mmkit.cli import remove_hpc_checkpoints

    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt", "last.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_hpc_checkpoints(tmp_path)
    assert [p.name for p in removed] == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
