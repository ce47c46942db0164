"""Step checkpoints and resuming inside one process (the subprocess tests cover kills and
signals): interval and epoch-end saves, keeping the last K, weights_only loading of mmkit's own
checkpoints, `--ckpt_path last` in the CLI skipping a broken file, the sampler position, and
strategies that restore after setup."""

import json
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from mmkit import CLIPPretrain
from mmkit.callbacks import ResumeState, StepCheckpoint
from mmkit.checkpoint_io import AtomicCheckpointIO, CheckpointLoadError
from mmkit.cli import main
from mmkit.data import ImageTextDataModule, SyntheticShapes
from mmkit.models import OpenCLIP
from resume_helpers import NoisyClipLoss, StepRecorder
from runs import ARCH, write_config


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """12 steps of the subprocess tests' recipe through `mmkit.cli.main`, in this process:
    checkpoints at steps 5 and 10 and at the end (12, the end of epoch 0)."""
    run = tmp_path_factory.mktemp("cli_run")
    write_config(run)
    main(["fit", "--config", str(run / "recipe.yaml"), "--trainer.max_epochs", "1"])
    return run


def _copy(cli_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cli_run, run, symlinks=True)
    config = (run / "recipe.yaml").read_text().replace(str(cli_run), str(run))
    (run / "recipe.yaml").write_text(config)
    (run / "steps.jsonl").unlink()
    return run


def test_interval_and_epoch_end_checkpoints_load_with_weights_only(cli_run):
    names = sorted(p.name for p in (cli_run / "checkpoints").iterdir() if p.suffix != ".digest")
    assert names == ["epoch=0-step=10.ckpt", "epoch=0-step=12.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"]
    assert (cli_run / "checkpoints" / "last.ckpt").resolve().name == "epoch=0-step=12.ckpt"
    for path in (cli_run / "checkpoints").glob("epoch=*.ckpt"):
        ckpt = torch.load(path, weights_only=True)  # no pickled objects anywhere
        step = int(path.stem.split("step=")[1])
        assert ckpt["global_step"] == step
        assert ckpt["ImageTextDataModule"]["train_sampler"]["batches_consumed"] == step
        assert any("ResumeState" in key for key in ckpt["callbacks"])
        assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]


def test_only_the_last_k_are_kept_and_writes_are_atomic(tiny_arch, tmp_path):
    torch.manual_seed(0)
    module = CLIPPretrain(OpenCLIP(tiny_arch), export_dir="")
    dm = ImageTextDataModule(train=SyntheticShapes(20, image_size=16), batch_size=4, preprocessing=module.preprocessing)
    callback = StepCheckpoint(every_n_train_steps=3, keep_last=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(module, datamodule=dm)
    # saved at steps 3, 5 (epoch end), 6, 9, 10 (epoch end): the newest two remain
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [  # each with its digest
        "epoch=1-step=10.ckpt", "epoch=1-step=10.ckpt.digest", "epoch=1-step=9.ckpt", "epoch=1-step=9.ckpt.digest",
        "last.ckpt"]
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_resume_with_weights_only_restores_everything(cli_run, tmp_path):
    ckpt = cli_run / "checkpoints" / "epoch=0-step=5.ckpt"
    L.seed_everything(123)  # a different start: everything must come from the checkpoint
    module = CLIPPretrain(OpenCLIP(str(ARCH)), loss=NoisyClipLoss(), warmup_steps=3, export_dir="")
    dm = ImageTextDataModule(train=SyntheticShapes(48, seed=0, image_size=16), batch_size=4,
                             preprocessing=module.preprocessing)
    recorder = StepRecorder(str(tmp_path / "steps.jsonl"))
    # the same length as the run that wrote the checkpoint: the LR schedule depends on it
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, deterministic=True, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[ResumeState(), recorder])
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    expected = [r for r in _records(cli_run / "steps.jsonl") if r["step"] > 5]
    got = _records(tmp_path / "steps.jsonl")
    assert [r["step"] for r in got] == list(range(6, 13))
    assert [r["index"] for r in got] == [r["index"] for r in expected]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-5, abs=1e-6)


class _RestoreAfterSetup(SingleDeviceStrategy):
    """Restores the checkpoint after `setup` (which builds the train loader and starts its
    iterator), as FSDP, DeepSpeed and ModelParallelStrategy do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def test_a_strategy_that_restores_after_setup_also_resumes_mid_epoch(cli_run, tmp_path):
    ckpt = cli_run / "checkpoints" / "epoch=0-step=5.ckpt"
    module = CLIPPretrain(OpenCLIP(str(ARCH)), loss=NoisyClipLoss(), warmup_steps=3, export_dir="")
    dm = ImageTextDataModule(train=SyntheticShapes(48, seed=0, image_size=16), batch_size=4,
                             preprocessing=module.preprocessing)
    trainer = L.Trainer(strategy=_RestoreAfterSetup(torch.device("cpu")), max_steps=8, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[StepRecorder(str(tmp_path / "steps.jsonl"))], enable_checkpointing=False)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    expected = [r["index"] for r in _records(cli_run / "steps.jsonl") if 5 < r["step"] <= 8]
    assert [r["index"] for r in _records(tmp_path / "steps.jsonl")] == expected


def test_cli_last_skips_a_truncated_checkpoint_and_resumes_from_the_previous(cli_run, tmp_path, capsys):
    run = _copy(cli_run, tmp_path)
    broken = run / "checkpoints" / "epoch=0-step=12.ckpt"
    broken.write_bytes(broken.read_bytes()[:4096])
    main(["fit", "--config", str(run / "recipe.yaml"), "--trainer.max_steps", "13", "--ckpt_path", "last"])
    out = capsys.readouterr().out
    assert f"skipped {broken}" in out and "truncated or corrupt" in out
    assert f"resuming from {run / 'checkpoints' / 'epoch=0-step=10.ckpt'}" in out
    assert [r["step"] for r in _records(run / "steps.jsonl")] == [11, 12, 13]


def test_cli_explicit_broken_checkpoint_fails_before_training_with_its_name(cli_run, tmp_path):
    run = _copy(cli_run, tmp_path)
    broken = run / "checkpoints" / "epoch=0-step=10.ckpt"
    broken.write_bytes(b"")
    with pytest.raises(CheckpointLoadError, match=rf"{broken}.*truncated or corrupt"):
        main(["fit", "--config", str(run / "recipe.yaml"), "--ckpt_path", str(broken)])
    assert not (run / "steps.jsonl").exists()

