"""End-of-run report: curves as PNGs, a Markdown summary and the final numbers as JSON.

``RunReport`` records scalars from ``trainer.callback_metrics`` while training runs and, at fit
end, calls :func:`write_report` on rank zero to fill ``<run folder>/report/``:

- one PNG per figure: keys sharing a prefix are drawn together when they are losses
  (``train/loss``, ``train/contrastive_loss`` → ``train_loss.png``) or Recall@K
  (``val/i2t_R@1``, ``val/t2i_R@5`` … → ``val_recall.png``); every other key gets its own;
- ``report.md``: the final metrics table and the figures, embedded by relative path;
- ``metrics.json``: the final numbers; ``history.json``: the recorded curves.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from mmkit.config_checks import Range, check_settings
from mmkit.run_folder import run_folder

# {x-axis name: {metric key: [(x, value), ...]}}, e.g. {"step": {...}, "epoch": {...}}
History = dict[str, dict[str, list[tuple[float, float]]]]


def _figure_name(key: str) -> str:
    head, _, name = key.rpartition("/")
    if "R@" in name:
        name = "recall"
    elif name.endswith("loss"):
        name = "loss"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{head}_{name}" if head else name).strip("_")


def _plot(path: Path, series: dict[str, list[tuple[float, float]]], x_label: str, title: str) -> None:
    # Object-oriented Agg figures: no pyplot global state, no backend switch for the host program.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, points in sorted(series.items()):
        xs, ys = zip(*points)
        # Markers keep curves with a handful of points (a few epochs) readable.
        ax.plot(xs, ys, label=key, marker="o" if len(points) <= 30 else None, markersize=3)
    if all(float(x).is_integer() for points in series.values() for x, _ in points):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 1.25" ticks
    ax.set_xlabel(x_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def write_report(out_dir: str | Path, history: History, final: dict[str, float]) -> Path:
    """Write PNG curves, ``report.md``, ``metrics.json`` and ``history.json`` into ``out_dir``.

    Args:
        out_dir: created if missing.
        history: ``{x-axis name: {metric key: [(x, value), ...]}}``; empty series are skipped.
        final: metric key → final value, written to ``metrics.json`` and the report table.

    Returns:
        the path of ``report.md``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = {k: float(v) for k, v in sorted(final.items())}
    # A diverged run's NaN is written as json's NaN literal rather than failing the report.
    (out / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")

    figures: list[tuple[str, str]] = []
    for x_label, series in history.items():
        groups: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(dict)
        for key, points in series.items():
            if points:
                groups[_figure_name(key)][key] = points
        for name, group in sorted(groups.items()):
            filename = f"{name}.png"
            _plot(out / filename, group, x_label, name)
            figures.append((name, filename))

    lines = ["# Run report", "", "## Final metrics", ""]
    if final:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in final.items()]
    else:
        lines.append("_No metrics were recorded._")
    if figures:
        lines += ["", "## Curves", ""]
        for name, filename in figures:
            lines += [f"### {name}", "", f"![{name}]({filename})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report


def _scalars(metrics: dict[str, Any], prefixes: Sequence[str]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if not key.startswith(tuple(prefixes)):
            continue
        # Lightning lists a metric logged on step and epoch three times (name, name_step,
        # name_epoch); keep the plain name only.
        base = re.sub(r"_(step|epoch)$", "", key)
        if base != key and base in metrics:
            continue
        if isinstance(value, Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return out


class RunReport(L.Callback):
    """Records training and validation scalars and writes a report at the end of ``fit``.

    Training keys (``train_prefixes``) are recorded against the optimizer step after every
    ``every_n_steps`` steps; validation keys (``val_prefixes``) against the number of epochs
    completed (fractional for mid-epoch validation) after every validation loop outside the
    sanity check. The report goes to ``<trainer.log_dir or default_root_dir>/<folder>/``.

    Args:
        train_prefixes: key prefixes plotted over steps (loss, temperature, learning rate, …).
        val_prefixes: key prefixes plotted over epochs (Recall@K, zero-shot accuracy, …).
        folder: name of the report folder inside the run folder.
        every_n_steps: record training keys every n optimizer steps (reading a GPU scalar syncs).
    """

    setting_ranges = {"every_n_steps": Range(ge=1, integer=True)}

    def __init__(
        self,
        train_prefixes: Sequence[str] = ("train/",),
        val_prefixes: Sequence[str] = ("val/",),
        folder: str = "report",
        every_n_steps: int = 1,
    ) -> None:
        check_settings(self, locals(), RunReport.setting_ranges)
        self.train_prefixes = tuple(train_prefixes)
        self.val_prefixes = tuple(val_prefixes)
        self.folder = folder
        self.every_n_steps = every_n_steps
        self.history: History = {"step": {}, "epoch": {}}
        self._batches_in_epoch = 0

    def _record(self, axis: str, x: float, values: dict[str, float]) -> None:
        for key, value in values.items():
            points = self.history[axis].setdefault(key, [])
            # Several batches can end on one optimizer step (gradient accumulation): keep the last.
            if points and points[-1][0] == x:
                points[-1] = (x, value)
            else:
                points.append((x, value))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Run after the other callbacks (e.g. Throughput) so what they log at a batch end is
        # recorded with that batch's step, but before checkpoints, so they save the latest history.
        # A new list, because Lightning is iterating the current one to call this hook.
        others = [c for c in trainer.callbacks if c is not self]
        ckpts = [c for c in others if isinstance(c, Checkpoint)]
        trainer.callbacks = [c for c in others if not isinstance(c, Checkpoint)] + [self] + ckpts

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batches_in_epoch = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches_in_epoch = batch_idx + 1
        if trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0:
            self._record("step", trainer.global_step, _scalars(trainer.callback_metrics, self.train_prefixes))

    def _epochs_done(self, trainer: L.Trainer) -> float:
        per_epoch = trainer.num_training_batches
        if not isinstance(per_epoch, int) or per_epoch <= 0:  # inf for iterable datasets
            return float(trainer.current_epoch)
        return trainer.current_epoch + min(1.0, self._batches_in_epoch / per_epoch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != TrainerFn.FITTING:
            return
        values = _scalars(trainer.callback_metrics, self.val_prefixes)
        self._record("epoch", self._epochs_done(trainer), values)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = run_folder(trainer) / self.folder  # every rank (a collective)
        if trainer.is_global_zero:
            final = _scalars(trainer.callback_metrics, self.train_prefixes + self.val_prefixes)
            write_report(out, self.history, final)

    def state_dict(self) -> dict[str, Any]:
        # Checkpointed so a resumed run's report still shows the curves from before the restart.
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = state_dict["history"]
