"""One folder knob: `--trainer.default_root_dir` moves the whole run (metrics, checkpoints, report,
export, saved config), with the CSV logger or TensorBoard's; and a fit whose validation can never
run says so at its start."""

import warnings
from pathlib import Path

import lightning as L
import pytest

from mmkit.cli import main
from mmkit.run_config import validation_never_runs

RECIPE = Path(__file__).parents[2] / "recipes" / "default.yaml"

SHORT = [
    "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "16",
    "--data.init_args.val.init_args.size", "32", "--data.init_args.test.init_args.size", "32",
    "--data.init_args.num_workers", "0",
]


def _assert_whole_run_in(run: Path, root: Path) -> None:
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "report" / "metrics.json").is_file()
    assert (run / "export" / "open_clip_model.safetensors").is_file()
    assert not (root / "runs" / "default").exists(), sorted(str(p) for p in (root / "runs" / "default").rglob("*"))


@pytest.mark.slow
def test_default_root_dir_alone_moves_the_whole_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(RECIPE), *SHORT, "--trainer.default_root_dir", "runs/csv"])
    run = tmp_path / "runs" / "csv"
    _assert_whole_run_in(run, tmp_path)
    assert "val/i2t_R@1" in (run / "metrics.csv").read_text()


@pytest.mark.slow
def test_tensorboard_logger_writes_its_events_into_the_run_folder(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(RECIPE), *SHORT, "--trainer.default_root_dir", "runs/tb",
          "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger"])  # as recipes/default.yaml shows
    run = tmp_path / "runs" / "tb"
    _assert_whole_run_in(run, tmp_path)
    assert not (run / "metrics.csv").exists()  # TensorBoard replaced the CSV logger
    assert list(run.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run)).Reload()  # every event file in the folder (fit's and test's)
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "val/i2t_R@1", "val/t2i_R@1", "test/i2t_R@1"):
        assert tag in scalars, scalars
    assert sorted(e.step for e in events.Scalars("train/loss")) == [0, 1, 2]


@pytest.mark.slow
def test_a_fit_that_can_never_validate_warns_once_with_the_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", str(RECIPE), *SHORT, "--trainer.max_steps", "2", "--trainer.val_check_interval", "5",
              "--test_after_fit", "false"])
    never = [str(w.message) for w in caught if "validation never runs" in str(w.message)]
    assert len(never) == 1, never
    assert "val_check_interval=5" in never[0] and "max_steps=2" in never[0]
    assert "val/i2t_R@1" not in (tmp_path / "runs" / "default" / "metrics.csv").read_text()  # indeed never ran


@pytest.mark.parametrize("settings, expected", [
    (dict(max_steps=40, val_check_interval=50, check_val_every_n_epoch=None), "val_check_interval=50 training batches, but the fit stops after max_steps=40"),
    (dict(max_steps=40, val_check_interval=100, check_val_every_n_epoch=None, accumulate_grad_batches=2), "= 80"),
    (dict(max_steps=40, val_check_interval=50, check_val_every_n_epoch=None, accumulate_grad_batches=2), None),  # batch 50 < 80
    (dict(max_epochs=2, check_val_every_n_epoch=3), "check_val_every_n_epoch=3, but the fit stops after max_epochs=2"),
    (dict(max_steps=40, val_check_interval=40, check_val_every_n_epoch=None), None),
    (dict(max_steps=40, val_check_interval=50, check_val_every_n_epoch=None, limit_val_batches=0), None),
    (dict(max_steps=40, val_check_interval=0.5), None),  # a fraction of each epoch
    (dict(max_epochs=3, check_val_every_n_epoch=3), None),
])
def test_validation_never_runs_reads_the_trainer_settings(settings, expected):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **settings)
    why = validation_never_runs(trainer)
    if expected is None:
        assert why is None
    else:
        assert why is not None and expected in why, why
