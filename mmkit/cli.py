"""``mmkit fit|validate|test|predict --config recipes/....yaml``, ``mmkit export``, ``mmkit benchmark`` and ``mmkit explain``.

A LightningCLI over every mmkit module and data module: the recipe YAML names classes by
``class_path`` and ``--print_config`` shows every knob. Run-time values never go in YAML: the
model's transforms and tokenizer are linked into the data module when both are instantiated.

As a command, errors print as ``mmkit: error: <the root cause>`` (exit status 2 for a refused
configuration or command line, 1 for a failure while running); ``--debug`` or ``MMKIT_DEBUG=1``
adds the traceback. Called from Python (``main(argv)``), the caller gets the exception.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

from lightning.fabric.plugins.environments import SLURMEnvironment  # noqa: E402
from lightning.fabric.utilities.rank_zero import rank_zero_only, rank_zero_warn  # noqa: E402
from jsonargparse import Namespace  # noqa: E402
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary  # noqa: E402
from lightning.pytorch.callbacks import ProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from mmkit.callbacks.bad_samples import BadSampleCallback  # noqa: E402
from mmkit.callbacks.embedding_writer import EmbeddingWriter  # noqa: E402
from mmkit.callbacks.model_summary import ModelSummary  # noqa: E402
from mmkit.callbacks.progress_bar import step_progress_bar  # noqa: E402
from mmkit.callbacks.progress_log import ProgressLog  # noqa: E402
from mmkit.callbacks.resume_state import ResumeState  # noqa: E402
from mmkit.callbacks.throughput import Throughput  # noqa: E402
from mmkit import run_lock  # noqa: E402
from mmkit.checkpoint_io import CheckpointLoadError, load_checkpoint, remove_write_debris, resolve_ckpt_path, verify_checksum  # noqa: E402
from mmkit.checksum import remove_with_sidecar  # noqa: E402
from mmkit.file_modes import give_folder_usual_modes  # noqa: E402
from mmkit.data.datamodule import ImageTextDataModule  # noqa: E402
from mmkit.loggers import CSVLogger as ContinuingCSVLogger  # noqa: E402
from mmkit.techniques.base import DualEncoderModule  # noqa: E402
from mmkit.run_config import (  # noqa: E402
    EVAL_DIR_ENV, EVAL_SUBCOMMANDS, SaveRunConfig, checkpoint_differences, claim_eval_dir, continue_csv_logs,
    log_to_run_folder, redirect_eval_outputs, validation_never_runs,
)
from mmkit.parallel.sharded_checkpoint import verify_sharded_checkpoint  # noqa: E402
from mmkit.parallel.fsdp2_strategy import FSDP2Strategy  # noqa: E402,F401  (registers `strategy: fsdp2`)
from mmkit.parallel.deepspeed_strategy import DeepSpeedStrategy  # noqa: E402,F401  (registers `strategy: mmkit_deepspeed_*`)


DESCRIPTION = (
    "mmkit: image-text alignment training (CLIP, metric learning, adversarial, continual, distillation) "
    "on PyTorch Lightning, configured by recipe YAML."
)
EPILOG = (
    "subcommands: fit, validate, test, predict (add --help after one for its options), and "
    "export (mmkit export --help): write a checkpoint's model in its native format; "
    "benchmark (mmkit benchmark --help): zero-shot and retrieval benchmarks of any model; "
    "explain (mmkit explain --help): which image patches and caption tokens make a match's score. "
    "Errors print one message; run with --debug or MMKIT_DEBUG=1 for the traceback."
)
DEBUG_ENV = "MMKIT_DEBUG"
# mmkit and the classes it configures refuse a setting with these; inside a run, before its first
# batch, they are still the configuration's fault (a data source without a column, a missing file).
CONFIGURATION_ERRORS = (ValueError, TypeError, LookupError, FileNotFoundError, NotADirectoryError, argparse.ArgumentError)


class UsageError(argparse.ArgumentError):
    """A command line that cannot be parsed, with the nearest valid option where one is close."""

    def __init__(self, message: str):
        super().__init__(None, message)


class MMKitCLI(LightningCLI):
    eval_dir: str | None = None  # validate/test/predict: the folder everything the run writes goes to

    def init_parser(self, **kwargs):
        # Parse errors are raised (ArgumentError), not printed with the usage and a config dump:
        # `command` prints their cause. No abbreviations: `--trainer.max_step 5` would silently
        # set max_steps; it is refused with the nearest option instead.
        kwargs.setdefault("exit_on_error", False)
        kwargs.setdefault("allow_abbrev", False)
        if "description" not in kwargs:  # the main parser (subcommand parsers get theirs from Lightning)
            kwargs.update(description=DESCRIPTION, epilog=EPILOG, prog="mmkit")
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            "model", "data.init_args.preprocessing", compute_fn=lambda m: m.preprocessing, apply_on="instantiate"
        )
        # Always-on callbacks, configurable under their own keys in the recipe.
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(BadSampleCallback, "bad_samples")
        parser.add_lightning_class_args(ResumeState, "resume_state")  # RNG states in checkpoints: exact resume
        # Plain step/validation lines when there is no progress bar (stdout not a terminal).
        parser.add_lightning_class_args(ProgressLog, "progress_log")
        parser.add_argument("--test_after_fit", type=bool, default=True, help="run `test` after `fit` when the data has a test split")
        parser.add_argument(
            "--eval_dir", type=Optional[str], default=None,
            help="validate/test/predict: the folder for everything they write (must be new or empty); "
                 "default: a new <trainer.default_root_dir>/eval/<subcommand>-<time>/",
        )
        parser.set_defaults({"trainer.use_distributed_sampler": False})

    def parse_arguments(self, parser, args) -> None:
        # LightningCLI's parse, with validation after a CSV/TensorBoard logger without a save_dir
        # (the recipes leave it out) is given the run folder, trainer.default_root_dir: the one
        # folder knob. Validated as is, the missing save_dir would fail.
        try:
            if isinstance(args, (dict, Namespace)):
                self.config = parser.parse_object(args, _skip_validation=True)
            else:
                self.config = parser.parse_args(args, _skip_validation=True)
        except argparse.ArgumentError as e:
            unknown = self._unknown_option(str(e), list(sys.argv[1:] if args is None else args))
            if unknown is None:
                raise
            raise UsageError(unknown) from e
        subcommand = self.config.get("subcommand")
        note = log_to_run_folder(self.config[subcommand] if subcommand else self.config)
        if note and subcommand == "fit" and rank_zero_only.rank == 0:
            print(note, flush=True)
        parser.validate(self.config)
        # Check a given checkpoint file now, so that a truncated or corrupt one fails with its name,
        # not a bare unpickling error later; and say where its hyperparameters differ from the config.
        # A folder that validate/test/predict will hand to the strategy: every pickle in it is checked
        # (fit checks its checkpoint in before_fit).
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and subcommand in EVAL_SUBCOMMANDS and Path(ckpt_path).is_dir():
            verify_sharded_checkpoint(ckpt_path)
        if ckpt_path and Path(ckpt_path).is_file():
            hparams = load_checkpoint(ckpt_path, mmap=True).get("hyper_parameters") or {}
            verify_checksum(ckpt_path)  # also for validate/test/predict, whose CheckpointIO is Lightning's
            differing = checkpoint_differences(hparams, self.config[subcommand].get("model"))
            if differing and rank_zero_only.rank == 0:
                print(f"mmkit: {ckpt_path} was trained with other values of {', '.join(differing)}; "
                      "the config's (recipe and command line) are used", flush=True)

    def _unknown_option(self, message: str, words: list[str]) -> str | None:
        """``unknown option --X (did you mean --Y?)`` for the first option argparse reported as
        unrecognized, with the nearest option string of the subcommand's parser; None for any
        other parse error."""
        prefix = "unrecognized arguments: "
        parsers = getattr(self, "_subcommand_parsers", {})
        subcommand = next((w for w in words if w in parsers), None)
        options = [w.split("=", 1)[0] for w in message[len(prefix):].split() if w.startswith("--")]
        if not message.startswith(prefix) or subcommand is None or not options:
            return None
        known = [o for o in parsers[subcommand]._option_string_actions if o.startswith("--")]
        near = difflib.get_close_matches(options[0], known, n=1, cutoff=0.6)
        return f"unknown option {options[0]}" + (f" (did you mean {near[0]}?)" if near else "")

    def _parse_ckpt_path(self) -> None:
        # Lightning would parse the checkpoint's hyperparameters over the config here, after the
        # command line: an override (zero-shot classes, templates, ...) would show in
        # --print_config and then be ignored. What the user wrote is used instead; the weights
        # still come from the checkpoint, and a different architecture fails in load_state_dict.
        pass

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand in EVAL_SUBCOMMANDS:
            self.eval_dir = redirect_eval_outputs(config, self.subcommand)
        elif config.get("eval_dir"):
            raise ValueError("--eval_dir is for validate, test and predict; fit writes to trainer.default_root_dir")
        if self.subcommand == "fit":
            continue_csv_logs(config)

    def after_instantiate_classes(self) -> None:
        if self.eval_dir is not None and self.trainer.is_global_zero:
            claim_eval_dir(self.eval_dir, fresh=not self._get(self.config, "eval_dir"))
            print(f"mmkit: {self.subcommand} writes to {self.eval_dir}", flush=True)
            os.environ[EVAL_DIR_ENV] = self.eval_dir  # for the ranks Lightning launches next

    def instantiate_trainer(self, **kwargs):
        # A progress bar only where someone watches: piped to a file (SLURM, nohup, CI) it would
        # write a carriage-return redraw per update; ProgressLog prints plain lines there instead.
        # `--trainer.enable_progress_bar true|false` decides explicitly.
        config = self._get(self.config_init, "trainer", default={})
        bar = config.get("enable_progress_bar")
        if bar is None:
            bar = kwargs.setdefault("enable_progress_bar", sys.stdout.isatty())
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks = kwargs["callbacks"] = [*callbacks, step_progress_bar()]  # global step of max_steps, readable lr
        # Lightning's default summary would say "Total FLOPs: 0" (Throughput counts them instead).
        if config.get("enable_model_summary") is not False and not any(isinstance(c, LightningModelSummary) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, ModelSummary()]
        return super().instantiate_trainer(**kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        # A fit locks its run folder (global rank 0) from before `--ckpt_path last` is resolved to
        # after the test that follows it, so a second fit there stops before it reads or writes
        # anything. validate/test/predict write to an eval folder of their own: no lock.
        try:
            if subcommand != "fit" or not self.trainer.is_global_zero:
                return super()._run_subcommand(subcommand)
            folder = run_lock.acquire(self.trainer.default_root_dir)
            try:
                # before Lightning looks for SLURM's hpc_ckpt_<N> there (the digits of every such name)
                remove_write_debris(folder)
                super()._run_subcommand(subcommand)
            finally:
                run_lock.release(folder)
        except Exception as e:
            # for `command`: whether the error came once batches were being run (not the config's fault)
            e.mmkit_batches_begun = _batches_begun(self.trainer)
            raise

    def before_fit(self) -> None:
        # `--ckpt_path last`: the checkpoint furthest into training that loads and matches its
        # digest, skipping (and naming) broken ones; an explicit path is checked now, so a broken
        # file fails with its name before training.
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = resolve_ckpt_path(config.get("ckpt_path"), self.trainer)
        # A resumed fit continues metrics.csv instead of starting it again (mmkit.loggers).
        connector = self.trainer._checkpoint_connector
        resuming = config["ckpt_path"] is not None or (
            SLURMEnvironment.detect() and connector._hpc_resume_path is not None)  # Lightning loads it by itself
        for logger in self.trainer.loggers:
            if isinstance(logger, ContinuingCSVLogger):
                logger.resuming = bool(resuming)
        if getattr(self.datamodule, "val", None) is not None and (why := validation_never_runs(self.trainer)):
            rank_zero_warn(f"mmkit: {why}", category=UserWarning)

    def after_fit(self) -> None:
        # A finished fit makes SLURM preemption checkpoints stale; left in place, Lightning would
        # load them for the test below and for any rerun of the job script.
        if self.trainer.is_global_zero:
            remove_hpc_checkpoints(self.trainer.default_root_dir)
        self.trainer.strategy.barrier("mmkit_after_fit")
        dm = self.datamodule
        if self._get(self.config, "test_after_fit") and getattr(dm, "test", None) is not None:
            self.trainer.test(self.model, datamodule=dm)

    def before_predict(self) -> None:
        if not any(isinstance(c, EmbeddingWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(EmbeddingWriter())


def _batches_begun(trainer) -> bool:
    loops = [trainer.fit_loop.epoch_loop, trainer.fit_loop.epoch_loop.val_loop, trainer.validate_loop,
             trainer.test_loop, trainer.predict_loop]
    return any(getattr(getattr(loop, "batch_progress", None), "total", None) is not None
               and loop.batch_progress.total.started > 0 for loop in loops)


def remove_hpc_checkpoints(root: str | Path) -> list[Path]:
    removed = sorted(Path(root).glob("hpc_ckpt_*.ckpt"))
    for path in removed:
        remove_with_sidecar(path)
        print(f"mmkit: fit finished; removed the preemption checkpoint {path}")
    return removed


def export(argv: list[str]) -> None:
    """``mmkit export --config RECIPE --ckpt_path CKPT --out DIR [--model.… overrides]``: write a
    checkpoint's model in its native loadable format (open_clip local-dir or transformers
    folders). Only the recipe's ``model`` section is used: no data needs to exist."""
    ap = argparse.ArgumentParser(prog="mmkit export", description=export.__doc__)
    ap.add_argument("--config", required=True, action="append", help="recipe YAML (repeatable, merged in order)")
    ap.add_argument("--ckpt_path", required=True)
    ap.add_argument("--out", required=True)
    args, overrides = ap.parse_known_args(argv)
    module = module_from_checkpoint(args.config, args.ckpt_path, overrides, "mmkit export")
    out = module.model.export(Path(args.out))
    give_folder_usual_modes(out)
    print(f"mmkit: exported {args.ckpt_path} to {out}")


def module_from_checkpoint(configs: list[str], ckpt_path: str | None, overrides: list[str], prog: str) -> DualEncoderModule:
    """The recipes' ``model`` (merged in order, then ``--model.…`` overrides), built, with the
    weights of ``ckpt_path`` (checked against its digest first) when one is given."""
    import yaml
    from jsonargparse import ArgumentParser

    if ckpt_path and Path(ckpt_path).is_file():
        verify_checksum(ckpt_path)  # damaged weights must not be exported or scored
    model_cfg: dict = {}
    for path in configs:
        section = (yaml.safe_load(Path(path).read_text()) or {}).get("model") or {}
        if section.get("class_path") not in (None, model_cfg.get("class_path")):
            model_cfg = {}
        model_cfg = _merge(model_cfg, section)
    parser = ArgumentParser(prog=prog)
    parser.add_subclass_arguments(DualEncoderModule, "model", required=True)
    cfg = parser.parse_args(["--model", json.dumps(model_cfg), *overrides])
    module = parser.instantiate_classes(cfg).model
    module.configure_model()
    if ckpt_path:
        module.load_state_dict(_checkpoint_state_dict(ckpt_path))
    return module


def _checkpoint_state_dict(path: str) -> dict:
    """The module state dict of a Lightning ``.ckpt`` file, or of a sharded checkpoint directory
    (DeepSpeed's, or FSDP2's ``torch.distributed.checkpoint`` folder), merged to full weights in
    memory. Nothing is unpickled that could run code: files load with ``weights_only``, folders are
    checked file by file before they are merged (``mmkit.parallel.sharded_checkpoint``)."""
    from mmkit.parallel.deepspeed_support import consolidated_state_dict
    from mmkit.parallel.sharded_checkpoint import (
        distributed_checkpoint_state_dict,
        is_deepspeed_checkpoint,
        is_distributed_checkpoint,
    )

    if is_deepspeed_checkpoint(path):
        return consolidated_state_dict(path)
    if is_distributed_checkpoint(path):
        return distributed_checkpoint_state_dict(path)
    if Path(path).is_dir():
        verify_sharded_checkpoint(path)  # raises: a folder of neither kind
    ckpt = load_checkpoint(path)
    if "state_dict" not in ckpt:
        raise CheckpointLoadError(f"checkpoint {path} has no 'state_dict' (not a Lightning checkpoint of an mmkit module)")
    return ckpt["state_dict"]


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# Lightning info lines that say nothing to an mmkit user: adverts, and the note that the summary
# mmkit configures itself (without "Total FLOPs: 0") replaces Lightning's default one.
_NOISE = ("💡 Tip:", "Trainer already configured with model summary callbacks")


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NOISE)


def quiet_lightning_tips() -> None:
    """Drop Lightning's "💡 Tip: ... litlogger / litmodels" adverts and its note on mmkit's own
    model summary (``rank_zero_info`` at every Trainer construction); both rank-zero loggers,
    whichever Lightning package set it last."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


def run_cli(argv: list[str] | None = None) -> MMKitCLI:
    """Run ``mmkit fit|validate|test|predict ...`` and return the CLI (its model, trainer, ...)."""
    quiet_lightning_tips()
    return MMKitCLI(
        DualEncoderModule,
        ImageTextDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=argv,  # None: LightningCLI reads sys.argv itself (and does not warn)
    )


def main(argv: list[str] | None = None) -> None:
    """The ``mmkit`` command (``argv`` None: ``sys.argv``); given ``argv`` from Python, errors are
    raised to the caller instead of printed."""
    if argv is None:
        sys.exit(command())
    _dispatch(list(argv), list(argv))


def _dispatch(words: list[str], cli_args: list[str] | None) -> None:
    from mmkit.parallel.deepspeed_support import import_quietly_if_named

    import_quietly_if_named(words)  # keeps DeepSpeed's log lines out of stdout (--print_config)
    if words and words[0] == "export":
        export(words[1:])
        return
    if words and words[0] == "benchmark":
        from mmkit.benchmarks.command import benchmark

        benchmark(words[1:])
        return
    if words and words[0] == "explain":
        from mmkit.explain.command import explain

        explain(words[1:])
        return
    run_cli(cli_args)  # None: LightningCLI reads sys.argv itself (and does not warn)


def command(words: list[str] | None = None) -> int:
    """Run ``mmkit WORDS`` (None: this process's ``sys.argv``) as the command does and return its
    exit status: 0; 2 when the configuration or command line was refused; 1 for a failure while
    running. An error prints as ``mmkit: error: <its root cause>`` on stderr, after the traceback
    with ``--debug`` (anywhere on the line) or ``MMKIT_DEBUG=1``."""
    own = words is None
    words = list(sys.argv[1:] if own else words)
    debug = "--debug" in words or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    words = [w for w in words if w != "--debug"]
    if own:
        sys.argv[1:] = words  # the ranks Lightning launches rerun sys.argv: they inherit the switch as
        if debug:             # the environment variable instead
            os.environ[DEBUG_ENV] = "1"
    try:
        _dispatch(words, None if own else words)
    except Exception as e:  # SystemExit (--help, --print_config, Preempted) passes through
        if debug:
            traceback.print_exc()
        hint = "" if debug else f" (run with {DEBUG_ENV}=1 for the traceback)"
        message = error_message(e)
        message = message.removeprefix("mmkit: ")  # some already say who speaks
        print(f"mmkit: error: {message}{hint}", file=sys.stderr, flush=True)
        return error_status(e)
    return 0


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from, outermost first."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        if type(chain[-1]).__module__.startswith("mmkit."):
            break  # mmkit's own errors already say what went wrong (RunFolderLocked, not the flock it caught)
        chain.append(cause)
    return chain


def _from_jsonargparse(error: BaseException) -> bool:
    """Whether jsonargparse raised ``error`` itself (a value it refused), not a class it called."""
    frames = traceback.extract_tb(error.__traceback__)
    return isinstance(error, argparse.ArgumentError) or bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename


def error_message(error: BaseException) -> str:
    """The message of the root cause of ``error``: the exception a class raised while jsonargparse
    instantiated it, not jsonargparse's wrappers around it (which quote it with every other union
    member's complaint and the whole config). A complaint of jsonargparse's own (a file that does
    not exist, a value of the wrong type, an unknown key of a class) is named by its parser key."""
    chain = _chain(error)
    root = chain[-1]
    if isinstance(error, UsageError) or not _from_jsonargparse(root):
        return str(root if not isinstance(error, UsageError) else error)
    # jsonargparse wraps the innermost cause in "Problem with given class_path 'X':\n  <cause>"
    # (ValueError) and the outermost in 'Parser key "k":\n  ...' (ArgumentError, message only).
    problem = next((e for e in reversed(chain) if str(e).startswith("Problem with given class_path")), root)
    key = next((e.args[0] if isinstance(e, TypeError) else str(e) for e in chain
                if str(e).startswith('Parser key "')), "")
    key = key[len('Parser key "'):].split('"', 1)[0] if key else ""
    return f"{key}: {problem}" if key else str(problem)


def error_status(error: BaseException) -> int:
    """2: a refused configuration or command line (anything raised before the run, or a
    configuration error raised in it before its first batch); 1: a failure while running."""
    root = _chain(error)[-1]
    if not hasattr(error, "mmkit_batches_begun"):  # raised before the run: parsing, instantiation, checks
        return 2
    configuration = isinstance(root, CONFIGURATION_ERRORS) or isinstance(error, CONFIGURATION_ERRORS)
    return 2 if configuration and not error.mmkit_batches_begun else 1


if __name__ == "__main__":
    main()
