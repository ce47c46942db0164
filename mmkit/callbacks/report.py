"""End-of-run report: a Markdown page with the final numbers, grouped curves and pictures of what
the model learnt, plus the numbers as JSON.

``RunReport`` records scalars while training runs (training and validation against the same
optimizer step), keeps the first rows of the validation data, and fills ``<run folder>/report/``
on rank 0 at the end of ``fit``; when a test follows the fit in the same process (``mmkit fit``
with a test split), it writes the report again with the test metrics. ``write_report`` assembles:

- ``report.md``: the final metrics (train / val / test side by side), the figures, embedded by
  relative path;
- ``optimisation.png``, ``retrieval.png``, ``zeroshot.png``, ``technique.png``: the curves,
  grouped (``mmkit.reports.curves``);
- ``retrieval_text_to_image.png``, ``retrieval_image_to_text.png``, ``similarity.png``,
  ``embedding_map.png``, ``confusion.png``: what was learnt, on a few validation pairs (``mmkit.reports.examples``);
  their numbers in ``examples.json``; ``explained_retrievals.png``: the patches behind a few
  retrievals (``mmkit.explain``);
- a technique's own figures (EWCIncremental's continual-learning matrix), linked where the
  technique wrote them (``DualEncoderModule.report_figures``);
- ``metrics.json``: the final numbers; ``history.json``: the recorded curves.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from mmkit.config_checks import Range, check_settings
from mmkit.reports.continual import SUMMARY_KEYS as CONTINUAL_STATS
from mmkit.reports.curves import plot_curves
from mmkit.reports.example_figures import (
    plot_confusion,
    plot_embedding_map,
    plot_image_to_text,
    plot_similarity,
    plot_text_to_image,
)
from mmkit.reports.examples import Examples, compute_examples, take_rows, unique_images
from mmkit.run_folder import run_folder
from mmkit.training.log_cadence import logs_step_values

# {x-axis name: {metric key: [(x, value), ...]}}; the x-axis is the optimizer step ("step").
History = dict[str, dict[str, list[tuple[float, float]]]]

SPLITS = ("train", "val", "test")
QUERIES = 4  # retrieval examples per direction
EXPLAINED_IMAGES = 12  # images the explained captions are ranked among
_PER_TASK = re.compile(r"_task\d+$")  # continual/<score>_task<d>: the matrix heatmap shows them


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _metrics_tables(final: dict[str, float]) -> list[str]:
    """One table with a column per split (``train/x``, ``val/x``, ``test/x`` in a row), one for
    the other keys."""
    by_name: dict[str, dict[str, float]] = {}
    others = {}
    for key, value in final.items():
        split, _, name = key.partition("/")
        if split in SPLITS and name:
            by_name.setdefault(name, {})[split] = value
        else:
            others[key] = value
    lines = []
    continual = _continual_rows(others)
    if by_name:
        splits = [s for s in SPLITS if any(s in v for v in by_name.values())]
        lines += ["| metric | " + " | ".join(splits) + " |", "| --- |" + " --- |" * len(splits)]
        for name, values in sorted(by_name.items()):
            lines.append(f"| `{name}` | " + " | ".join(_fmt(values[s]) if s in values else "" for s in splits) + " |")
    if continual:
        lines += ["", "Continual learning (over the task stream):", "",
                  "| score | " + " | ".join(CONTINUAL_STATS) + " |", "| --- |" + " --- |" * len(CONTINUAL_STATS)]
        for score, stats in continual.items():
            lines.append(f"| `{score}` | " + " | ".join(_fmt(stats[s]) if s in stats else "" for s in CONTINUAL_STATS) + " |")
    if others:
        lines += ["", "| metric | value |", "| --- | --- |"] + [f"| `{k}` | {_fmt(v)} |" for k, v in sorted(others.items())]
    return lines


def _continual_rows(others: dict[str, float]) -> dict[str, dict[str, float]]:
    """``continual/<score>_<stat>`` keys (EWCIncremental's summary) as ``{score: {stat: value}}``,
    taken out of ``others``."""
    rows: dict[str, dict[str, float]] = {}
    for key in sorted(others):
        match = re.fullmatch(r"continual/(.+)_(" + "|".join(CONTINUAL_STATS) + ")", key)
        if match:
            rows.setdefault(match.group(1), {})[match.group(2)] = others.pop(key)
    return rows


def _example_sections(out: Path, examples: Examples) -> tuple[list[str], list[str], dict]:
    """Draw the pictures of ``examples``; returns the Markdown lines, the files and the numbers."""
    n = len(examples.captions)
    queries = unique_images(examples.image_ids)[:QUERIES].tolist()  # a caption and an image each of distinct images
    lines = ["", "## What the model learnt", "",
             f"_{n} validation pairs (the first rows of the validation data), scored with the final weights._"]
    files, numbers = [], {}
    numbers["text_to_image"] = plot_text_to_image(out / "retrieval_text_to_image.png", examples, queries)
    numbers["image_to_text"] = plot_image_to_text(out / "retrieval_image_to_text.png", examples, queries)
    plot_similarity(out / "similarity.png", examples)
    files += ["retrieval_text_to_image.png", "retrieval_image_to_text.png", "similarity.png"]
    lines += ["", "### Retrieval examples", "", "![text to image](retrieval_text_to_image.png)", "",
              "![image to text](retrieval_image_to_text.png)", "",
              "### Image–caption similarity", "", "![similarity](similarity.png)"]
    if examples.image_features is not None and examples.text_features is not None:
        numbers["modality_gap"] = plot_embedding_map(out / "embedding_map.png", examples)
        files.append("embedding_map.png")
        lines += ["", "### Embedding space", "", "![embedding map](embedding_map.png)"]
    if examples.predictions is not None:
        counts = plot_confusion(out / "confusion.png", examples)
        numbers["confusion"] = {"class_names": examples.class_names, "counts": counts.tolist()}
        files.append("confusion.png")
        lines += ["", "### Zero-shot confusion matrix", "", "![zero-shot confusion](confusion.png)"]
    numbers["captions"] = examples.captions
    numbers["image_ids"] = examples.image_ids.tolist()
    return lines, files, numbers


def write_report(
    out_dir: str | Path,
    history: History,
    final: dict[str, float],
    technique: str = "technique",
    num_classes: int | None = None,
    examples: Examples | None = None,
    technique_figures: dict[str, str | Path] | None = None,
    notes: Sequence[str] = (),
    explained_png: bytes | None = None,
) -> Path:
    """Write ``report.md``, its figures, ``metrics.json`` and ``history.json`` into ``out_dir``.

    Args:
        out_dir: created if missing. PNG files of an earlier report there that this one does not
            draw are removed (a report written again after the test leaves no stale figure).
        history: ``{"step": {metric key: [(step, value), ...]}}``; empty series are skipped.
        final: metric key → final value, written to ``metrics.json`` and the report's tables.
        technique: the module's name, for the title of its own figure.
        num_classes: zero-shot classes; top-k accuracy curves with k ≥ this are left out.
        examples: the validation rows and their features for the pictures (None: none drawn).
        technique_figures: title → PNG a technique wrote itself, linked by relative path.
        notes: lines shown under the title (e.g. why there are no pictures).
        explained_png: the "explained retrievals" figure (``mmkit.explain``), written as
            ``explained_retrievals.png`` with the pictures.

    Returns:
        the path of ``report.md``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = {k: float(v) for k, v in sorted(final.items())}
    # A diverged run's NaN is written as json's NaN literal rather than failing the report.
    (out / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")

    lines = [f"# Run report: {technique}", ""]
    lines += [f"_{note}_" for note in notes] + ([""] if notes else [])
    lines += ["## Final metrics", ""]
    lines += _metrics_tables(final) if final else ["_No metrics were recorded._"]

    files: list[str] = []
    if examples is not None and num_classes is None and examples.class_names:
        num_classes = len(examples.class_names)
    curves = plot_curves(out, history.get("step", {}), technique, num_classes)
    if curves:
        lines += ["", "## Curves", "", "_Training and validation over optimizer steps._"]
        for title, filename in curves:
            lines += ["", f"### {title}", "", f"![{title}]({filename})"]
            files.append(filename)
    if examples is not None:
        section, drawn, numbers = _example_sections(out, examples)
        lines += section
        files += drawn
        (out / "examples.json").write_text(json.dumps(numbers, indent=1) + "\n")
    elif (out / "examples.json").exists():
        (out / "examples.json").unlink()
    if explained_png is not None:
        (out / "explained_retrievals.png").write_bytes(explained_png)
        files.append("explained_retrievals.png")
        lines += ["", "### Explained retrievals", "",
                  ("_For a few captions, the best-scoring images with the patches that made the score "
                   "(attention relevance; `mmkit explain` draws these for any pair)._"), "",
                  "![explained retrievals](explained_retrievals.png)"]
    if technique_figures:
        lines += ["", f"## {technique}"]
        for title, path in technique_figures.items():
            lines += ["", f"### {title}", "", f"![{title}]({Path(os.path.relpath(path, out)).as_posix()})"]
    for stale in out.glob("*.png"):
        if stale.name not in files:
            stale.unlink()
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


def _num_classes(trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
    given = getattr(pl_module, "zero_shot_classes", None)
    if given:
        return len(given)
    names = getattr(getattr(trainer.datamodule, "val", None), "class_names", None)
    return len(names) if names else None


def _explained_retrievals(pl_module: L.LightningModule, rows: dict, notes: list[str]) -> bytes | None:
    """The "explained retrievals" PNG for rows of distinct images (None, with a note, for towers
    the explanation methods cannot open)."""
    import tempfile

    from mmkit.explain.report_figure import explained_retrievals_figure
    from mmkit.explain.texts import select_texts
    from mmkit.explain.towers import UnsupportedTowerError

    keep = torch.as_tensor(unique_images(rows["image_id"].numpy())[:EXPLAINED_IMAGES])
    if len(keep) < 2 or not isinstance(rows.get("texts"), (Tensor, dict)):
        return None
    batch = {"images": rows["images"][keep], "texts": select_texts(rows["texts"], keep)}
    captions = [rows["captions"][int(i)] for i in keep] if "captions" in rows else None
    with tempfile.TemporaryDirectory() as tmp, torch.enable_grad():
        try:
            path = explained_retrievals_figure(pl_module, batch, Path(tmp) / "explained.png", captions=captions)
        except UnsupportedTowerError as e:
            notes.append(f"No explained retrievals: {e}")
            return None
        return path.read_bytes()


class RunReport(L.Callback):
    """Records training and validation scalars and writes a report at the end of ``fit``, and
    again after a test that follows it (see module docstring).

    Training keys (``train_prefixes``) are recorded after every ``every_n_steps`` optimizer steps
    (default: the steps the loggers write, every ``log_every_n_steps``) and after the last one,
    validation keys (``val_prefixes``) after every validation loop outside the sanity check, both
    against ``trainer.global_step``. The report goes to ``<trainer.log_dir or
    default_root_dir>/<folder>/``.

    The pictures are computed on rank 0 alone at the end of training, from the first ``examples``
    rows of the validation data that rank saw, with the module's ``example_features`` (one forward
    of those rows, no collective); they are left out under strategies that shard the parameters
    (FSDP2, DeepSpeed ZeRO-3), where a forward on one rank would wait for the others.

    Args:
        train_prefixes: key prefixes of the training curves (loss, temperature, learning rate, …).
        val_prefixes: key prefixes of the validation curves (Recall@K, zero-shot accuracy, …).
        test_prefixes: key prefixes of the test metrics (report table only).
        folder: name of the report folder inside the run folder.
        every_n_steps: record training keys every n optimizer steps (reading a GPU scalar syncs);
            default: the trainer's ``log_every_n_steps``, the steps mmkit logs them on.
        examples: validation rows kept for the pictures (0: no pictures).
    """

    setting_ranges = {"every_n_steps": Range(ge=1, integer=True, none="the trainer's log_every_n_steps"), "examples": Range(ge=0, integer=True)}

    def __init__(
        self,
        train_prefixes: Sequence[str] = ("train/",),
        val_prefixes: Sequence[str] = ("val/",),
        test_prefixes: Sequence[str] = ("test/",),
        folder: str = "report",
        every_n_steps: int | None = None,
        examples: int = 64,
    ) -> None:
        check_settings(self, locals(), RunReport.setting_ranges)
        self.train_prefixes = tuple(train_prefixes)
        self.val_prefixes = tuple(val_prefixes)
        self.test_prefixes = tuple(test_prefixes)
        self.folder = folder
        self.every_n_steps = every_n_steps
        self.examples = examples
        self.history: History = {"step": {}}
        self._rows: dict | None = None  # validation rows kept for the pictures (rank 0)
        self._examples: Examples | None = None
        self._notes: list[str] = []
        self._explained: bytes | None = None  # the "explained retrievals" PNG, drawn at train end
        self._fit_final: dict[str, float] | None = None  # the fit's final metrics (rank 0)
        self._fitted = False  # on every rank: a test after this fit rewrites the report

    def _record(self, values: dict[str, float], x: float) -> None:
        for key, value in values.items():
            points = self.history["step"].setdefault(key, [])
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

    def train_values_every(self, trainer: L.Trainer) -> int | None:
        """The steps this callback records training values on, beside the loggers' (see log_cadence)."""
        return self.every_n_steps

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.is_global_zero and logs_step_values(trainer, self.every_n_steps):
            self._record(_scalars(trainer.callback_metrics, self.train_prefixes), trainer.global_step)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # A CPU copy of this rank's first validation rows; nothing crosses processes.
        have = 0 if self._rows is None else int(self._rows["images"].shape[0])
        wanted = (trainer.is_global_zero and trainer.state.fn == TrainerFn.FITTING and dataloader_idx == 0
                  and have < self.examples and isinstance(batch, dict) and {"images", "texts", "image_id"} <= batch.keys()
                  and hasattr(pl_module, "example_features"))
        if wanted and batch["images"].shape[0] > 0:
            self._rows = take_rows(batch, self.examples, self._rows)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != TrainerFn.FITTING:
            return
        self._record(_scalars(trainer.callback_metrics, self.val_prefixes), trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before the strategy is torn down: the model is still on its device.
        if not trainer.is_global_zero or self._rows is None:
            return
        features = pl_module.example_features(self._rows)
        if features is None:
            self._notes = ["No example pictures: the parameters are sharded over ranks (a forward on rank 0 alone would wait for the others)."]
            return
        preprocessing = getattr(pl_module, "preprocessing", None)
        self._examples = compute_examples(features, self._rows, getattr(preprocessing, "mean", None),
                                          getattr(preprocessing, "std", None))
        self._explained = _explained_retrievals(pl_module, self._rows, self._notes)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Path, final: dict[str, float]) -> None:
        figures = getattr(pl_module, "report_figures", None)
        write_report(out, self.history, final, technique=type(pl_module).__name__,
                     num_classes=_num_classes(trainer, pl_module), examples=self._examples,
                     technique_figures=figures() if callable(figures) else None, notes=self._notes,
                     explained_png=self._explained)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = run_folder(trainer) / self.folder  # every rank (a collective)
        self._fitted = True
        if trainer.is_global_zero:
            if self._rows is None and self.examples and hasattr(pl_module, "example_features"):
                self._notes = ["No example pictures: no validation batch ran during the fit."]
            final = _scalars(trainer.callback_metrics, self.train_prefixes + self.val_prefixes + ("continual/",))
            self._fit_final = {k: v for k, v in final.items() if not _PER_TASK.search(k)}
            self._write(trainer, pl_module, out, self._fit_final)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only a test that follows this callback's fit (`mmkit fit` with a test split); a test
        # run on its own writes to an evaluation folder of its own, without a report.
        if not self._fitted:
            return
        out = run_folder(trainer) / self.folder  # every rank (a collective)
        if trainer.is_global_zero:
            test = _scalars(trainer.callback_metrics, self.test_prefixes)
            self._write(trainer, pl_module, out, {**(self._fit_final or {}), **test})

    def state_dict(self) -> dict[str, Any]:
        # Checkpointed so a resumed run's report still shows the curves from before the restart.
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Reports before one x-axis kept validation over epochs ("epoch"): those points cannot be
        # placed on the step axis and are dropped.
        self.history = {"step": dict(state_dict["history"].get("step", {}))}
