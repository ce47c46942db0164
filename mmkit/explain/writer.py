"""Explain pairs in batches and write, per pair and method, the heatmap overlay and the
highlighted caption (PNGs), and all numbers in one ``explanations.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from mmkit.explain.api import explain_pairs, normalize_relevance
from mmkit.explain.loading import ExplainableModel
from mmkit.explain.pairs import Pair
from mmkit.explain.render import (
    heatmap_overlay,
    highlighted_text,
    model_pixels_to_image,
    special_token_ids,
    token_strings,
)
from mmkit.explain.texts import token_ids


def explain_to_folder(loaded: ExplainableModel, pairs: Sequence[Pair], methods: Sequence[str], out: str | Path,
                      batch_size: int = 16, extra: dict | None = None) -> Path:
    """Write ``pairNNNN_<method>_heatmap.png``, ``pairNNNN_<method>_caption.png`` and
    ``explanations.json`` into ``out`` (created; must be new or empty). Returns the JSON's path."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out}: exists and is not an empty folder (explanations are written to a new one)")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    out.mkdir(parents=True, exist_ok=True)
    transform = loaded.preprocessing.image_transform(False)
    stats = loaded.pixel_stats
    special = special_token_ids(loaded.tokenizer)
    records = [{"pair": i, "image": p.image_path, "caption": p.caption, "methods": {}} for i, p in enumerate(pairs)]
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        images = torch.stack([transform(p.image) for p in part])
        texts = loaded.preprocessing.tokenize([p.caption for p in part])
        for method in methods:
            exp = explain_pairs(loaded.model, images, texts, method, loaded.project).to("cpu")
            shown = normalize_relevance(exp.patches)
            for j, pair in enumerate(part):
                i = start + j
                valid = exp.valid_tokens[j]
                ids = token_ids(texts)[j][valid].tolist()
                raw = exp.tokens[j][valid]
                tokens = token_strings(loaded.tokenizer, ids)
                seen = model_pixels_to_image(images[j], *(stats or ()))
                heat_file, text_file = f"pair{i:04d}_{method}_heatmap.png", f"pair{i:04d}_{method}_caption.png"
                heatmap_overlay(seen, shown[j]).save(out / heat_file)
                words = [k for k, t in enumerate(ids) if t not in special]  # the picture shows the caption's own tokens
                highlighted_text([tokens[k] for k in words], normalize_relevance(raw[words][None])[0].tolist(),
                                 title=f"{method}  score {exp.scores[j].item():.3f}").save(out / text_file)
                records[i]["score"] = round(exp.scores[j].item(), 6)
                records[i]["methods"][method] = {
                    "heatmap_png": heat_file,
                    "caption_png": text_file,
                    "patch_relevance": exp.patches[j].tolist(),  # raw, [grid rows][grid cols]
                    "tokens": tokens,
                    "token_relevance": raw.tolist(),
                }
    path = out / "explanations.json"
    path.write_text(json.dumps({**(extra or {}), "methods": list(methods), "pairs": records}, indent=1))
    return path
