"""Two real processes (gloo on localhost) score every benchmark exactly as one process does:
each item is encoded on one rank only (no padding duplicates), gathered once, and ranks with
fewer batches (or none) still run as many forward passes."""

import os

import pytest
import torch
from bench_data import image_folder, karpathy_file, tiny_model
from dist_utils import run_on_processes

from mmkit.benchmarks import BenchmarkEncoder, load_benchmarks, run_benchmarks
from mmkit.benchmarks.encoding import encode_images

pytestmark = pytest.mark.slow


def _entries(root: str) -> list[dict]:
    return [
        {"task": "zeroshot_classification", "name": "folder", "images": f"{root}/folder", "templates": ["a {}", "{}"],
         "batch_size": 4},  # 23 images: 12 and 11 per rank, in 3 batches each
        {"task": "retrieval", "name": "karpathy", "karpathy": f"{root}/karpathy/dataset_shapes.json", "batch_size": 3},
        # 3 images, one per batch: rank 0 runs 2 batches, rank 1 runs 1 (and 1 in lockstep)
        {"task": "zeroshot", "name": "three", "shapes": {"size": 3, "seed": 1, "image_size": 16}, "templates": ["{}"],
         "batch_size": 1},
        # 1 image and 1 caption: rank 1 has nothing to encode and still joins every collective
        {"task": "retrieval", "name": "one", "shapes": {"size": 1, "seed": 2, "image_size": 16}, "batch_size": 2},
    ]


def _score(root: str):
    model, spec = tiny_model(3)
    encoder = BenchmarkEncoder(model, spec.preprocessing)
    results = run_benchmarks(load_benchmarks(_entries(root)), encoder)
    bench = load_benchmarks(_entries(root))[0]
    with encoder.evaluating():
        features = encode_images(encoder, bench.data().images, 4, 0, "folder")
    return results, features


def worker(rank, world, root, out_dir):
    results, features = _score(root)
    torch.save({"results": results, "features": features}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_processes_score_as_one(tmp_path):
    image_folder(tmp_path / "folder")
    karpathy_file(tmp_path / "karpathy", n=7, captions_per_image=3)
    run_on_processes(worker, 2, str(tmp_path), str(tmp_path))
    want, want_features = _score(str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # every image once, in order: the gathered features are the single-process features
        assert got["features"].shape == want_features.shape == (23, 16)
        torch.testing.assert_close(got["features"], want_features, rtol=1e-5, atol=1e-6)
        assert got["results"].keys() == want.keys()
        for name, result in want.items():
            assert got["results"][name]["size"] == result["size"]
            assert got["results"][name]["metrics"] == pytest.approx(result["metrics"]), (rank, name)
