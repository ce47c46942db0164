"""Benchmark scores equal a direct computation: encode every image and prompt with the model,
normalise, argmax (classification); rank captions and images by hand (retrieval)."""

import json

import pytest
import torch
import torch.nn.functional as F
from bench_data import image_folder, karpathy_file, tiny_model

from mmkit.benchmarks import (
    BenchmarkEncoder,
    Retrieval,
    ZeroShotClassification,
    load_benchmarks,
)
from mmkit.benchmarks.sources import image_folder as read_image_folder
from mmkit.data.sample import decode_image


def _direct_classification(model, spec, paths, labels, class_names, templates):
    tf, tok = spec.preprocessing.image_transform(False), spec.preprocessing.tokenize
    model.eval()
    with torch.no_grad():
        images = torch.stack([tf(decode_image(p, p)) for p in paths])
        img = F.normalize(model.encode_image(images), dim=-1)
        rows = []
        for name in class_names:
            emb = F.normalize(model.encode_text(tok([t.format(name) for t in templates])), dim=-1)
            rows.append(F.normalize(emb.mean(0), dim=-1))
        logits = img @ torch.stack(rows).T
    labels = torch.tensor(labels)
    pred = logits.argmax(1)
    top5 = logits.topk(5, dim=1).indices
    per_class = [(pred[labels == c] == c).float().mean() for c in range(len(class_names)) if (labels == c).any()]
    return {"top1": (pred == labels).float().mean().item(),
            "mean_per_class_recall": torch.stack(per_class).mean().item(),
            "top5": (top5 == labels[:, None]).any(1).float().mean().item()}


def test_image_folder_zero_shot_equals_direct_computation(tmp_path):
    root = image_folder(tmp_path / "shapes")
    model, spec = tiny_model()
    templates = ["a photo of a {}.", "a {} shape"]
    bench = ZeroShotClassification("shapes", images=str(root), templates=templates, batch_size=4)
    got = bench.evaluate(BenchmarkEncoder(model, spec.preprocessing))
    data = read_image_folder(str(root), None)
    want = _direct_classification(model, spec, data.images.paths, data.labels, data.class_names, templates)
    # 5 shape classes: top-5 is always 1 and left out
    assert set(got) == {"top1", "mean_per_class_recall"}
    assert got["top1"] == pytest.approx(want["top1"]) and got["mean_per_class_recall"] == pytest.approx(want["mean_per_class_recall"])
    assert bench.size() == {"images": 23, "classes": 5, "prompts": 2}


def test_label_manifest_without_captions_and_class_names_file(tmp_path):
    """A CSV of image + integer label (no caption column), class names from a text file, 7 classes
    so top-5 is reported; equal to the direct computation."""
    from mmkit.data.sources.synthetic import SyntheticShapes

    shapes = SyntheticShapes(size=20, seed=3, image_size=16, label_attribute="color", two_shapes_prob=0.0)
    names = list(shapes.class_names) + ["black"]  # 7 classes, one without images
    rows = ["path,y"]
    paths, labels = [], []
    for i in range(len(shapes)):
        s = shapes[i]
        s["image"].save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{s['label']}")
        paths.append(str(tmp_path / f"{i}.png"))
        labels.append(s["label"])
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    model, spec = tiny_model(1)
    bench = ZeroShotClassification("colors", manifest=str(tmp_path / "labels.csv"), image_column="path",
                                   label_column="y", class_names=str(tmp_path / "names.txt"), templates=["{}"])
    got = bench.evaluate(BenchmarkEncoder(model, spec.preprocessing))
    want = _direct_classification(model, spec, paths, labels, names, ["{}"])
    assert got == pytest.approx(want)


def test_builtin_imagenet_metadata_by_name(tmp_path):
    from open_clip.zero_shot_metadata import (
        IMAGENET_CLASSNAMES,
        OPENAI_IMAGENET_TEMPLATES,
    )

    from mmkit.benchmarks.metadata import resolve_class_names, resolve_templates

    assert resolve_class_names("imagenet1k", "t") == list(IMAGENET_CLASSNAMES)
    assert resolve_templates("openai_imagenet", "t") == list(OPENAI_IMAGENET_TEMPLATES)
    assert len(resolve_templates("simple_imagenet", "t")) == 7
    (tmp_path / "names.json").write_text(json.dumps({"1": "dog", "0": "cat"}))
    assert resolve_class_names(str(tmp_path / "names.json"), "t") == ["cat", "dog"]
    with pytest.raises(ValueError, match="neither a built-in set"):
        resolve_class_names("imagenet22k", "t")
    with pytest.raises(ValueError, match="needs '{}'"):
        resolve_templates(["a photo"], "t")


def _direct_retrieval(model, spec, image_paths, captions, owner):
    tf, tok = spec.preprocessing.image_transform(False), spec.preprocessing.tokenize
    model.eval()
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([tf(decode_image(p, p)) for p in image_paths])), dim=-1)
        txt = F.normalize(model.encode_text(tok(captions)), dim=-1)
    sim = img @ txt.T
    owner = torch.tensor(owner)
    out = {}
    for k in (1, 5, 10):
        kk = min(k, sim.shape[1])
        top_txt = sim.topk(kk, dim=1).indices  # image -> text: any own caption in the top k
        out[f"i2t_R@{k}"] = (owner[top_txt] == torch.arange(len(image_paths))[:, None]).any(1).float().mean().item()
        top_img = sim.T.topk(min(k, sim.shape[0]), dim=1).indices
        out[f"t2i_R@{k}"] = (top_img == owner[:, None]).any(1).float().mean().item()
    return out


def test_karpathy_retrieval_with_several_captions_equals_direct_computation(tmp_path):
    path = karpathy_file(tmp_path, n=7, captions_per_image=3)
    model, spec = tiny_model(2)
    bench = Retrieval("shapes", karpathy=str(path), split="test", batch_size=3)
    got = bench.evaluate(BenchmarkEncoder(model, spec.preprocessing))
    assert bench.size() == {"images": 7, "captions": 21}
    data = bench.data()
    want = _direct_retrieval(model, spec, data.images.paths, data.captions, data.caption_image)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_retrieval_manifest_groups_rows_by_image(tmp_path):
    path = karpathy_file(tmp_path, n=4, captions_per_image=2)
    entries = json.loads(path.read_text())["images"][:4]
    lines = [json.dumps({"image": f"images/{e['filename']}", "caption": [s["raw"] for s in e["sentences"]]}) for e in entries]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    model, spec = tiny_model(2)
    encoder = BenchmarkEncoder(model, spec.preprocessing)
    from_manifest = Retrieval("m", manifest=str(tmp_path / "pairs.jsonl"))
    assert from_manifest.size() == {"images": 4, "captions": 8}
    got = from_manifest.evaluate(encoder)
    data = from_manifest.data()
    want = _direct_retrieval(model, spec, data.images.paths, data.captions, data.caption_image)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_bad_benchmark_entries_are_named(tmp_path):
    root = image_folder(tmp_path / "shapes", n=6)
    with pytest.raises(ValueError, match="exactly one of images, manifest, shapes"):
        ZeroShotClassification("x", images=str(root), shapes={"size": 3})
    with pytest.raises(ValueError, match="unique"):
        load_benchmarks([{"task": "retrieval", "name": "a", "shapes": {"size": 3}},
                         {"task": "zeroshot", "name": "a", "shapes": {"size": 3}}])
    with pytest.raises(ValueError, match="tasks: zeroshot_classification"):
        load_benchmarks([{"task": "segmentation", "name": "a"}])
    with pytest.raises(TypeError, match="'a'.*unexpected keyword"):
        load_benchmarks([{"task": "retrieval", "name": "a", "shapes": {"size": 3}, "colour": 1}])
    bench = ZeroShotClassification("few", images=str(root), class_names=["one", "two"])
    with pytest.raises(ValueError, match="class subfolders .* but class_names lists 2"):
        bench.data()
    (root / "circle" / "broken.png").write_bytes(b"not a png")
    model, spec = tiny_model()
    with pytest.raises(ValueError, match="broken.png"):
        ZeroShotClassification("broken", images=str(root), templates=["{}"]).evaluate(BenchmarkEncoder(model, spec.preprocessing))
