"""results.json and results.md of ``mmkit benchmark``: one row per benchmark, like CLIP_benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Columns of the markdown tables, in order; recalls and accuracies print as percentages.
ZEROSHOT_COLUMNS = ["top1", "top5", "mean_per_class_recall"]
RETRIEVAL_COLUMNS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]


def _cell(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if metric.endswith("medr") else f"{100 * value:.2f}"


def markdown(results: dict[str, dict[str, Any]], model: str) -> str:
    """Markdown tables: accuracy and recall in %, ``rsum`` the sum of the six recalls in %
    (results.json holds fractions)."""
    lines = [f"# Benchmark results: {model}", "", "Values in % (rsum: sum of the six recalls).", ""]
    for task, columns, title in (("zeroshot", ZEROSHOT_COLUMNS, "Zero-shot classification"),
                                 ("retrieval", RETRIEVAL_COLUMNS, "Retrieval (Recall@K)")):
        rows = {name: r for name, r in results.items() if r["task"] == task}
        if not rows:
            continue
        lines += [f"## {title}", "", "| benchmark | " + " | ".join(columns) + " | size |",
                  "|---" * (len(columns) + 2) + "|"]
        for name, r in rows.items():
            size = ", ".join(f"{v} {k}" for k, v in r["size"].items())
            cells = [_cell(c, r["metrics"].get(c)) for c in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {size} |")
        lines.append("")
    return "\n".join(lines)


def write_results(results: dict[str, dict[str, Any]], out_dir: str | Path, model: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps({"model": model, "benchmarks": results}, indent=2) + "\n")
    md_path.write_text(markdown(results, model))
    return json_path, md_path
