"""The `mmkit` command prints a refused configuration as one `mmkit: error: <root cause>` line
and exit status 2, not jsonargparse's traceback and config dump; the traceback comes back with
MMKIT_DEBUG=1 or --debug. Most cases run `mmkit.cli.command` (what the console script calls) in
this process; the console script itself runs in a subprocess once with and once without the switch."""

from __future__ import annotations

import os
import subprocess

import pytest

from mmkit.checksum import ChecksumMismatch
from mmkit.cli import command, error_status
from mmkit.techniques.base import NonFiniteLossError
from tests.user_runs import MMKIT, REPO

RECIPE = str(REPO / "recipes" / "default.yaml")
BAD_NUMBER = "--model.init_args.warmup_steps=-10"
BAD_NUMBER_MESSAGE = "mmkit: error: CLIPPretrain: warmup_steps must be >= 0, got -10"


def _fit(tmp_path, *overrides: str) -> list[str]:
    return ["fit", "--config", RECIPE, f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", *overrides]


def _run_command(tmp_path, words, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run([MMKIT, *words], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _assert_one_error(err: str, message: str) -> None:
    assert message in err, err
    assert "Traceback" not in err and "Given value" not in err and "Namespace(" not in err, err
    assert err.count("mmkit: error:") == 1, err
    assert "(run with MMKIT_DEBUG=1 for the traceback)" in err


def test_console_script_prints_the_cause_and_exits_2(tmp_path):
    done = _run_command(tmp_path, _fit(tmp_path, BAD_NUMBER), env={"MMKIT_DEBUG": ""})
    assert done.returncode == 2, done.stderr[-3000:]
    _assert_one_error(done.stderr, BAD_NUMBER_MESSAGE)
    assert "Given value" not in done.stdout and "Traceback" not in done.stdout
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.csv"))


def test_console_script_shows_the_traceback_with_mmkit_debug(tmp_path):
    done = _run_command(tmp_path, _fit(tmp_path, BAD_NUMBER), env={"MMKIT_DEBUG": "1"})
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr
    assert "config_checks.py" in done.stderr  # the frame that raised, inside the class's __init__
    assert done.stderr.rstrip().endswith(BAD_NUMBER_MESSAGE)


def test_debug_flag_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MMKIT_DEBUG", raising=False)
    assert command(_fit(tmp_path, BAD_NUMBER, "--debug")) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and BAD_NUMBER_MESSAGE in err
    assert "run with MMKIT_DEBUG=1" not in err  # it is on already


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.init_args.model.init_args.pretrained=/no/such/weights.safetensors"],
         "mmkit: error: OpenCLIP: pretrained='/no/such/weights.safetensors' is not a file"),
        (["--data.init_args.max_bad_fraction=-1"],
         r"mmkit: error: ImageTextDataModule: max_bad_fraction must be in [0, 1], got -1"),
        (["--config", "/no/such/recipe.yaml"], "mmkit: error: config: File does not exist: '/no/such/recipe.yaml'"),
        (["--trainer.max_steps", "abc"], "mmkit: error: trainer.max_steps: Expected a <class 'int'>. Got value: abc"),
        (["--model.init_args.warmup_stepz", "5"],
         "mmkit: error: model: Problem with given class_path 'mmkit.CLIPPretrain':\n  Option 'warmup_stepz' is not accepted"),
    ],
    ids=["missing-weights-file", "numeric-range", "missing-recipe", "wrong-type", "unknown-class-argument"],
)
def test_configuration_error_is_one_message_and_status_2(tmp_path, capsys, monkeypatch, overrides, message):
    monkeypatch.delenv("MMKIT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert command(_fit(tmp_path, *overrides)) == 2
    _assert_one_error(capsys.readouterr().err, message)


def test_misspelled_option_suggests_the_nearest(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MMKIT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    # argparse would take the prefix as an abbreviation of --trainer.max_steps and train on.
    assert command(_fit(tmp_path, "--trainer.max_step", "5")) == 2
    _assert_one_error(capsys.readouterr().err,
                      "mmkit: error: unknown option --trainer.max_step (did you mean --trainer.max_steps?)")
    assert not list(tmp_path.rglob("metrics.csv"))
    assert command(_fit(tmp_path, "--no_such_thing_at_all=1")) == 2
    err = capsys.readouterr().err
    assert "mmkit: error: unknown option --no_such_thing_at_all" in err and "did you mean" not in err


def test_help_describes_mmkit_and_lists_its_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        command(["--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage: mmkit ")
    assert "image-text alignment training" in out
    for subcommand in ("fit", "validate", "test", "predict", "export"):
        assert f" {subcommand}" in out, subcommand
    assert "MMKIT_DEBUG=1" in out


def _raised(error: Exception, batches_begun: bool | None) -> Exception:
    try:
        raise error
    except Exception as e:
        if batches_begun is not None:
            e.mmkit_batches_begun = batches_begun
        return e


@pytest.mark.parametrize(
    "error, batches_begun, status",
    [
        (ValueError("a setting"), None, 2),                  # parsing / instantiation
        (ChecksumMismatch("a --ckpt_path"), None, 2),         # checked before the run
        (ValueError("manifest has no column"), False, 2),     # data setup, before the first batch
        (FileNotFoundError("no manifest"), False, 2),
        (ValueError("from a training step"), True, 1),        # a failure while running
        (NonFiniteLossError("loss is nan"), True, 1),
        (NonFiniteLossError("loss is nan"), False, 1),        # not a configuration error at all
        (RuntimeError("run folder locked"), False, 1),
    ],
)
def test_exit_status_tells_configuration_from_run_failures(error, batches_begun, status):
    assert error_status(_raised(error, batches_begun)) == status


def test_error_during_the_run_prints_one_line_and_status_1(tmp_path, capsys, monkeypatch):
    from mmkit.techniques.base import DualEncoderModule

    def fail(self, *args, **kwargs):
        raise NonFiniteLossError("train/loss is nan at step 0")

    monkeypatch.delenv("MMKIT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(DualEncoderModule, "training_step", fail)
    status = command(_fit(tmp_path, "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
                          "--data.init_args.num_workers=0", "--trainer.num_sanity_val_steps=0"))
    assert status == 1
    err = capsys.readouterr().err
    assert "mmkit: error: train/loss is nan at step 0" in err and "Traceback" not in err, err


def test_mmkit_s_own_error_is_the_message_not_the_error_it_caught():
    """RunFolderLocked is raised while handling the lock's BlockingIOError: the person reads
    mmkit's sentence, not "[Errno 11] Resource temporarily unavailable"."""
    from mmkit.cli import error_message
    from mmkit.run_lock import RunFolderLocked

    try:
        try:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        except BlockingIOError:
            raise RunFolderLocked("mmkit: runs/x is in use by another run (pid 1 on host)")
    except RunFolderLocked as e:
        assert error_message(e) == "mmkit: runs/x is in use by another run (pid 1 on host)"
