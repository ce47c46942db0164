"""A CSV logger whose ``metrics.csv`` survives a resume.

Lightning's ``CSVLogger`` with a fixed version (the recipes' ``name: "", version: ""``) writes a
resumed fit into the same folder, and its writer deletes the existing ``metrics.csv`` when it
starts: the history before the restart is lost. ``CSVLogger`` here, told the fit resumes
(``resuming = True``; ``mmkit fit`` sets it, and puts this class in place of Lightning's when a
recipe names that one), keeps the file and continues it.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_warn

from mmkit.file_modes import give_usual_mode


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` (same arguments) that, when ``resuming`` is set before the fit
    starts logging, keeps the rows already in ``metrics.csv`` instead of starting a new file.

    Rows logged by the interrupted run after the checkpoint the fit resumes from (their ``step``
    is at or past the first step the resumed fit logs) are dropped: the resumed fit trains those
    steps again and logs them anew, so no step appears twice. The header is the union of the old
    and new columns (Lightning's writer rewrites the file when new keys appear; here the old keys
    are its starting point)."""

    resuming: bool = False

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            writer = _ContinuingWriter if self.resuming else _NewRunWriter
            self._experiment = writer(log_dir=self.log_dir)
        return self._experiment


class _NewRunWriter(ExperimentWriter):
    """Lightning's writer, warning only when it replaces an earlier run's ``metrics.csv``.

    Lightning's warns whenever the folder is not empty ("Previous log files ... will be deleted"),
    which mmkit's own run files (the run lock, the saved config) make true of every fresh run; it
    only ever deletes ``metrics.csv``."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            rank_zero_warn(
                f"mmkit: {self.metrics_file_path} holds an earlier run's metrics; this run replaces them "
                "(continue that run with --ckpt_path last, or give this one its own folder with "
                "--trainer.default_root_dir)")
            self._fs.rm_file(self.metrics_file_path)


class _ContinuingWriter(ExperimentWriter):
    """Lightning's writer, starting from the rows of an existing ``metrics.csv``."""

    def __init__(self, log_dir: str) -> None:
        self._previous: list[dict[str, Any]] | None = None
        super().__init__(log_dir=log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                reader = csv.DictReader(f)
                self._previous = list(reader)
                self.metrics_keys = list(reader.fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning's deletes metrics.csv here

    def save(self) -> None:
        if self._previous is not None and self.metrics:
            # The first rows of the resumed fit: the old ones from its first step on are replaced.
            first = min(_step(row) for row in self.metrics)
            kept = [row for row in self._previous if _step(row) < first]
            self.metrics_keys = sorted(set(self.metrics_keys).union(*self.metrics))
            self._write(self.metrics_keys, kept)
            self._previous = None
        super().save()

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        self._write(fieldnames, rows)

    def _write(self, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
        # The whole history is in this file now: a kill during the rewrite must not truncate it.
        path = self.metrics_file_path
        if not _is_local_file_protocol(path):
            with self._fs.open(path, "w", newline="") as f:
                _write_rows(f, fieldnames, rows)
            return
        fd, tmp = tempfile.mkstemp(prefix=".metrics.", suffix=".tmp", dir=os.path.dirname(path))
        try:
            give_usual_mode(fd)
            with os.fdopen(fd, "w", newline="") as f:
                _write_rows(f, fieldnames, rows)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def _write_rows(f, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
    writer = csv.DictWriter(f, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)


def _step(row: dict[str, Any]) -> float:
    try:
        return float(row.get("step"))  # read back from the file: a string
    except (TypeError, ValueError):
        return -math.inf  # a row without a step is kept
