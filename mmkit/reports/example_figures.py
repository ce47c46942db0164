"""Pictures of what the model learnt (``mmkit.reports.examples``): retrieval examples, the
similarity matrix of a validation batch, the zero-shot confusion matrix.

Thumbnails are drawn with nearest-neighbour upscaling so small images (the 32×32 demo data) stay
sharp; the correct item of a retrieval is framed in green, the others in grey.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from mmkit.reports.examples import (
    Examples,
    confusion_matrix,
    embedding_map,
    image_to_text,
    text_to_image,
    unique_images,
)
from mmkit.reports.figures import new_figure, save

GREEN, GREY, RED = "#1a9850", "#b0b0b0", "#d73027"


def _thumbnail(ax, image: np.ndarray, frame: str | None = None, width: float = 4.0) -> None:
    # Small images are upscaled with visible pixels; large ones smoothed when shrunk.
    ax.imshow(image, interpolation="nearest" if max(image.shape[:2]) <= 128 else "antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame is not None:
            spine.set_edgecolor(frame)
            spine.set_linewidth(width)


def _short(text: str, width: int) -> str:
    return textwrap.shorten(text, width=width, placeholder="…")


def plot_text_to_image(path: Path, examples: Examples, queries: list[int], k: int = 5) -> list[dict]:
    """Each query caption beside its top-k images; the caption's own image framed in green."""
    results = text_to_image(examples.similarity, examples.image_ids, queries, k)
    k = min(k, len(unique_images(examples.image_ids)))
    fig = new_figure(3.2 + 1.25 * k, 1.45 * len(results) + 0.5)
    grid = fig.add_gridspec(len(results), k + 1, width_ratios=[2.6] + [1] * k, wspace=0.08, hspace=0.35)
    fig.suptitle(f"Text → image: top-{k} images per caption (green frame: the caption's own image)", fontsize=10)
    for r, result in enumerate(results):
        ax = fig.add_subplot(grid[r, 0])
        ax.axis("off")
        caption = "\n".join(textwrap.wrap(_short(examples.captions[result["query"]], 110), 28))
        found = f"own image at rank {result['rank']}"
        ax.text(0.0, 0.5, f"{caption}\n({found})", fontsize=8, va="center", ha="left", transform=ax.transAxes,
                color="black" if result["rank"] <= k else RED)
        for c, (row, correct, score) in enumerate(zip(result["top"], result["correct"], result["scores"])):
            ax = fig.add_subplot(grid[r, c + 1])
            _thumbnail(ax, examples.images[row], GREEN if correct else GREY, 4.0 if correct else 1.0)
            ax.set_title(f"#{c + 1}  {score:.2f}", fontsize=7, color=GREEN if correct else "black", pad=5)
    save(fig, path)
    return results


def plot_image_to_text(path: Path, examples: Examples, queries: list[int], k: int = 5) -> list[dict]:
    """Each query image beside its top-k captions; captions that describe it in green with ✓."""
    results = image_to_text(examples.similarity, examples.image_ids, queries, k)
    fig = new_figure(7.5, 1.5 * len(results) + 0.5)
    grid = fig.add_gridspec(len(results), 2, width_ratios=[1, 5.5], wspace=0.05, hspace=0.45)
    fig.suptitle(f"Image → text: top-{k} captions per image (green ✓: a caption of this image)", fontsize=10)
    for r, result in enumerate(results):
        thumb = fig.add_subplot(grid[r, 0])
        _thumbnail(thumb, examples.images[result["query"]])
        thumb.set_xlabel(f"own caption at rank {result['rank']}", fontsize=7,
                         color="black" if result["rank"] <= len(result["top"]) else RED)
        ax = fig.add_subplot(grid[r, 1])
        ax.axis("off")
        rows = len(result["top"])
        for i, (row, correct, score) in enumerate(zip(result["top"], result["correct"], result["scores"])):
            mark = "✓" if correct else " "
            ax.text(0.0, 1 - (i + 0.5) / rows, f"{mark} #{i + 1} ({score:.2f})  {_short(examples.captions[row], 70)}",
                    fontsize=8, va="center", ha="left", transform=ax.transAxes,
                    color=GREEN if correct else "black", fontweight="bold" if correct else "normal")
    save(fig, path)
    return results


def plot_similarity(path: Path, examples: Examples, n: int = 12) -> None:
    """Cosine similarity of the first ``n`` distinct images (rows, thumbnails) and their first
    captions (columns); matching pairs lie on the diagonal."""
    rows = unique_images(examples.image_ids)[:n]
    n = len(rows)
    sim = examples.similarity[np.ix_(rows, rows)]
    fig = new_figure(2.0 + 0.5 * n, 2.2 + 0.5 * n + 1.6)
    ax = fig.add_subplot()
    image = ax.imshow(sim, cmap="viridis", aspect="equal")
    best = sim.argmax(1)
    for i in range(n):  # each image's best caption
        ax.add_patch(_box(i, best[i], GREEN if best[i] == i else RED))
    ax.set_xticks(range(n), [_short(examples.captions[r], 48) for r in rows], rotation=90, fontsize=7)
    ax.set_yticks([])
    for i in range(n):  # the images themselves as row labels, in a column left of the matrix
        picture = examples.images[rows[i]]
        ax.imshow(picture, extent=(-1.55, -0.6, i + 0.45, i - 0.45),
                  interpolation="nearest" if max(picture.shape[:2]) <= 128 else "antialiased")
    ax.set_xlim(-1.6, n - 0.5)
    ax.set_ylim(n - 0.5, -0.5)
    ax.spines[:].set_visible(False)
    ax.set_xlabel("caption (image: left)")
    ax.set_title(f"Image × caption similarity, {n} validation pairs\n(diagonal: matching pairs; "
                 "box: each image's best caption, green if right)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    save(fig, path)


def _box(row: int, col: int, color: str):
    from matplotlib.patches import Rectangle

    return Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor=color, linewidth=2)


def plot_embedding_map(path: Path, examples: Examples) -> float:
    """Images and captions on the two principal axes of their embeddings, each pair joined by a
    line: two separate clouds are a modality gap (what AlignGAN closes). Returns the gap."""
    images, texts, gap = embedding_map(examples.image_features, examples.text_features)
    fig = new_figure(5.2, 4.4)
    ax = fig.add_subplot()
    for (x0, y0), (x1, y1) in zip(images, texts):
        ax.plot([x0, x1], [y0, y1], color=GREY, linewidth=0.5, zorder=1)
    ax.scatter(images[:, 0], images[:, 1], s=18, color="#4575b4", label="image", zorder=2)
    ax.scatter(texts[:, 0], texts[:, 1], s=22, marker="^", color="#f46d43", label="caption", zorder=2)
    ax.set_aspect("equal", adjustable="datalim")  # distances as they are
    ax.set_xlabel("principal axis 1", fontsize=8)
    ax.set_ylabel("principal axis 2", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=8)
    ax.set_title(f"Embedding space, {len(images)} validation pairs (lines join pairs)\n"
                 f"modality gap of these rows: {gap:.3f}", fontsize=9)
    save(fig, path)
    return gap


def plot_confusion(path: Path, examples: Examples, max_classes: int = 20) -> np.ndarray:
    """Zero-shot confusion matrix of the labelled rows (counts; rows: true class). With more than
    ``max_classes`` classes, only the most frequent true or predicted ones are drawn. Returns
    the counts over all classes."""
    names = examples.class_names or []
    counts = confusion_matrix(examples.labels, examples.predictions, len(names))
    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else float("nan")
    shown = np.arange(len(names))
    if len(names) > max_classes:
        seen = counts.sum(0) + counts.sum(1)
        shown = np.sort(np.argsort(-seen, kind="stable")[:max_classes])
    full, counts, names = counts, counts[np.ix_(shown, shown)], [names[i] for i in shown]
    c = len(names)
    fig = new_figure(2.6 + 0.55 * c, 2.2 + 0.5 * c)
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues")
    peak = max(int(counts.max()), 1)
    for i in range(c):
        for j in range(c):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if counts[i, j] > 0.6 * peak else "black")
    ax.set_xticks(range(c), [_short(n, 18) for n in names], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(c), [_short(n, 18) for n in names], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    subset = f", the {c} most frequent of {len(full)} classes" if c < len(full) else ""
    ax.set_title(f"Zero-shot confusion, {total} validation images{subset}\n(accuracy {accuracy:.2f})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    save(fig, path)
    return full
