"""Files for a continual-learning matrix: one CSV and one heatmap per score, and the summary.

``write_continual_report(out_dir, matrix)`` writes into ``out_dir``:

- ``<score>.csv``: rows ``before`` (if measured) and ``after <task>`` for each task trained so far,
  one column per task of the stream (``R@1`` is written as ``R_at_1``);
- ``<score>.png``: the same matrix as an annotated heatmap, for the scores in ``plot``;
- ``summary.csv`` / ``summary.json``: Avg, Last, BWT, forgetting and forward transfer per score.

``EWCIncremental`` calls it after every task, so a stopped run still leaves the rows it finished.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from mmkit.metrics.continual import ContinualMatrix

SUMMARY_KEYS = ("avg", "last", "bwt", "forgetting", "fwt")
PLOTTED = ("R@1", "zeroshot_top1")  # the headline scores; the one-direction recalls get a CSV only


def score_filename(score: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", score.replace("@", "_at_")).strip("_")


def _table(matrix: ContinualMatrix, score: str) -> tuple[list[str], list[list[float]]]:
    labels, rows = [], []
    if score in matrix.before:
        labels.append("before")
        rows.append(matrix.before[score])
    for t, row in enumerate(matrix.rows.get(score, [])):
        labels.append(f"after {matrix.task_names[t]}")
        rows.append(row)
    return labels, rows


def _heatmap(path: Path, title: str, labels: list[str], rows: list[list[float]], columns: list[str]) -> None:
    # Object-oriented Agg figure: no pyplot global state in the training process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = len(rows), len(columns)
    fig = Figure(figsize=(2.4 + 1.1 * n_cols, 2.2 + 0.5 * n_rows), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(rows, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            if math.isfinite(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value < 0.6 else "black")
    ax.set_xticks(range(n_cols), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), labels, fontsize=8)
    ax.set_xlabel("evaluated on task")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path)


def write_continual_report(
    out_dir: str | Path, matrix: ContinualMatrix, plot: tuple[str, ...] = PLOTTED
) -> dict[str, dict[str, float]]:
    """Write the CSVs, heatmaps (of the scores in ``plot``) and summary of ``matrix`` into
    ``out_dir`` (created if missing).

    Returns:
        ``{score: {avg, last, bwt, forgetting, fwt}}`` for every score with at least one row.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, float]] = {}
    for score in matrix.scores:
        labels, rows = _table(matrix, score)
        name = score_filename(score)
        with open(out / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["after", *matrix.task_names])
            for label, row in zip(labels, rows):
                writer.writerow([label, *(f"{v:.6g}" for v in row)])
        if rows and score in plot:
            _heatmap(out / f"{name}.png", score, labels, rows, matrix.task_names)
        if matrix.rows.get(score):
            summary[score] = matrix.summary(score)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["score", *SUMMARY_KEYS])
        for score, values in summary.items():
            writer.writerow([score, *(f"{values[k]:.6g}" for k in SUMMARY_KEYS)])
    # NaN (e.g. BWT after the first task) is written as json's NaN literal.
    (out / "summary.json").write_text(json.dumps({"tasks_done": matrix.tasks_done, "summary": summary}, indent=2) + "\n")
    return summary
