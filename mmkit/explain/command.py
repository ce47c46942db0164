"""``mmkit explain``: relevance heatmaps and highlighted captions for image–caption pairs."""

from __future__ import annotations

import argparse

from mmkit.explain.api import METHODS

USAGE_DOC = """\
mmkit explain (--model local-dir:EXPORT | --config RECIPE --ckpt_path CKPT [--model.… overrides])
              (--image IMG --caption TEXT | --pairs PAIRS.csv|.jsonl | --query TEXT --images DIR [--top_k K])
              --out DIR [--method attention|gradxinput|occlusion ...] [--batch_size N] [--device auto|cpu|cuda]

Writes into DIR (new or empty), per pair and method, pairNNNN_<method>_heatmap.png (patch
relevance over the image the model saw) and pairNNNN_<method>_caption.png (tokens highlighted by
relevance), and explanations.json with every score and relevance value."""


def explain(argv: list[str]) -> None:
    from mmkit.explain.loading import load_model
    from mmkit.explain.pairs import one_pair, read_pairs
    from mmkit.explain.retrieval import top_k_pairs
    from mmkit.explain.writer import explain_to_folder

    ap = argparse.ArgumentParser(prog="mmkit explain", description=USAGE_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                 exit_on_error=False)
    ap.add_argument("--model", help="local-dir:EXPORT_FOLDER (mmkit export), or an open_clip architecture (random weights)")
    ap.add_argument("--config", action="append", default=[], help="recipe YAML of the checkpoint (repeatable, merged in order)")
    ap.add_argument("--ckpt_path", help="module checkpoint (.ckpt or sharded folder), with --config")
    ap.add_argument("--image", help="one image file, with --caption")
    ap.add_argument("--caption", help="the caption of --image")
    ap.add_argument("--pairs", help="a .csv (columns image, caption) or .jsonl file of pairs; images relative to it")
    ap.add_argument("--query", help="a caption: explain its top-k images of --images")
    ap.add_argument("--images", help="folder of images searched with --query")
    ap.add_argument("--top_k", type=int, default=3)
    ap.add_argument("--out", required=True, help="output folder (new or empty)")
    ap.add_argument("--method", action="append", choices=sorted(METHODS),
                    help="relevance method (repeatable; default: attention)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    args, overrides = ap.parse_known_args(argv)
    unknown = [w for w in overrides if w.startswith("--") and not w.startswith("--model.")]
    if unknown or (overrides and args.ckpt_path is None):
        raise ValueError(f"mmkit explain: unrecognized arguments: {' '.join(overrides)}")
    sources = [args.image is not None or args.caption is not None, args.pairs is not None, args.query is not None]
    if sum(sources) != 1:
        raise ValueError("mmkit explain: give exactly one of --image with --caption, --pairs FILE, or --query with --images")
    if sources[0] and (args.image is None or args.caption is None):
        raise ValueError("mmkit explain: --image and --caption go together")
    if sources[2] and args.images is None:
        raise ValueError("mmkit explain: --query needs --images DIR")

    loaded = load_model(args.model, args.config, args.ckpt_path, overrides, args.device)
    if sources[0]:
        pairs = one_pair(args.image, args.caption)
    elif sources[1]:
        pairs = read_pairs(args.pairs)
    else:
        pairs = top_k_pairs(loaded, args.query, args.images, args.top_k, args.batch_size)
    methods = list(dict.fromkeys(args.method or ["attention"]))
    source = args.model or f"{args.ckpt_path} ({', '.join(args.config)})"
    path = explain_to_folder(loaded, pairs, methods, args.out, args.batch_size, extra={"model": source})
    print(f"mmkit: explained {len(pairs)} pair(s) with {', '.join(methods)}; wrote {path.parent}/")
