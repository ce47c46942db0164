"""Do mmkit's relevance maps measure something? (issue 16) The pointing game and deletion /
insertion curves on the demo model (recipes/default.yaml: mmkit-tiny at 32×32 on SyntheticShapes),
trained vs untrained (Adebayo et al.'s model-randomisation sanity check).

    python benchmarks/explain_pointing.py            # trains the demo model if there is no run, writes RESULTS.md
    python benchmarks/explain_pointing.py --smoke    # 12 test images, an untrained model only, no write

The trained model is the demo run's last checkpoint (``benchmarks/_work/explain/demo``, made with
``mmkit fit --config recipes/default.yaml --trainer.default_root_dir benchmarks/_work/explain/demo``
when missing: 150 steps, about 5 min on a free CPU); the untrained one is the same architecture with
its seed-0 initial weights. Data: the first ``--n`` images of the demo's test split
(SyntheticShapes seed 2, never trained on). Each shape of an image is one query: its phrase
("a small red circle") with its box; in a two-shape image the other shape is a distractor.

Per method (attention relevance, gradient × input, occlusion; ``random``: a uniform random map):
- pointing accuracy: the map's maximum (upsampled to the image) inside the named shape's box, on
  one-shape images and on two-shape images; ``distractor``: inside the other shape's box instead;
  ``chance``: the box's area fraction (a random point). A random *patch-level* map hits less than
  that on a 4×4 grid: the maximum of a bilinearly upsampled map is always a patch centre.
- deletion / insertion: the image–text cosine as patches are removed (set to the mean colour) or
  revealed (on a mean-colour image) in the method's order, area under the curve over the fraction
  of patches; the same for a random order. Faithful: deletion below random, insertion above.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from results_file import write_section

from mmkit.data.sources.synthetic import SyntheticShapes
from mmkit.explain import explain_pairs
from mmkit.explain.evaluation import (
    deletion_insertion,
    pointing_game,
    random_order,
    relevance_order,
    shape_queries,
)
from mmkit.explain.loading import load_model
from mmkit.explain.scoring import PairScorer
from mmkit.explain.towers import towers_for
from mmkit.models.spec import OpenCLIP

RESULTS = HERE / "RESULTS.md"
HEADING = "## Explaining a match: pointing game and deletion/insertion (issue 16)"
RECIPE = REPO / "recipes" / "default.yaml"
RUN = HERE / "_work" / "explain" / "demo"
METHODS = ["attention", "gradxinput", "occlusion"]


def trained_checkpoint(run: Path) -> Path:
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        cmd = [sys.executable, "-m", "mmkit.cli", "fit", "--config", str(RECIPE), "--trainer.default_root_dir", str(run)]
        print("training the demo model:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
    return ckpt


def untrained_model():
    cfg = yaml.safe_load(RECIPE.read_text())["model"]["init_args"]["model"]["init_args"]
    torch.manual_seed(0)
    spec = OpenCLIP(**cfg)
    return spec.build().eval(), spec.preprocessing


def faithfulness(model, preprocessing, dataset, queries, batch_size=64) -> dict[str, dict[str, float]]:
    scorer, towers = PairScorer(model), towers_for(model)
    transform = preprocessing.image_transform(False)
    sums: dict[str, dict[str, float]] = {m: {"deletion": 0.0, "insertion": 0.0, "full": 0.0, "blank": 0.0}
                                         for m in [*METHODS, "random"]}
    for start in range(0, len(queries), batch_size):
        part = queries[start:start + batch_size]
        images = torch.stack([transform(dataset[q["index"]]["image"]) for q in part])
        texts = preprocessing.tokenize([q["phrase"] for q in part])
        orders = {m: relevance_order(explain_pairs(model, images, texts, m).patches.cpu()) for m in METHODS}
        gh, gw = towers.grid(images)
        orders["random"] = random_order(len(part), gh * gw, seed=start)
        for m, order in orders.items():
            curves = deletion_insertion(scorer, towers, images, texts, order)
            sums[m]["deletion"] += curves["deletion_auc"].sum().item()
            sums[m]["insertion"] += curves["insertion_auc"].sum().item()
            sums[m]["full"] += curves["deletion"][:, 0].sum().item()  # the score of the whole image
            sums[m]["blank"] += curves["insertion"][:, 0].sum().item()  # ... and of the mean-colour image
    return {m: {k: v / len(queries) for k, v in d.items()} for m, d in sums.items()}


def evaluate(name, model, preprocessing, dataset, indices) -> dict:
    one = [q for q in shape_queries(dataset, indices) if not q["others"]]
    two = [q for q in shape_queries(dataset, indices) if q["others"]]
    t0 = time.time()
    out = {"one_shape": pointing_game(model, preprocessing, dataset, one, METHODS),
           "two_shapes": pointing_game(model, preprocessing, dataset, two, METHODS),
           "faithfulness": faithfulness(model, preprocessing, dataset, one + two)}
    print(f"{name}: evaluated {len(one)} + {len(two)} queries in {time.time() - t0:.0f} s", flush=True)
    return out


def table(results: dict) -> str:
    lines = [("| model | method | one shape: hit | two shapes: named hit | two shapes: distractor hit "
             "| deletion AUC (lower: faithful) | insertion AUC (higher: faithful) |"),
             "|---|---|---|---|---|---|---|"]
    for model, r in results.items():
        for m in [*METHODS, "random", "chance"]:
            one, two = r["one_shape"][m], r["two_shapes"][m]
            faith = r["faithfulness"].get(m)
            dist = "" if m == "chance" else f"{two['distractor']:.3f}"
            dele = f"{faith['deletion']:.3f}" if faith else ""
            ins = f"{faith['insertion']:.3f}" if faith else ""
            label = {"random": "random map / order", "chance": "chance (box area)"}.get(m, m)
            lines.append(f"| {model} | {label} | {one['accuracy']:.3f} | {two['accuracy']:.3f} | {dist} | {dele} | {ins} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="test images (each shape is one query)")
    ap.add_argument("--run", type=Path, default=RUN, help="the demo run folder (trained when it has no last.ckpt)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    test = yaml.safe_load(RECIPE.read_text())["data"]["init_args"]["test"]["init_args"]
    dataset = SyntheticShapes(**test)
    indices = range(12 if args.smoke else args.n)
    results = {}
    started = time.time()
    if not args.smoke:
        ckpt = trained_checkpoint(args.run)
        loaded = load_model(configs=[str(RECIPE)], ckpt_path=str(ckpt), device="cpu")
        results["trained"] = evaluate("trained", loaded.model, loaded.preprocessing, dataset, indices)
    model, pre = untrained_model()
    results["untrained"] = evaluate("untrained", model, pre, dataset, indices)
    (HERE / "_work" / "explain").mkdir(parents=True, exist_ok=True)
    (HERE / "_work" / "explain" / "results.json").write_text(json.dumps(results, indent=1))
    counts = results["untrained"]
    minutes = (time.time() - started) / 60
    body = table(results)
    print(body)
    if args.smoke:
        return
    section = f"""{HEADING}

`python benchmarks/explain_pointing.py` (CPU; the demo run `{args.run.relative_to(REPO)}` of
`recipes/default.yaml`, 150 steps; untrained: the same architecture's seed-0 initial weights).
Queries: each shape of the first {args.n} test images (SyntheticShapes seed 2, 32×32, a 4×4 patch
grid) captioned by its own phrase ("a small red circle"): {counts['one_shape']['chance']['n']} one-shape
and {counts['two_shapes']['chance']['n']} two-shape queries. Mean cosine of the whole image with its phrase:
{results.get('trained', counts)['faithfulness']['random']['full']:.3f} (trained), {counts['faithfulness']['random']['full']:.3f} (untrained); of the
mean-colour image: {results.get('trained', counts)['faithfulness']['random']['blank']:.3f} (trained), {counts['faithfulness']['random']['blank']:.3f} (untrained). Hit: the map's maximum (bilinearly upsampled
to the image) inside the named shape's box; distractor: inside the other shape's box instead.
Deletion/insertion: mean area under the image–text cosine curve as patches are removed (set to
the mean colour) or revealed in the method's order, over all queries; "random" is a random order.

{body}

Reading (for the run above). On two-shape images the trained model's attention relevance and
occlusion maps point at the named shape far above chance and a random map, and almost never at the
distractor; with the initial weights they do not prefer the named shape (attention even hits the
distractor more often). Gradient × input is the weak one: well below the other two and, on two-shape images, no better
on the named shape than on the distractor. On one-shape images even the untrained model's
attention relevance finds the shape above chance (it is the only high-contrast region: the maps
follow the image there, not what the model learnt), which is why the two-shape named-vs-distractor
columns are the sanity check that matters (Adebayo et al. 2018). Deletion and insertion: for the
trained model every method's order removes the score faster (lower deletion area) and restores it
faster (higher insertion area) than a random order, occlusion and attention most; for the
untrained model the scores barely move whatever the order. Took {minutes:.0f} min on 2 shared CPU cores.
"""
    write_section(RESULTS, HEADING, section)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
