"""``mmkit explain`` end to end: an export folder, a checkpoint with its recipe, a CSV, a JSONL
file, a top-k query; the files it writes; bad input refused by name."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from mmkit import CLIPPretrain
from mmkit.cli import command
from mmkit.data.sources.synthetic import SyntheticShapes
from mmkit.models.spec import OpenCLIP


@pytest.fixture
def shapes_folder(tmp_path):
    ds = SyntheticShapes(size=4, seed=7, image_size=16)
    folder = tmp_path / "images"
    folder.mkdir()
    captions = []
    for i in range(4):
        ds[i]["image"].save(folder / f"{i}.png")
        captions.append(ds[i]["caption"])
    return folder, captions


def _direct_scores(model, preprocessing, paths, captions):
    images = torch.stack([preprocessing.image_transform(False)(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return (F.normalize(model.encode_image(images), dim=-1)
                * F.normalize(model.encode_text(preprocessing.tokenize(captions)), dim=-1)).sum(-1)


def test_export_folder_and_one_pair(tmp_path, tiny_arch, shapes_folder):
    folder, captions = shapes_folder
    spec = OpenCLIP(arch=tiny_arch)
    model = spec.build().eval()
    model.export(tmp_path / "export")
    out = tmp_path / "out"
    rc = command(["explain", "--model", f"local-dir:{tmp_path / 'export'}", "--image", str(folder / "0.png"),
                  "--caption", captions[0], "--out", str(out), "--method", "attention", "--method", "occlusion",
                  "--device", "cpu"])
    assert rc == 0
    record = json.loads((out / "explanations.json").read_text())
    assert record["methods"] == ["attention", "occlusion"] and len(record["pairs"]) == 1
    pair = record["pairs"][0]
    assert pair["caption"] == captions[0]
    assert pair["score"] == pytest.approx(_direct_scores(model, spec.preprocessing, [folder / "0.png"], captions[:1])[0].item(), abs=1e-5)
    for method in ("attention", "occlusion"):
        m = pair["methods"][method]
        assert len(m["patch_relevance"]) == 2 and len(m["patch_relevance"][0]) == 2
        assert m["tokens"][0] == "<start_of_text>" and len(m["tokens"]) == len(m["token_relevance"])
        heat = Image.open(out / m["heatmap_png"])
        assert heat.size == (256, 256) and heat.mode == "RGB"
        assert Image.open(out / m["caption_png"]).size[0] == 720
    rc = command(["explain", "--model", f"local-dir:{tmp_path / 'export'}", "--image", str(folder / "0.png"),
                  "--caption", captions[0], "--out", str(out)])
    assert rc == 2  # the folder is not empty: nothing is overwritten


def test_checkpoint_with_recipe_and_pair_files(tmp_path, tiny_arch, shapes_folder, capsys):
    folder, captions = shapes_folder
    torch.manual_seed(1)
    module = CLIPPretrain(OpenCLIP(tiny_arch), export_dir="")
    module.configure_model()
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict()}, ckpt)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"class_path": "mmkit.CLIPPretrain", "init_args": {
        "model": {"class_path": "mmkit.models.OpenCLIP", "init_args": {"arch": tiny_arch}}, "export_dir": ""}}}))
    (folder / "pairs.csv").write_text("image,caption\n" + "".join(f"{i}.png,{c}\n" for i, c in enumerate(captions)))
    (folder / "pairs.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "caption": c}) + "\n"
                                                for i, c in enumerate(captions[:2])))
    expected = _direct_scores(module.model.eval(), module.preprocessing, [folder / f"{i}.png" for i in range(4)], captions)
    base = ["explain", "--config", str(recipe), "--ckpt_path", str(ckpt), "--device", "cpu", "--batch_size", "3"]
    assert command([*base, "--pairs", str(folder / "pairs.csv"), "--out", str(tmp_path / "csv")]) == 0
    scores = [p["score"] for p in json.loads((tmp_path / "csv" / "explanations.json").read_text())["pairs"]]
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)  # the checkpoint's weights, across two batches
    assert len(list((tmp_path / "csv").glob("pair*_attention_heatmap.png"))) == 4
    assert command([*base, "--pairs", str(folder / "pairs.jsonl"), "--out", str(tmp_path / "jsonl")]) == 0
    assert len(json.loads((tmp_path / "jsonl" / "explanations.json").read_text())["pairs"]) == 2

    assert command([*base, "--query", captions[3], "--images", str(folder), "--top_k", "2", "--out", str(tmp_path / "q")]) == 0
    pairs = json.loads((tmp_path / "q" / "explanations.json").read_text())["pairs"]
    ranked = _direct_scores(module.model, module.preprocessing, [folder / f"{i}.png" for i in range(4)], [captions[3]] * 4)
    assert [Path(p["image"]).name for p in pairs] == [f"{i}.png" for i in ranked.topk(2).indices.tolist()]
    assert all(p["caption"] == captions[3] for p in pairs)


def test_bad_input_is_refused_by_name(tmp_path, tiny_arch, shapes_folder, capsys):
    folder, _ = shapes_folder
    spec = OpenCLIP(arch=tiny_arch)
    spec.build().export(tmp_path / "export")
    model = ["explain", "--model", f"local-dir:{tmp_path / 'export'}", "--out", str(tmp_path / "out")]
    (folder / "bad.csv").write_text("path,text\n0.png,a\n")
    assert command([*model, "--pairs", str(folder / "bad.csv")]) == 2
    assert "bad.csv: needs columns 'image' and 'caption'; header has ['path', 'text']" in capsys.readouterr().err
    (folder / "bad.jsonl").write_text(json.dumps({"image": "0.png", "caption": "a"}) + "\n{oops\n")
    assert command([*model, "--pairs", str(folder / "bad.jsonl")]) == 2
    assert "bad.jsonl line 2: not JSON" in capsys.readouterr().err
    (folder / "missing.csv").write_text("image,caption\n0.png,a red circle\nnope.png,a blue square\n")
    assert command([*model, "--pairs", str(folder / "missing.csv")]) == 2
    assert "missing.csv row 3, column 'image': image" in capsys.readouterr().err
    assert command([*model, "--image", str(folder / "0.png")]) == 2
    assert "--image and --caption go together" in capsys.readouterr().err
    assert command([*model, "--image", str(folder / "0.png"), "--caption", "x", "--method", "lime"]) == 2
    assert "invalid choice: 'lime'" in capsys.readouterr().err
