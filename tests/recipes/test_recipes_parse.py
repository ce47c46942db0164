"""Every shipped recipe parses against the modules' and data modules' signatures."""

from pathlib import Path

import pytest
import yaml

from mmkit.cli import main

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


def test_unknown_key_in_recipe_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    text = (RECIPES[0].parent / "default.yaml").read_text().replace("warmup_steps:", "warmup_stepz:")
    bad.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad), "--print_config"])
    assert exit_info.value.code != 0
    assert "warmup_stepz" in capsys.readouterr().err


def test_finished_fit_removes_stale_preemption_checkpoints(tmp_path):
    from mmkit.cli import remove_hpc_checkpoints

    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt", "last.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_hpc_checkpoints(tmp_path)
    assert [p.name for p in removed] == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
