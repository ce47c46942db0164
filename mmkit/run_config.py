"""How a CLI run's configuration is settled before its objects are built: where validate, test
and predict write (a folder of their own, never the fit's), a fit's logger that continues
``metrics.csv`` on resume, the saved ``config.yaml``, and how a checkpoint's hyperparameters
differ from the config (the config wins; see ``MMKitCLI._parse_ckpt_path``)."""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from mmkit.loggers import CSVLogger as ContinuingCSVLogger

EVAL_SUBCOMMANDS = ("validate", "test", "predict")
# The eval folder rank zero chose, for the processes Lightning launches for the other local ranks
# (each runs this CLI again and must not pick a folder of its own). Read only where LOCAL_RANK > 0:
# in the launching process itself the value may be left from an earlier run in the same process.
EVAL_DIR_ENV = "MMKIT_EVAL_DIR"


class SaveRunConfig(SaveConfigCallback):
    """Saves the run's resolved config as ``config.yaml``: a fit's into its log folder, with
    ``ckpt_path`` left out (a later ``mmkit validate --config <run>/config.yaml`` must not load a
    checkpoint unasked); validate/test/predict's into their own eval folder (their
    ``default_root_dir``, see :func:`redirect_eval_outputs`), with the checkpoint they evaluated."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        fit = stage == "fit"
        folder = trainer.log_dir if fit else trainer.default_root_dir  # log_dir is a collective: every rank asks
        if trainer.is_global_zero:
            config = self.config.clone()
            if fit:
                config.ckpt_path = None
            get_filesystem(folder).makedirs(folder, exist_ok=True)
            self.parser.save(config, os.path.join(folder, self.config_filename), skip_unset=False,
                             overwrite=self.overwrite, multifile=self.multifile)
        self.already_saved = True


def checkpoint_differences(hparams: dict[str, Any], model_config: Namespace | None) -> list[str]:
    """The ``model`` keys whose value in a checkpoint's ``hyper_parameters`` differs from the
    config's (``model.class_path``, ``model.init_args.<name>``)."""
    hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
    class_path = hparams.pop("_class_path", None)  # written by LightningCLI's instantiator
    model_config = model_config or Namespace()
    differing = []
    if class_path and _import(class_path) is not _import(model_config.get("class_path") or ""):
        differing.append("model.class_path")
    init_args = model_config.get("init_args") or Namespace()
    for key, value in hparams.items():
        if key not in init_args or _plain(init_args[key]) != _plain(value):
            differing.append(f"model.init_args.{key}")
    return differing


def redirect_eval_outputs(config: Namespace, subcommand: str) -> str:
    """Point everything a validate/test/predict run writes at a folder of its own, so that it
    never overwrites a fit's ``metrics.csv``, ``config.yaml`` or anything else: ``--eval_dir``, or
    a new ``<trainer.default_root_dir>/eval/<subcommand>-<time>[-N]``. Sets that folder as the
    run's ``default_root_dir`` and as the ``save_dir`` of its CSV and TensorBoard loggers (with
    no name/version subfolders). Other loggers (W&B, MLflow, ...) start runs of their own anyway.
    Returns the folder; nothing is created here (see :func:`claim_eval_dir`)."""
    trainer = config.trainer
    inherited = os.environ.get(EVAL_DIR_ENV) if int(os.environ.get("LOCAL_RANK") or 0) > 0 else None
    folder = config.get("eval_dir") or inherited or new_eval_dir(trainer.default_root_dir or os.getcwd(), subcommand)
    trainer.default_root_dir = folder
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for logger in loggers:
        if isinstance(logger, Namespace) and _is_subclass(logger.get("class_path"), (CSVLogger, TensorBoardLogger)):
            if logger.get("init_args") is None:
                logger.init_args = Namespace()
            logger.init_args.save_dir, logger.init_args.name, logger.init_args.version = folder, "", ""
    return folder


def log_to_run_folder(config: Namespace) -> str | None:
    """A fit's run folder is ``trainer.default_root_dir``: a CSV or TensorBoard logger whose
    ``save_dir`` is not set (the recipes leave it out) writes there, so that one setting moves
    metrics, checkpoints, report, export and the saved config together. A ``save_dir`` set
    explicitly is kept; when it differs from ``default_root_dir`` (checkpoints and the run lock
    stay there) a note is returned naming both folders."""
    trainer = config.trainer
    root = trainer.default_root_dir or os.getcwd()  # Lightning's own default
    notes = []
    for logger in _loggers(config):
        if isinstance(logger, Namespace) and _is_subclass(logger.get("class_path"), (CSVLogger, TensorBoardLogger)):
            if logger.get("init_args") is None:
                logger.init_args = Namespace()
            if logger.init_args.get("save_dir") is None:
                logger.init_args.save_dir = root
            elif os.path.abspath(str(logger.init_args.save_dir)) != os.path.abspath(str(root)):
                notes.append(f"{logger.class_path.rpartition('.')[2]} writes to {logger.init_args.save_dir} (its save_dir)")
    if not notes:
        return None
    return (f"mmkit: {'; '.join(notes)}, while checkpoints go to trainer.default_root_dir {root}; "
            "to keep the run in one folder set only --trainer.default_root_dir and leave the logger's save_dir out")


def continue_csv_logs(config: Namespace) -> None:
    """A fit's Lightning ``CSVLogger`` becomes ``mmkit.loggers.CSVLogger`` (a subclass, same
    arguments), which keeps the rows of ``metrics.csv`` when the fit resumes."""
    for logger in _loggers(config):
        if isinstance(logger, Namespace) and _import(logger.get("class_path") or "") is CSVLogger:
            logger.class_path = f"{ContinuingCSVLogger.__module__}.{ContinuingCSVLogger.__name__}"


def validation_never_runs(trainer: L.Trainer) -> str | None:
    """Why a fit with these trainer settings would never validate, or None. Lightning accepts
    them silently: with ``check_val_every_n_epoch: null`` validation runs every
    ``val_check_interval`` training batches counted over the whole fit, so an interval past the
    last batch (``max_steps`` × ``accumulate_grad_batches``) never comes; with epochs, an interval
    of more epochs than ``max_epochs`` never does either."""
    if not trainer.limit_val_batches:
        return None  # validation switched off on purpose
    every_epochs, interval = trainer.check_val_every_n_epoch, trainer.val_check_interval
    max_steps, max_epochs, accumulate = trainer.max_steps, trainer.max_epochs, trainer.accumulate_grad_batches
    if every_epochs is None and isinstance(interval, int) and max_steps is not None and max_steps > 0:
        batches = max_steps * accumulate
        if interval > batches:
            return (f"validation never runs: val_check_interval={interval} training batches, but the fit stops after "
                    f"max_steps={max_steps}" + (f" × accumulate_grad_batches={accumulate} = {batches}" if accumulate > 1 else "")
                    + " (check_val_every_n_epoch=null counts batches over the whole fit); "
                    f"set val_check_interval to at most {batches}")
    if every_epochs and (max_steps is None or max_steps < 0) and max_epochs is not None and 0 < max_epochs < every_epochs:
        return (f"validation never runs: check_val_every_n_epoch={every_epochs}, but the fit stops after "
                f"max_epochs={max_epochs}; set check_val_every_n_epoch to at most {max_epochs}")
    return None


def new_eval_dir(root: str | Path, subcommand: str) -> str:
    """``<root>/eval/<subcommand>-<YYYYmmdd-HHMMSS>``, with ``-1``, ``-2``, ... if that exists."""
    base = os.path.join(str(root), "eval", f"{subcommand}-{time.strftime('%Y%m%d-%H%M%S')}")
    fs = get_filesystem(base)
    folder, n = base, 0
    while fs.exists(folder):
        n += 1
        folder = f"{base}-{n}"
    return folder


def claim_eval_dir(folder: str, fresh: bool) -> None:
    """Create the eval folder (global rank zero). A chosen ``fresh`` name must still be free; a
    folder given with ``--eval_dir`` may exist but must be empty."""
    fs = get_filesystem(folder)
    if fs.exists(folder) and (fresh or fs.ls(folder)):
        raise FileExistsError(
            f"mmkit: {folder} was created by another run meanwhile; run again" if fresh else
            f"mmkit: --eval_dir {folder} already holds files; give a new or empty folder "
            "(or leave --eval_dir out for a new one under <default_root_dir>/eval/)"
        )
    fs.makedirs(folder, exist_ok=True)


def _loggers(config: Namespace) -> list[Any]:
    logger = config.trainer.logger
    return logger if isinstance(logger, list) else [logger]


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return path  # compared as a name


def _is_subclass(path: str | None, classes: tuple[type, ...]) -> bool:
    cls = _import(path) if isinstance(path, str) else None
    return isinstance(cls, type) and issubclass(cls, classes)


def _plain(value: Any) -> Any:
    """A config or hyperparameter value as plain data (tuples as lists, namespaces as dicts)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
