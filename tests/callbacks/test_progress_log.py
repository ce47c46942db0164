"""ProgressLog's lines, the step progress bar's metrics, and metrics logged as already gathered
without Lightning's sync_dist advice."""

import re
import warnings

import lightning as L
import torch
import torch.distributed as dist

from conftest import RandomDicts, TinyModule
from mmkit.callbacks.progress_bar import StepRichProgressBar, StepTQDMProgressBar
from mmkit.callbacks.progress_log import ProgressLog
from mmkit.callbacks.throughput import Throughput
from mmkit.training.gathered_log import log_gathered


class LrOnBar(TinyModule):
    """Logs like mmkit's modules: the total, its terms and the learning rate (on the bar)."""

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self(batch["images"]), batch["targets"])
        self.log("train/contrastive_loss", loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", 4.9e-4, prog_bar=True)
        return loss


def test_lines_every_n_steps_with_step_of_max_loss_lr_throughput_eta_and_validation(tmp_path, capsys):
    trainer = L.Trainer(accelerator="cpu", max_steps=12, val_check_interval=6, limit_val_batches=2,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Throughput(warmup=1), ProgressLog(every_n_steps=4)],
                        default_root_dir=tmp_path)
    train = torch.utils.data.DataLoader(RandomDicts(48, seed=0), batch_size=4)
    val = torch.utils.data.DataLoader(RandomDicts(8, seed=1), batch_size=4)
    trainer.fit(LrOnBar(), train, val)
    lines = capsys.readouterr().out.splitlines()
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert [ln.split(" |")[0] for ln in steps] == ["step 4/12 (33%)", "step 8/12 (67%)", "step 12/12 (100%)"], lines
    assert re.fullmatch(r"step 8/12 \(67%\) \| epoch 0 \| loss [\d.e+-]+ \(contrastive_loss [\d.e+-]+\) \| "
                        r"lr 4\.9e-04 \| [\d.]+ samples/s \| ETA \d\d:\d\d:\d\d", steps[1]), steps[1]
    vals = [ln for ln in lines if ln.startswith("val ")]
    assert [v.split(" |")[0] for v in vals] == ["val step 6", "val step 12"], lines
    assert re.fullmatch(r"val step 6 \| val/i2t_R@1 [\d.]+ \| val/loss [\d.]+ \| val/t2i_R@1 [\d.]+", vals[0]), vals[0]


def test_silent_by_default_when_the_trainer_has_a_progress_bar(tiny_fit, capsys):
    tiny_fit([ProgressLog(every_n_steps=2)], max_steps=4)  # no bar: prints
    assert "step 4/4" in capsys.readouterr().out
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[ProgressLog(every_n_steps=2)])
    trainer.fit(TinyModule(), torch.utils.data.DataLoader(RandomDicts(24, seed=0), batch_size=4))
    assert not re.search(r"^step \d", capsys.readouterr().out, re.M)


def test_progress_bar_shows_the_global_step_of_max_steps_and_a_readable_lr(tmp_path, capsys):
    for bar in (StepRichProgressBar(), StepTQDMProgressBar()):
        trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, callbacks=[bar], default_root_dir=tmp_path)
        module = LrOnBar()
        trainer.fit(module, torch.utils.data.DataLoader(RandomDicts(40, seed=0), batch_size=4))
        metrics = bar.get_metrics(trainer, module)
        assert metrics["step"] == "5/5" and metrics["train/lr"] == "4.90e-04", metrics
    assert StepRichProgressBar()._get_train_description.__func__  # overridden: no "Epoch 0/-2"
    rich = StepRichProgressBar()
    rich._trainer = trainer
    assert trainer.max_epochs == -1 and rich._get_train_description(0).strip() == "Epoch 0"


class GatheredVal(TinyModule):
    def on_validation_epoch_end(self):
        log_gathered(self, {"val/gathered": torch.tensor(1.0)})
        self.log("val/plain", torch.tensor(2.0), sync_dist=False)  # the control: Lightning still advises


def test_gathered_metrics_draw_no_sync_dist_advice_under_a_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, num_sanity_val_steps=0,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=tmp_path)
            data = RandomDicts(8, seed=0)
            trainer.fit(GatheredVal(), torch.utils.data.DataLoader(data, batch_size=4),
                        torch.utils.data.DataLoader(data, batch_size=4))
    finally:
        dist.destroy_process_group()
    advice = [str(w.message) for w in caught if "sync_dist=True" in str(w.message)]
    assert any("'val/plain'" in a for a in advice), advice
    assert not any("'val/gathered'" in a for a in advice), advice
    assert float(trainer.callback_metrics["val/gathered"]) == 1.0
