import lightning as L
import pytest
import torch
from torch import nn

from datafakes import FakePreprocessing, make_shards, write_csv, write_images
from mmkit.callbacks.bad_samples import BadSampleCallback
from mmkit.data import BadDataError, ImageTextDataModule, ManifestDataset, SyntheticShapes, WebDatasetShards


class RecordingModule(L.LightningModule):
    """Trains a linear probe and records the `index` of every batch it sees, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3 * 32 * 32, 1)
        self.train_seen: dict[int, list[int]] = {}
        self.val_seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.train_seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
        if batch["images"].shape[0] == 0:
            return None  # every sample of this batch was bad
        return self.net(batch["images"].flatten(1)).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_seen.extend(batch["index"].tolist())

    def predict_step(self, batch, batch_idx):
        return batch["index"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path, **kw)


def test_fit_sees_each_sample_once_per_epoch_in_a_new_order(tmp_path):
    dm = ImageTextDataModule(train=SyntheticShapes(size=22, seed=0), val=SyntheticShapes(size=9, seed=1),
                             predict=SyntheticShapes(size=5, seed=2), batch_size=4, eval_batch_size=3,
                             preprocessing=FakePreprocessing())
    model = RecordingModule()
    trainer = _trainer(tmp_path, max_epochs=2)  # default use_distributed_sampler=True: must not matter
    trainer.fit(model, datamodule=dm)
    assert sorted(model.train_seen[0]) == sorted(model.train_seen[1]) == list(range(22))
    assert model.train_seen[0] != model.train_seen[1]  # Lightning called set_epoch on our sampler
    assert sorted(model.val_seen) == sorted(list(range(9)) * 2)
    preds = trainer.predict(model, datamodule=dm)
    assert torch.cat(preds).tolist() == [0, 1, 2, 3, 4]
    state = dm.state_dict()["train_sampler"]
    assert state["epoch"] == 1 and state["batches_consumed"] == 6
    # Lightning keeps our sampler under DDP because it already is a DistributedSampler
    assert isinstance(dm.train_sampler, torch.utils.data.DistributedSampler)


def test_shard_stream_gets_the_trainer_epoch(tmp_path):
    make_shards(tmp_path, [3, 3, 3, 3])
    dm = ImageTextDataModule(train=WebDatasetShards(str(tmp_path / "shard-*.tar"), seed=0), batch_size=2,
                             num_workers=2, persistent_workers=True, preprocessing=FakePreprocessing())
    model = RecordingModule()
    _trainer(tmp_path, max_epochs=2).fit(model, datamodule=dm)
    assert sorted(model.train_seen[0]) == sorted(model.train_seen[1])
    assert len(model.train_seen[0]) == len(set(model.train_seen[0])) == 12
    assert model.train_seen[0] != model.train_seen[1]


def test_bad_sample_callback_stops_a_run_with_too_much_bad_data(tmp_path, capsys):
    write_images(tmp_path, ["ok.jpg"])
    rows = [{"image": "ok.jpg" if i % 3 else f"missing{i}.jpg", "caption": f"c{i}"} for i in range(30)]
    write_csv(tmp_path / "m.csv", rows)
    dm = ImageTextDataModule(train=ManifestDataset(str(tmp_path / "m.csv")), batch_size=5,
                             max_bad_fraction=0.2, preprocessing=FakePreprocessing())
    callback = BadSampleCallback(min_samples=10, check_every_n_steps=2)
    with pytest.raises(BadDataError, match=r"above the limit of 20.0%") as e:
        _trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(RecordingModule(), datamodule=dm)
    assert "m.csv row" in str(e.value) and "not found" in str(e.value)
    assert callback.tracker.seen == 10 and callback.tracker.skipped == 4

    # within the limit the run completes and reports the reasons at epoch end
    dm.max_bad_fraction = 0.5
    callback = BadSampleCallback(min_samples=10, check_every_n_steps=2)
    _trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(RecordingModule(), datamodule=dm)
    assert (callback.tracker.seen, callback.tracker.skipped) == (30, 10)


def test_a_small_file_with_too_many_bad_rows_fails_at_its_first_epoch_end(tmp_path):
    """Counting distinct rows, 20 rows never reach min_samples=100, however many epochs: the end of
    an epoch judges what it met anyway."""
    write_images(tmp_path, ["ok.jpg"])
    rows = [{"image": "ok.jpg" if i % 2 else f"missing{i}.jpg", "caption": f"c{i}"} for i in range(20)]
    write_csv(tmp_path / "m.csv", rows)
    dm = ImageTextDataModule(train=ManifestDataset(str(tmp_path / "m.csv")), batch_size=5,
                             max_bad_fraction=0.2, preprocessing=FakePreprocessing())
    callback = BadSampleCallback()  # min_samples=100
    model = RecordingModule()
    with pytest.raises(BadDataError, match=r"50.0% of rows were skipped.*\(10 of 20 rows\)"):
        _trainer(tmp_path, max_epochs=10, callbacks=[callback]).fit(model, datamodule=dm)
    assert list(model.train_seen) == [0]  # stopped after the first epoch


def test_missing_preprocessing_and_state_round_trip():
    dm = ImageTextDataModule(train=SyntheticShapes(size=30), batch_size=4)
    with pytest.raises(ValueError, match="set_preprocessing"):
        dm.train_dataloader()
    dm.set_preprocessing(FakePreprocessing())
    dm.load_state_dict({"train_sampler": {"epoch": 3, "batches_consumed": 5, "size": 30, "batch_size": 4,
                                          "world_size": 1, "seed": 0, "num_batches": 8}})
    loader = dm.train_dataloader()
    assert len(loader) == 8 and dm.train_sampler.epoch == 3  # len: the whole epoch, 3 batches of it left
    assert len(list(loader)) == 3
    assert all(b["images"].shape[1:] == (3, 32, 32) for b in loader)
    finished = dm.state_dict()
    assert finished["train_sampler"]["batches_consumed"] == 8
    dm.load_state_dict(finished)  # a finished epoch resumes at the start of the next
    assert dm.train_sampler.epoch == 4 and len(dm.train_dataloader()) == 8
    assert dm.val_dataloader() == []
