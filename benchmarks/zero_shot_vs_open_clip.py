"""``mmkit benchmark`` vs open_clip's own zero-shot code on the same model and benchmarks (issue 15).

    python benchmarks/zero_shot_vs_open_clip.py --run runs/default --benchmarks recipes/benchmarks/example.yaml

``--run`` is a finished fit's run folder (``checkpoints/last.ckpt``, ``export/``, ``metrics.csv``).
The same weights are scored four ways:

1. ``mmkit benchmark --model <run>/checkpoints/last.ckpt`` (the checkpoint with the run's config.yaml);
2. ``mmkit benchmark --model <run>/export`` (the open_clip local-dir the fit wrote);
3. ``mmkit benchmark --model <arch.json> --pretrained <export weights>`` (the open_clip architecture +
   weights-file path, as for a downloaded open_clip model);
4. open_clip alone: ``open_clip.create_model_and_transforms('local-dir:<export>')``, its
   ``build_zero_shot_classifier`` and its eval transform; accuracy, per-class recall and the
   retrieval recalls (CLIP_benchmark's definition: an image query is a hit when any of its captions
   is in the top K) in plain torch here, not with mmkit.metrics.

and, when the fit ran the ``Benchmarks`` callback, the values it logged at the last step. Retrieval
is scored by open_clip's features twice: by ``topk`` (ties broken by index, as CLIP_benchmark) and
with exact ties counted against the query (mmkit.metrics.retrieval's rule: a collapsed model gets
the worst rank, not a perfect one); the two differ only where a caption's text repeats on
another image (identical embeddings).
Prints a markdown section (paste it into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import open_clip
import torch

from mmkit.benchmarks import load_benchmarks
from mmkit.cli import command


def open_clip_scores(export: Path, benchmarks, ties_against: bool = False) -> dict[str, dict[str, float]]:
    """open_clip's model, transforms, tokenizer and classifier; retrieval recalls by ``topk``
    (ties broken by index, as CLIP_benchmark) or, with ``ties_against``, with a candidate scoring
    exactly as high as the best correct one ranked above it (mmkit's documented rule)."""
    name = f"local-dir:{export}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for bench in benchmarks:
            data = bench.data()
            images = torch.stack([preprocess(data.images.load(i)) for i in range(len(data.images))])
            image_features = torch.cat([model.encode_image(images[s:s + 256], normalize=True)
                                        for s in range(0, len(images), 256)])
            if bench.task == "zeroshot":
                classifier = open_clip.build_zero_shot_classifier(model, tokenizer, data.class_names, bench.templates)
                logits = image_features @ classifier
                labels = torch.tensor(data.labels)
                scores = {"top1": (logits.argmax(1) == labels).float().mean().item()}
                if len(data.class_names) > 5:
                    scores["top5"] = (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
                predicted = logits.argmax(1)
                scores["mean_per_class_recall"] = torch.stack(
                    [(predicted[labels == c] == c).float().mean() for c in labels.unique()]).mean().item()
            else:
                texts = torch.cat([model.encode_text(tokenizer(data.captions[s:s + 256]), normalize=True)
                                   for s in range(0, len(data.captions), 256)])
                owner = torch.tensor(data.caption_image)
                positive = owner[:, None] == torch.arange(len(images))[None, :]  # captions x images
                sim = texts @ image_features.T
                scores = {}
                # 1-based rank of the best correct candidate, ties counted against the query
                best_t2i = sim.masked_fill(~positive, float("-inf")).amax(1, keepdim=True)
                rank_t2i = 1 + ((sim >= best_t2i) & ~positive).sum(1)
                best_i2t = sim.T.masked_fill(~positive.T, float("-inf")).amax(1, keepdim=True)
                rank_i2t = 1 + ((sim.T >= best_i2t) & ~positive.T).sum(1)
                for k in (1, 5, 10):
                    if ties_against:
                        scores[f"t2i_R@{k}"] = (rank_t2i <= k).float().mean().item()
                        scores[f"i2t_R@{k}"] = (rank_i2t <= k).float().mean().item()
                        continue
                    top_images = sim.topk(min(k, sim.shape[1]), 1).indices
                    top_texts = sim.T.topk(min(k, sim.shape[0]), 1).indices
                    scores[f"t2i_R@{k}"] = positive.gather(1, top_images).any(1).float().mean().item()
                    scores[f"i2t_R@{k}"] = positive.T.gather(1, top_texts).any(1).float().mean().item()
            out[bench.name] = scores
    return out


def mmkit_scores(args: list[str], out: Path) -> dict[str, dict[str, float]]:
    if command(["benchmark", *args, "--out", str(out), "--device", "cpu"]) != 0:
        raise SystemExit(f"mmkit benchmark {' '.join(args)} failed")
    results = json.loads((out / "results.json").read_text())["benchmarks"]
    return {name: r["metrics"] for name, r in results.items()}


def logged_scores(run: Path) -> dict[str, dict[str, float]]:
    path = run / "metrics.csv"
    if not path.is_file():
        return {}
    last: dict[str, float] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            last.update({k: float(v) for k, v in row.items() if k.startswith(("zeroshot/", "retrieval/")) and v})
    out: dict[str, dict[str, float]] = {}
    for key, value in last.items():
        _, name, metric = key.split("/", 2)
        out.setdefault(name, {})[metric] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--benchmarks", required=True)
    args = ap.parse_args()
    export = args.run / "export"
    benchmarks = load_benchmarks(args.benchmarks)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arch = tmp / "arch.json"
        arch.write_text(json.dumps(json.loads((export / "open_clip_config.json").read_text())["model_cfg"]))
        columns = {
            "mmkit benchmark, checkpoint": mmkit_scores(["--model", str(args.run / "checkpoints" / "last.ckpt"),
                                                         "--benchmarks", args.benchmarks], tmp / "ckpt"),
            "mmkit benchmark, export": mmkit_scores(["--model", str(export), "--benchmarks", args.benchmarks], tmp / "export"),
            "mmkit benchmark, arch + pretrained file": mmkit_scores(
                ["--model", str(arch), "--pretrained", str(export / "open_clip_model.safetensors"),
                 "--benchmarks", args.benchmarks], tmp / "arch"),
            "Benchmarks callback (metrics.csv)": logged_scores(args.run),
            "open_clip's own code": open_clip_scores(export, benchmarks),
            "open_clip's features, ties against": open_clip_scores(export, benchmarks, ties_against=True),
        }
    columns = {k: v for k, v in columns.items() if v}
    reference = columns["open_clip's features, ties against"]
    lines = ["| benchmark | metric | " + " | ".join(columns) + " | mmkit = ties against |", "|---" * (len(columns) + 3) + "|"]
    for bench in benchmarks:
        for metric, want in reference[bench.name].items():
            values = [c.get(bench.name, {}).get(metric) for c in columns.values()]
            mmkit = [v for name, v in zip(columns, values) if not name.startswith("open_clip")]
            equal = all(v is not None and abs(v - want) < 1e-6 for v in mmkit)
            cells = " | ".join("–" if v is None else f"{100 * v:.2f}" for v in values)
            lines.append(f"| {bench.name} | {metric} | {cells} | {'yes' if equal else '**no**'} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
