"""The run report's "explained retrievals" figure: for a few captions of a validation batch,
the images the model ranks highest among the batch's images, each with its relevance heatmap for
that caption (a green frame marks the caption's own image)."""

from __future__ import annotations

from pathlib import Path

import torch

from mmkit.explain.api import explain_pairs, normalize_relevance
from mmkit.explain.render import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    heatmap_overlay,
    hf_tokenizer,
    model_pixels_to_image,
)
from mmkit.explain.scoring import PairScorer
from mmkit.explain.texts import select_texts, texts_to, token_ids


def explained_retrievals_figure(module, batch: dict, path: str | Path, captions: list[str] | None = None,
                                num_queries: int = 4, top_k: int = 3, method: str = "attention") -> Path:
    """Draw the figure for ``batch`` (``images`` [B, 3, H, W] and ``texts`` [B, L], or a dict with
    ``input_ids`` and ``attention_mask`` for Hugging Face text towers, as the data module collates them) and save it as a PNG at ``path``. ``module``: an mmkit module (its
    ``model`` and ``project`` are used) or a bare ``DualEncoder``. ``captions``: the batch's
    caption strings for the row titles (default: decoded with the module's tokenizer)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    model = getattr(module, "model", module)
    project = getattr(module, "project", None)
    images, texts = batch["images"], batch["texts"]
    num_queries, top_k = min(num_queries, token_ids(texts).shape[0]), min(top_k, images.shape[0])
    if num_queries == 0:
        raise ValueError("explained_retrievals_figure: the batch is empty")
    scorer = PairScorer(model, project)
    device = scorer.device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        image_f = scorer.features(images=images.to(device))["image_features"]
        text_f = scorer.features(texts=texts_to(select_texts(texts, torch.arange(num_queries)), device))["text_features"]
        ranking = torch.stack([scorer.score(image_f, t.expand_as(image_f)) for t in text_f])  # [Q, B]
        best = ranking.topk(top_k, dim=1)
    model.train(was_training)
    q_idx = torch.arange(num_queries).repeat_interleave(top_k)
    i_idx = best.indices.cpu().flatten()
    exp = explain_pairs(model, images[i_idx], select_texts(texts, q_idx), method, project)
    maps = normalize_relevance(exp.patches.cpu())
    cfg = getattr(model, "preprocess_cfg", None) or {}
    pre = getattr(module, "preprocessing", None) or getattr(model, "preprocessing", None)
    mean = cfg.get("mean", getattr(pre, "mean", DEFAULT_MEAN))  # open_clip's config, else HFPreprocessing's
    std = cfg.get("std", getattr(pre, "std", DEFAULT_STD))
    if captions is None:
        captions = _decode(module, token_ids(texts)[:num_queries])

    fig = Figure(figsize=(2.2 * top_k + 0.4, 2.5 * num_queries))
    FigureCanvasAgg(fig)
    for q in range(num_queries):
        for k in range(top_k):
            n = q * top_k + k
            ax = fig.add_subplot(num_queries, top_k, n + 1)
            picture = heatmap_overlay(model_pixels_to_image(images[i_idx[n]], mean, std), maps[n], side=160)
            ax.imshow(picture)
            ax.set_xticks([])
            ax.set_yticks([])
            own = int(i_idx[n]) == q
            for spine in ax.spines.values():
                spine.set_edgecolor("green" if own else "0.7")
                spine.set_linewidth(3 if own else 1)
            ax.set_title(f"#{k + 1}  score {best.values[q, k].item():.2f}", fontsize=8)
            if k == 0:
                ax.set_ylabel(_wrap(captions[q]), fontsize=8)
    fig.suptitle(f"Explained retrievals ({method} relevance; green: the caption's own image)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _decode(module, texts) -> list[str]:
    tokenizer = getattr(getattr(module, "preprocessing", None), "_tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        return [f"caption {i}" for i in range(texts.shape[0])]
    hf = hf_tokenizer(tokenizer)
    if hf is not None:
        return [hf.decode(row, skip_special_tokens=True).strip() for row in texts.tolist()]
    words = []
    for row in texts.tolist():
        text = tokenizer.decode([t for t in row if t not in (0, tokenizer.sot_token_id, tokenizer.eot_token_id)])
        words.append(text.strip())
    return words


def _wrap(text: str, width: int = 24) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])
