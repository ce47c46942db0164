"""Training and validation curves, all over the optimizer step, grouped into a few figures.

Each metric key (``train/loss``, ``val/i2t_R@5``, ...) is put in a panel by its name (the part
after the ``/``), and each panel in a figure:

- ``optimisation``: loss (train and val), loss terms, learning rate, temperature, throughput, MFU;
- ``retrieval``: image→text and text→image Recall@K, median rank, their sum;
- ``zeroshot``: zero-shot top-k accuracy;
- ``technique``: a technique's own signals (AlignGAN's discriminator accuracy/AUC and modality
  gap, KDStudent's teacher agreement, ...);
- ``other``: any other key, a panel each.

Left out: ``logit_scale`` (the inverse of ``temperature``), ``zeroshot_top<k>`` for k at or
above the number of classes (always 1), and the loss-terms panel when the loss has a single term
(it would repeat the loss). Every panel spans the same steps, from 0 to the last one recorded;
fractions (Recall@K, accuracies, agreement) are drawn on [0, 1].
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmkit.reports.figures import new_figure, save

Series = dict[str, list[tuple[float, float]]]

FIGURES = {  # file stem -> title ("{technique}" filled in)
    "optimisation": "Optimisation",
    "retrieval": "Retrieval (validation)",
    "zeroshot": "Zero-shot classification (validation)",
    "technique": "{technique}: its own signals",
    "other": "Other scalars",
}
SKIPPED = ("logit_scale",)
_TOP_K = re.compile(r"^zeroshot_top(\d+)$")


@dataclass(frozen=True)
class _Panel:
    figure: str
    title: str
    matches: Callable[[str], bool]
    ylabel: str = ""
    chance: float | None = None  # a dashed reference line
    fraction: bool = False  # a value in [0, 1]: drawn on that scale


PANELS = (
    _Panel("optimisation", "loss", lambda n: n == "loss"),
    _Panel("optimisation", "loss terms", lambda n: n.endswith("_loss") and not n.startswith("d_")),
    _Panel("optimisation", "learning rate", lambda n: n == "lr"),
    _Panel("optimisation", "temperature", lambda n: n == "temperature"),
    _Panel("optimisation", "throughput", lambda n: n == "samples_per_sec", ylabel="samples / s"),
    _Panel("optimisation", "step time", lambda n: n == "step_time", ylabel="s"),
    _Panel("optimisation", "achieved TFLOP/s per device", lambda n: n == "tflops", ylabel="TFLOP/s"),
    _Panel("optimisation", "model FLOPs utilisation (MFU)", lambda n: n == "mfu"),
    _Panel("optimisation", "skipped (non-finite steps, bad samples)", lambda n: n in ("nonfinite_steps", "data_skipped")),
    _Panel("retrieval", "image → text Recall@K", lambda n: n.startswith("i2t_R@"), fraction=True),
    _Panel("retrieval", "text → image Recall@K", lambda n: n.startswith("t2i_R@"), fraction=True),
    _Panel("retrieval", "median rank (lower is better)", lambda n: n.endswith(("medr", "meanr"))),
    _Panel("retrieval", "R-sum (sum of the Recall@K, both directions)", lambda n: n == "rsum"),
    _Panel("zeroshot", "zero-shot accuracy (dashed: chance)", lambda n: n.startswith("zeroshot_"), fraction=True),
    _Panel("technique", "discriminator accuracy / AUC (0.5: modalities indistinguishable)",
           lambda n: n in ("d_accuracy", "d_auc"), chance=0.5, fraction=True),
    _Panel("technique", "discriminator loss", lambda n: n.startswith("d_") and n.endswith("_loss")),
    _Panel("technique", "modality gap", lambda n: n == "modality_gap", ylabel="‖mean image − mean text‖"),
    _Panel("technique", "teacher/student top-1 agreement", lambda n: "agreement" in n, fraction=True),
    _Panel("technique", "gradient reversal weight", lambda n: n == "grl_weight"),
)


def is_trivial(key: str, num_classes: int | None) -> bool:
    """Whether ``key`` is not worth a curve: top-k accuracy with k ≥ the number of classes."""
    name = key.rpartition("/")[2]
    top = _TOP_K.match(name)
    return name in SKIPPED or (top is not None and num_classes is not None and int(top.group(1)) >= num_classes)


def _panel_of(key: str) -> tuple[str, str, _Panel | None]:
    name = key.rpartition("/")[2]
    for panel in PANELS:
        if panel.matches(name):
            return panel.figure, panel.title, panel
    return "other", name, None  # any other key: a panel of its own


def group_curves(series: Series, num_classes: int | None = None) -> dict[str, dict[str, Series]]:
    """``{figure: {panel title: {key: points}}}`` in figure and panel order, trivial keys and
    empty series left out."""
    order = {p.title: i for i, p in enumerate(PANELS)}
    groups: dict[str, dict[str, Series]] = {}
    for key in sorted(series):
        if not series[key] or is_trivial(key, num_classes):
            continue
        figure, title, _ = _panel_of(key)
        groups.setdefault(figure, {}).setdefault(title, {})[key] = series[key]
    terms = groups.get("optimisation", {}).get("loss terms", {})
    if len(terms) == 1 and "loss" in groups["optimisation"]:  # the loss itself
        del groups["optimisation"]["loss terms"]
    return {
        f: dict(sorted(groups[f].items(), key=lambda kv: order.get(kv[0], len(order))))
        for f in FIGURES if f in groups
    }


def _natural(key: str) -> list:
    # R@1, R@5, R@10 in that order (not R@1, R@10, R@5)
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _label(key: str, keys: list[str]) -> str:
    # Panels hold keys of one split or several (train/loss, val/loss): keep the split only then.
    prefixes = {k.rpartition("/")[0] for k in keys}
    return key if len(prefixes) > 1 else key.rpartition("/")[2]


def plot_curves(out_dir: str | Path, series: Series, technique: str = "technique",
                num_classes: int | None = None) -> list[tuple[str, str]]:
    """Draw the grouped figures into ``out_dir``; returns ``[(title, file name)]``."""
    from matplotlib.ticker import MaxNLocator

    by_title = {p.title: p for p in PANELS}
    last_step = max((x for points in series.values() for x, _ in points), default=0)
    written = []
    for figure, panels in group_curves(series, num_classes).items():
        cols = 1 if len(panels) == 1 else 2
        rows = -(-len(panels) // cols)
        fig = new_figure(5.2 * cols, 3.0 * rows + 0.5)
        title = FIGURES[figure].format(technique=technique)
        fig.suptitle(title, fontsize=12)
        for i, (panel_title, group) in enumerate(panels.items()):
            ax = fig.add_subplot(rows, cols, i + 1)
            keys = sorted(group, key=_natural)
            for key in keys:
                xs, ys = zip(*group[key])
                # Markers keep curves with a handful of points (a few validations) readable.
                few = len(xs) <= 30
                ax.plot(xs, ys, label=_label(key, keys), marker="o" if few else None, markersize=3,
                        linewidth=1.5 if few else 1.0)
            panel = by_title.get(panel_title)
            chance = panel.chance if panel is not None else None
            if figure == "zeroshot" and num_classes:
                chance = 1.0 / num_classes  # top-1 of a uniform guess
            if chance is not None:
                ax.axhline(chance, color="grey", linestyle="--", linewidth=0.8)
            if panel is not None and panel.fraction:
                ax.set_ylim(0.0, 1.02)
            ax.set_xlim(0, max(1, last_step) * 1.02)  # the same steps in every panel
            ax.set_title(panel_title, fontsize=10)
            ax.set_xlabel("optimizer step", fontsize=8)
            if panel is not None and panel.ylabel:
                ax.set_ylabel(panel.ylabel, fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            if panel_title == "learning rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            if len(keys) > 1 or figure == "zeroshot":  # one curve under its panel's title needs no legend
                ax.legend(fontsize=7)
        fig.tight_layout()
        filename = f"{figure}.png"
        save(fig, Path(out_dir) / filename)
        written.append((title, filename))
    return written
