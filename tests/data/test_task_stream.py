"""TaskStreamDataModule: splitting by a sample key or a manifest column, per-task train/val parts,
list mode, and the task switch by epoch inside one real Trainer fit."""

import lightning as L
import pytest
import torch
from torch import nn

from datafakes import FakePreprocessing, write_csv, write_images
from mmkit.data import ManifestDataset, SyntheticShapes, TaskStreamDataModule
from mmkit.data.sources.synthetic import SHAPES


def _shape_of(dataset, i):
    return SHAPES[dataset[i]["label"]]


def _indices(ds):
    return [ds[i]["index"] for i in range(len(ds))]


def test_split_by_label_gives_each_task_its_own_classes_and_val_rows():
    train, val = SyntheticShapes(40, seed=0, image_size=16), SyntheticShapes(20, seed=1, image_size=16)
    groups = [["circle", "square"], ["triangle", "cross"], ["star"]]
    dm = TaskStreamDataModule(train=train, val=val, task_groups=groups, preprocessing=FakePreprocessing())
    assert dm.num_tasks == 3 and dm.task_names == ["circle+square", "triangle+cross", "star"]
    seen_train, seen_val = [], []
    for t, group in enumerate(groups):
        task_train, task_val = dm.task_dataset(t, "train"), dm.task_dataset(t, "val")
        assert len(task_train) > 0 and len(task_val) > 0
        assert {SHAPES[s["label"]] for s in (task_train[i] for i in range(len(task_train)))} <= set(group)
        assert {SHAPES[s["label"]] for s in (task_val[i] for i in range(len(task_val)))} <= set(group)
        seen_train += _indices(task_train)
        seen_val += _indices(task_val)
    # Every row lands in exactly one task.
    assert sorted(seen_train) == list(range(40)) and sorted(seen_val) == list(range(20))
    expected = [i for i in range(40) if _shape_of(train, i) == "star"]
    assert _indices(dm.task_dataset(2, "train")) == expected


def test_class_indices_default_groups_and_num_tasks():
    train = SyntheticShapes(30, seed=0, image_size=16)
    by_index = TaskStreamDataModule(train=train, task_groups=[[0, 1], [2, 3, 4]], val_fraction=0.0)
    by_name = TaskStreamDataModule(train=train, task_groups=[["circle", "square"], ["triangle", "cross", "star"]],
                                   val_fraction=0.0)
    assert _indices(by_index.task_dataset(1)) == _indices(by_name.task_dataset(1))
    one_each = TaskStreamDataModule(train=train, val_fraction=0.0)
    assert one_each.num_tasks == 5 and one_each.task_names == sorted(SHAPES)
    two = TaskStreamDataModule(train=train, num_tasks=2, val_fraction=0.0)
    assert two.task_names == ["circle+cross+square", "star+triangle"]  # sorted values, consecutive groups


def test_val_part_carved_from_each_task_when_no_val_source():
    train = SyntheticShapes(60, seed=0, image_size=16)
    dm = TaskStreamDataModule(train=train, num_tasks=2, val_fraction=0.25, seed=3)
    for t in range(2):
        tr, va = _indices(dm.task_dataset(t, "train")), _indices(dm.task_dataset(t, "val"))
        assert not set(tr) & set(va)
        assert len(va) == round(0.25 * (len(tr) + len(va)))
    again = TaskStreamDataModule(train=train, num_tasks=2, val_fraction=0.25, seed=3)
    assert _indices(again.task_dataset(1, "val")) == _indices(dm.task_dataset(1, "val"))


def test_split_by_a_manifest_column(tmp_path):
    names = [f"{i}.jpg" for i in range(8)]
    write_images(tmp_path / "img", names)
    domains = ["sea", "sky", "land", "sea", "sky", "land", "sea", "???"]
    write_csv(tmp_path / "m.csv", [{"image": f"img/{n}", "caption": f"photo {i}", "domain": d}
                                    for i, (n, d) in enumerate(zip(names, domains))])
    source = ManifestDataset(str(tmp_path / "m.csv"), label_column="domain")
    dm = TaskStreamDataModule(train=source, task_groups=[["sea"], ["land", "sky"]], val_fraction=0.0)
    with pytest.warns(UserWarning, match="1 row"):  # "???" belongs to no task
        assert _indices(dm.task_dataset(0)) == [0, 3, 6]
    assert _indices(dm.task_dataset(1)) == [1, 2, 4, 5]


def test_list_of_sources_keeps_ids_distinct_across_tasks():
    tasks = [SyntheticShapes(6, seed=s, image_size=16) for s in range(3)]
    vals = [SyntheticShapes(4, seed=10 + s, image_size=16) for s in range(3)]
    dm = TaskStreamDataModule(train_tasks=tasks, val_tasks=vals, batch_size=3, preprocessing=FakePreprocessing())
    assert dm.num_tasks == 3 and dm.task_dataset(1) is tasks[1]
    ids = [i for t in range(3) for i in _indices(dm.task_dataset(t, "val"))]
    assert sorted(ids) == list(range(12))
    batch = next(iter(dm.task_loader(2, "val", batch_size=4)))
    assert batch["index"].tolist() == [8, 9, 10, 11] and batch["images"].shape == (4, 3, 32, 32)


class _Recorder(L.LightningModule):
    """Records the `index` of every training and validation row per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(1, 1)
        self.train_seen: dict[int, list[int]] = {}
        self.val_seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.train_seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
        return self.net(batch["images"].mean((1, 2, 3))[:, None]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path, **kw)


def test_fit_trains_task_by_task_and_validates_on_all_tasks(tmp_path):
    train, val = SyntheticShapes(24, seed=0, image_size=16), SyntheticShapes(10, seed=1, image_size=16)
    dm = TaskStreamDataModule(train=train, val=val, num_tasks=2, epochs_per_task=2, batch_size=4,
                              preprocessing=FakePreprocessing())
    module = _Recorder()
    _trainer(tmp_path, max_epochs=4, reload_dataloaders_every_n_epochs=1).fit(module, datamodule=dm)
    task_rows = [sorted(_indices(dm.task_dataset(t))) for t in range(2)]
    assert [dm.task_of_epoch(e) for e in range(5)] == [0, 0, 1, 1, 1]
    assert [dm.is_task_end(e) for e in range(4)] == [False, True, False, True]
    for epoch in range(4):
        assert sorted(module.train_seen[epoch]) == task_rows[epoch // 2], epoch
        assert sorted(module.val_seen[epoch]) == list(range(10))  # one split: every task's val rows
    assert module.train_seen[0] != module.train_seen[1]  # a new order each epoch


def test_fit_without_reloading_dataloaders_is_refused(tmp_path):
    dm = TaskStreamDataModule(train=SyntheticShapes(12, seed=0, image_size=16), num_tasks=2, batch_size=4,
                              preprocessing=FakePreprocessing())
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        _trainer(tmp_path, max_epochs=2).fit(_Recorder(), datamodule=dm)


def test_bad_configurations_fail_at_construction():
    shapes = SyntheticShapes(8, seed=0, image_size=16)
    with pytest.raises(ValueError, match="either"):
        TaskStreamDataModule()
    with pytest.raises(ValueError, match="either"):
        TaskStreamDataModule(train=shapes, train_tasks=[shapes])
    with pytest.raises(ValueError, match="val_tasks"):
        TaskStreamDataModule(train_tasks=[shapes], val_tasks=[shapes, shapes])
    with pytest.raises(ValueError, match="more than one task"):
        TaskStreamDataModule(train=shapes, task_groups=[["circle"], ["circle", "star"]]).num_tasks


def test_bad_row_counts_keep_separate_task_sources_apart(tmp_path):
    """Each `train_tasks` source numbers its rows from 0: the bad-row tracker counts 6 + 9 rows
    met over both tasks (two epochs each), not the 9 of the larger source."""
    from mmkit.callbacks.bad_samples import BadSampleCallback

    tasks = [SyntheticShapes(6, seed=0, image_size=16), SyntheticShapes(9, seed=1, image_size=16)]
    dm = TaskStreamDataModule(train_tasks=tasks, val_tasks=[SyntheticShapes(4, seed=2, image_size=16)] * 2,
                              epochs_per_task=2, batch_size=3, preprocessing=FakePreprocessing())
    callback = BadSampleCallback()
    _trainer(tmp_path, max_epochs=4, reload_dataloaders_every_n_epochs=1, callbacks=[callback]).fit(_Recorder(), datamodule=dm)
    assert callback.tracker.seen == 15 and callback.tracker.skipped == 0
