"""The ``mmkit explain`` commands of docs/explain.md, run as written in a scratch folder where
``runs/default/checkpoints/last.ckpt`` is a checkpoint of recipes/default.yaml's module (initial
weights: what is tested is the commands, not the training)."""

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mmkit.cli import command
from mmkit.data.sources.synthetic import SyntheticShapes

REPO = Path(__file__).parents[2]

DOC_COMMANDS = [
    ("mmkit explain --config recipes/default.yaml --ckpt_path runs/default/checkpoints/last.ckpt "
    "--image my_image.png --caption 'a small red circle' --out runs/default/explain/"),
    "mmkit export --config recipes/default.yaml --ckpt_path runs/default/checkpoints/last.ckpt --out my_model/",
    "mmkit explain --model local-dir:my_model/ --pairs pairs.csv --method attention --method occlusion --out explained/",
    "mmkit explain --model local-dir:my_model/ --query 'a large blue star' --images my_images/ --top_k 2 --out explained_query/",
]


@pytest.fixture
def scratch(tmp_path):
    from jsonargparse import ArgumentParser

    from mmkit.techniques.base import DualEncoderModule

    (tmp_path / "recipes").mkdir()
    shutil.copy(REPO / "recipes" / "default.yaml", tmp_path / "recipes" / "default.yaml")
    parser = ArgumentParser()
    parser.add_subclass_arguments(DualEncoderModule, "model")
    section = yaml.safe_load((REPO / "recipes" / "default.yaml").read_text())["model"]
    module = parser.instantiate_classes(parser.parse_args(["--model", json.dumps(section)])).model
    module.configure_model()
    (tmp_path / "runs" / "default" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": module.state_dict()}, tmp_path / "runs" / "default" / "checkpoints" / "last.ckpt")
    ds = SyntheticShapes(size=3, seed=2, image_size=32)
    ds[0]["image"].save(tmp_path / "my_image.png")
    (tmp_path / "my_images").mkdir()
    rows = ["image,caption"]
    for i in range(3):
        ds[i]["image"].save(tmp_path / "my_images" / f"{i}.png")
        rows.append(f"my_images/{i}.png,{ds[i]['caption']}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(cwd)


def test_the_commands_here_are_the_docs_commands():
    doc = REPO / "docs" / "explain.md"
    blocks = re.findall(r"```bash\n(.*?)```", doc.read_text(), re.DOTALL)
    shown = [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("mmkit ")]
    assert shown == DOC_COMMANDS


@pytest.mark.slow
def test_docs_explain_commands_run_as_written(scratch):
    for line in DOC_COMMANDS:
        words = shlex.split(line)
        assert words[0] == "mmkit"
        assert command(words[1:] + ["--device", "cpu"] if words[1] == "explain" else words[1:]) == 0, line
    one = json.loads((scratch / "runs/default/explain/explanations.json").read_text())
    assert one["pairs"][0]["caption"] == "a small red circle"
    assert (scratch / "runs/default/explain/pair0000_attention_heatmap.png").is_file()
    pairs = json.loads((scratch / "explained/explanations.json").read_text())["pairs"]
    assert len(pairs) == 3 and set(pairs[0]["methods"]) == {"attention", "occlusion"}
    assert len(pairs[0]["methods"]["attention"]["patch_relevance"]) == 4  # 32 px, 8 px patches
    query = json.loads((scratch / "explained_query/explanations.json").read_text())["pairs"]
    assert [p["caption"] for p in query] == ["a large blue star"] * 2
