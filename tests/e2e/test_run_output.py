"""What a `mmkit fit` shows when its stdout is not a terminal (SLURM, nohup, CI): plain step and
validation lines, no progress-bar redraws, none of the libraries' noise."""

import logging
import re
import sys
from pathlib import Path

from mmkit.callbacks.progress_bar import StepRichProgressBar
from mmkit.callbacks.progress_log import ProgressLog
from mmkit.cli import main, run_cli

RECIPE = Path(__file__).parents[2] / "recipes" / "default.yaml"
NOISE = ("💡 Tip", "litlogger", "litmodels", "initialized randomly", "sync_dist=True", "already configured with model summary")


def tiny(run: Path) -> list[str]:
    arch = Path(__file__).parents[1] / "models" / "tiny_test_arch.json"  # 1 layer at 16×16: fast on CPU
    return [
        "--config", str(RECIPE), "--model.init_args.model.init_args.arch", str(arch),
        "--model.init_args.model.init_args.image_size", "16",
        "--data.init_args.train.init_args.image_size", "16", "--data.init_args.val.init_args.image_size", "16",
        "--data.init_args.test.init_args.image_size", "16", "--trainer.max_steps", "8", "--trainer.val_check_interval", "8",
        "--trainer.log_every_n_steps", "4", "--trainer.default_root_dir", str(run),
        "--trainer.logger.init_args.save_dir", str(run), "--trainer.callbacks", "[]",
        "--trainer.enable_model_summary", "false", "--test_after_fit", "false",
        "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
        "--data.init_args.val.init_args.size", "16", "--data.init_args.eval_batch_size", "16",
        "--throughput.warmup", "1",
    ]


def test_fit_piped_to_a_file_prints_step_and_validation_lines_and_no_noise(tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO)
    main(["fit", *tiny(tmp_path / "run")])
    out, err = capfd.readouterr()
    lines = out.splitlines()
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert [ln.split(" |")[0] for ln in steps] == ["step 4/8 (50%)", "step 8/8 (100%)"], out
    assert re.fullmatch(r"step 8/8 \(100%\) \| epoch 0 \| loss [\d.]+ \(contrastive_loss [\d.]+\) \| "
                        r"lr \d\.\de-\d\d \| [\d.]+ samples/s \| ETA 00:00:00", steps[1]), steps[1]
    (val,) = [ln for ln in lines if ln.startswith("val ")]
    assert re.match(r"val step 8 \| val/i2t_R@1 [\d.]+ \| val/i2t_R@5 [\d.]+ \| ", val), val
    assert "\r" not in out + err  # no progress bar redraws in the log
    everything = out + err + "\n".join(r.getMessage() for r in caplog.records)
    assert not [n for n in NOISE if n in everything], everything


def test_in_a_terminal_the_step_progress_bar_replaces_the_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    cli = run_cli(["fit", *tiny(tmp_path / "run"), "--trainer.max_steps", "2"])
    assert isinstance(cli.trainer.progress_bar_callback, StepRichProgressBar)
    (log,) = [c for c in cli.trainer.callbacks if isinstance(c, ProgressLog)]
    assert not log._active and not re.search(r"^step \d", capsys.readouterr().out, re.M)
