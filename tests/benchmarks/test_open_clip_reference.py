"""``mmkit benchmark`` on an open_clip architecture with a local weights file gives the numbers of
open_clip's own zero-shot code (``open_clip.build_zero_shot_classifier`` with its ImageNet
templates) on the same model and images."""

import json

import open_clip
import pytest
import torch
from bench_data import TINY_ARCH, image_folder
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from safetensors.torch import save_file

from mmkit.benchmarks import load_benchmarks
from mmkit.benchmarks.command import load_encoder
from mmkit.benchmarks.encoding import encode_images
from mmkit.benchmarks.sources import image_folder as read_image_folder
from mmkit.cli import command
from mmkit.data.sample import decode_image

pytestmark = pytest.mark.slow


def test_open_clip_pretrained_equals_open_clip_zero_shot(tmp_path):
    open_clip.add_model_config(TINY_ARCH)  # registered as "tiny_test_arch"
    torch.manual_seed(0)
    reference, _, preprocess = open_clip.create_model_and_transforms("tiny_test_arch")
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    root = image_folder(tmp_path / "folder", n=20)
    (tmp_path / "bench.yaml").write_text(json.dumps({"benchmarks": [
        {"task": "zeroshot_classification", "name": "shapes", "images": str(root), "templates": "openai_imagenet"}]}))

    assert command(["benchmark", "--model", TINY_ARCH, "--pretrained", str(weights),
                    "--benchmarks", str(tmp_path / "bench.yaml"), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    got = json.loads((tmp_path / "out" / "results.json").read_text())["benchmarks"]["shapes"]["metrics"]

    data = read_image_folder(str(root), None)
    reference.eval()
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            reference, open_clip.get_tokenizer("tiny_test_arch"), data.class_names, OPENAI_IMAGENET_TEMPLATES)
        images = torch.stack([preprocess(decode_image(p, p)) for p in data.images.paths])
        image_features = reference.encode_image(images, normalize=True)
        predicted = (image_features @ classifier).argmax(1)
    labels = torch.tensor(data.labels)
    assert got["top1"] == pytest.approx((predicted == labels).float().mean().item())
    recalls = [(predicted[labels == c] == c).float().mean() for c in labels.unique()]
    assert got["mean_per_class_recall"] == pytest.approx(torch.stack(recalls).mean().item())

    # Not only the same counts: the same class embeddings and image features.
    encoder = load_encoder(TINY_ARCH, str(weights), [], [], torch.device("cpu"))
    bench = load_benchmarks(str(tmp_path / "bench.yaml"))[0]
    with encoder.evaluating():
        torch.testing.assert_close(bench.classifier(encoder), classifier.T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(encode_images(encoder, data.images, 8, 0, "shapes"), image_features, rtol=1e-4, atol=1e-5)


def test_an_architecture_without_weights_is_named_random_in_warning_and_results(tmp_path):
    root = image_folder(tmp_path / "folder", n=6)
    (tmp_path / "bench.yaml").write_text(json.dumps({"benchmarks": [
        {"task": "zeroshot_classification", "name": "shapes", "images": str(root), "templates": "openai_imagenet"}]}))
    with pytest.warns(UserWarning, match=r"without --pretrained scores randomly initialised weights"):
        assert command(["benchmark", "--model", TINY_ARCH, "--benchmarks", str(tmp_path / "bench.yaml"),
                        "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["model"].endswith("(random weights)")
