"""A stream of image–text tasks for continual learning, trained one after the other in one fit.

Tasks come either from an ordered list of sources (one per task) or from one source split by a
key its samples carry (``label``, or any other sample key), each task with its own train and
validation part. The whole stream runs inside a single ``trainer.fit``: epoch ``e`` trains on task
``e // epochs_per_task``, and the trainer rebuilds the train loader every epoch
(``reload_dataloaders_every_n_epochs=1``), so checkpoints, resume and the CLI work unchanged.

Loading is ``ImageTextDataModule``'s (subclassed): the same distributed batch sampler, collate,
bad-sample handling and preprocessing linked in by the CLI.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, Subset

from mmkit.config_checks import Range, check_settings
from mmkit.data.collate import ImageTextCollate
from mmkit.data.datamodule import ImageTextDataModule
from mmkit.data.loaders import build_loader
from mmkit.data.sample import BadSample


class _Offset(Dataset):
    """A source whose ``index``/``image_id`` are shifted, so several sources can be evaluated as one
    split without two rows sharing an id."""

    def __init__(self, dataset: Dataset, offset: int) -> None:
        self.dataset, self.offset = dataset, offset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        s = self.dataset[i]
        if isinstance(s, BadSample):
            return s if s.index is None else dataclasses.replace(s, index=s.index + self.offset)
        return {**s, "index": s["index"] + self.offset, "image_id": s["image_id"] + self.offset}


class TaskStreamDataModule(ImageTextDataModule):
    """Continual-learning data: an ordered stream of tasks, each with a train and a val part.

    Give either ``train_tasks`` (one source per task, optionally ``val_tasks``), or ``train`` split
    by the sample key ``split_by`` (and ``val`` split the same way). Without validation sources
    each task's val part is a seeded ``val_fraction`` of its training rows. Splitting reads each
    sample of a source once (on every rank, deterministic); rows that are bad or carry a key in no
    task are left out with a warning. Splitting and carving need map-style sources; listed train
    sources may be shard streams.

    Lightning's validation loop sees all tasks' val parts as one split (so any module works on a
    stream, e.g. ``CLIPPretrain`` for plain fine-tuning); ``task_loader`` gives one task's part
    (``EWCIncremental`` builds its per-task matrix from it). The test and predict sources are not
    split.

    Args:
        train: Source split into tasks by ``split_by`` (use this or ``train_tasks``).
        val: Validation source split by the same key; default: carved from ``train``.
        test: Test source (not split), or None.
        predict: Prediction source (not split), or None.
        train_tasks: One training source per task, in stream order (instead of ``train``).
        val_tasks: One validation source per task (with ``train_tasks``).
        split_by: Sample key that assigns a row of ``train``/``val`` to a task (``label``: the
            source's class label, e.g. SyntheticShapes' shape or a manifest's ``label_column``).
        task_groups: Key values of each task, in stream order, e.g. ``[[circle, square], [star]]``;
            class names are matched through the source's ``class_names``. Default: the distinct
            values in sorted order, one task each, or ``num_tasks`` consecutive groups of them.
        num_tasks: Without ``task_groups``: number of consecutive groups of the sorted values.
        task_names: Names used in reports; default: the group's values joined by ``+``, or ``task{i}``.
        val_fraction: Share of each task's training rows held out for validation when no
            validation source is given.
        epochs_per_task: Training epochs spent on each task. Set the trainer's ``max_epochs`` to
            ``epochs_per_task × number of tasks`` and ``reload_dataloaders_every_n_epochs`` to 1.
        **kwargs: ``ImageTextDataModule`` settings (batch_size, num_workers, seed, preprocessing, ...).
    """

    setting_ranges = {
        "num_tasks": Range(ge=1, integer=True, none="one task per value"),
        "val_fraction": Range(ge=0, lt=1),
        "epochs_per_task": Range(ge=1, integer=True),
    }

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        predict: Dataset | None = None,
        train_tasks: list[Dataset] | None = None,
        val_tasks: list[Dataset] | None = None,
        split_by: str = "label",
        task_groups: list[list[str | int]] | None = None,
        num_tasks: int | None = None,
        task_names: list[str] | None = None,
        val_fraction: float = 0.1,
        epochs_per_task: int = 1,
        **kwargs: Any,
    ) -> None:
        check_settings(self, locals(), TaskStreamDataModule.setting_ranges)
        super().__init__(train=None, val=None, test=test, predict=predict, **kwargs)
        if (train is None) == (train_tasks is None):
            raise ValueError("TaskStreamDataModule: give either `train` (split by `split_by`) or `train_tasks`")
        if val_tasks is not None and (train_tasks is None or len(val_tasks) != len(train_tasks)):
            raise ValueError("TaskStreamDataModule: `val_tasks` needs `train_tasks` and one source per task")
        if val is not None and train is None:
            raise ValueError("TaskStreamDataModule: `val` is split like `train`; with `train_tasks` use `val_tasks`")
        self.stream_train, self.stream_val = train, val
        self.train_tasks, self.val_tasks = train_tasks, val_tasks
        self.split_by = split_by
        self.task_groups = task_groups
        self.requested_num_tasks = num_tasks
        self.requested_task_names = task_names
        self.val_fraction = val_fraction
        self.epochs_per_task = epochs_per_task
        self._task_train: list[Dataset] | None = None
        self._task_val: list[Dataset] = []
        self._task_names: list[str] = []

    # -- the stream ----------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self._tasks()[0])

    @property
    def task_names(self) -> list[str]:
        self._tasks()
        return self._task_names

    @property
    def train_row_offset(self) -> int:
        """What to add to the row indices of the task being trained so that rows of different
        ``train_tasks`` sources (each numbered from 0) stay distinct, e.g. in bad-row counts; 0 for
        tasks split from one stream (their indices are already distinct) or sources without a length."""
        train, _ = self._tasks()
        if self.train_tasks is None or self.trainer is None:
            return 0
        task = self.task_of_epoch(self.trainer.current_epoch)
        try:
            return sum(_id_span(t) for t in train[:task])
        except TypeError:  # a shard stream has no length
            return 0

    def task_of_epoch(self, epoch: int) -> int:
        """The task trained during ``epoch`` (epochs past the stream keep training the last task)."""
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    def is_task_end(self, epoch: int) -> bool:
        """Whether ``epoch`` is the last epoch spent on its task."""
        return (epoch + 1) % self.epochs_per_task == 0 and epoch // self.epochs_per_task < self.num_tasks

    def task_dataset(self, task: int, split: str = "train") -> Dataset:
        train, val = self._tasks()
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return (train if split == "train" else val)[task]

    def task_loader(
        self, task: int, split: str = "val", batch_size: int | None = None, shuffle: bool = False
    ) -> DataLoader:
        """This rank's share of one task's ``train`` or ``val`` part, with the evaluation transform
        (no augmentation), e.g. for per-task evaluation or Fisher estimation. Every rank gets the
        same number of batches. ``batch_size`` defaults to ``eval_batch_size``."""
        if self.preprocessing is None:
            raise ValueError("TaskStreamDataModule has no preprocessing: call set_preprocessing(model.preprocessing)")
        rank, world_size = self._rank_world()
        collate = ImageTextCollate(self.preprocessing.image_transform(train=False), self.preprocessing.tokenize)
        return build_loader(
            self.task_dataset(task, split),
            collate,
            batch_size=batch_size or self.eval_batch_size,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            seed=self.seed + task,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return  # validate/test/predict build the split only if they need it
        train, _ = self._tasks()
        if self.trainer is not None and len(train) > 1:
            if self.trainer.reload_dataloaders_every_n_epochs != 1:
                raise ValueError(
                    "TaskStreamDataModule switches task by epoch: set the trainer's "
                    f"reload_dataloaders_every_n_epochs to 1 (got {self.trainer.reload_dataloaders_every_n_epochs})"
                )
            expected = self.epochs_per_task * len(train)
            if self.trainer.max_epochs not in (None, -1, expected):
                warnings.warn(
                    f"TaskStreamDataModule: {len(train)} tasks × {self.epochs_per_task} epochs = {expected} epochs, "
                    f"but the trainer's max_epochs is {self.trainer.max_epochs}", stacklevel=2)

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        # The base class builds (and resumes) its loader from `self.train`: point it at this task.
        self.train = self.task_dataset(self.task_of_epoch(epoch), "train")
        return super().train_dataloader()

    def val_dataloader(self) -> DataLoader | list:
        _, val = self._tasks()
        # One split for Lightning's validation loop; ids were made unique across tasks in _tasks().
        nonempty = [v for v in val if len(v)]
        self.val = ConcatDataset(nonempty) if nonempty else None
        return super().val_dataloader()

    # -- splitting -----------------------------------------------------------------------------
    def _tasks(self) -> tuple[list[Dataset], list[Dataset]]:
        if self._task_train is None:
            if self.train_tasks is not None:
                train, val, names = self._from_list()
            else:
                train, val, names = self._from_split()
            if not train:
                raise ValueError("TaskStreamDataModule: the stream has no tasks")
            self._task_train, self._task_val = train, val
            given = self.requested_task_names
            if given is not None and len(given) != len(train):
                raise ValueError(f"TaskStreamDataModule: {len(given)} task_names for {len(train)} tasks")
            self._task_names = list(given) if given is not None else names
        return self._task_train, self._task_val

    def _from_list(self) -> tuple[list[Dataset], list[Dataset], list[str]]:
        train = list(self.train_tasks)
        if self.val_tasks is not None:
            val = list(self.val_tasks)
            if any(isinstance(v, IterableDataset) for v in val):
                raise ValueError("TaskStreamDataModule: val_tasks must be map-style sources (not shard streams)")
        else:
            train, val = zip(*(self._carve(t, i) for i, t in enumerate(train)))
            train, val = list(train), list(val)
        # Separate sources restart their ids at 0: shift them so a task's rows stay distinct from
        # another task's when all val parts are evaluated together.
        offset, shifted = 0, []
        for v in val:
            shifted.append(_Offset(v, offset))
            offset += _id_span(v)
        return train, shifted, [f"task{i}" for i in range(len(train))]

    def _from_split(self) -> tuple[list[Dataset], list[Dataset], list[str]]:
        train_keys = self._keys(self.stream_train, "train")
        groups, names = self._groups(train_keys)
        train = [Subset(self.stream_train, rows) for rows in _assign(train_keys, groups)]
        if self.stream_val is not None:
            val_rows = _assign(self._keys(self.stream_val, "val"), groups)
            val: list[Dataset] = [Subset(self.stream_val, rows) for rows in val_rows]
        else:
            train, val = (list(x) for x in zip(*(self._carve(t, i) for i, t in enumerate(train))))
        for name, t, v in zip(names, train, val):
            if len(t) == 0:
                raise ValueError(f"TaskStreamDataModule: task {name!r} has no training rows")
            if len(v) == 0 and (self.stream_val is not None or self.val_fraction > 0):
                warnings.warn(f"TaskStreamDataModule: task {name!r} has no validation rows", stacklevel=2)
        return train, val, names

    def _keys(self, dataset: Dataset, role: str) -> list[Any]:
        """Every row's task key (None for a bad row); reads each sample once."""
        if isinstance(dataset, IterableDataset):
            raise ValueError(f"TaskStreamDataModule: cannot split the shard stream `{role}`; use train_tasks")
        class_names = getattr(dataset, "class_names", None)
        keys, bad = [], []
        for i in range(len(dataset)):
            s = dataset[i]
            if isinstance(s, BadSample):
                keys.append(None)
                bad.append(s.reason)
                continue
            if self.split_by not in s:
                raise ValueError(f"TaskStreamDataModule: samples of `{role}` have no key {self.split_by!r} "
                                 f"(keys: {sorted(s)})")
            key = s[self.split_by]
            if self.split_by == "label" and key == -1:
                key = None  # unlabelled row
            elif self.split_by == "label" and class_names:
                key = class_names[key]
            keys.append(key)
        if bad:
            warnings.warn(f"TaskStreamDataModule: {len(bad)} bad row(s) of `{role}` left out of every task "
                          f"(first: {bad[0]})", stacklevel=2)
        return keys

    def _groups(self, keys: list[Any]) -> tuple[list[list[Any]], list[str]]:
        if self.task_groups is not None:
            # Class indices and class names both work for a labelled source.
            names = getattr(self.stream_train, "class_names", None) if self.split_by == "label" else None
            groups = [[names[v] if names and isinstance(v, int) else v for v in g] for g in self.task_groups]
            seen = [v for g in groups for v in g]
            if len(seen) != len(set(map(str, seen))):
                raise ValueError(f"TaskStreamDataModule: a value appears in more than one task: {groups}")
        else:
            values = sorted({k for k in keys if k is not None}, key=lambda v: (str(type(v)), v))
            n = self.requested_num_tasks or len(values)
            if not 1 <= n <= len(values):
                raise ValueError(f"TaskStreamDataModule: cannot make {n} tasks from {len(values)} distinct values")
            groups = [list(part) for part in np.array_split(np.array(values, dtype=object), n)]
        return groups, ["+".join(map(str, g)) for g in groups]

    def _carve(self, dataset: Dataset, task: int) -> tuple[Dataset, Dataset]:
        """Split a task's training rows into (train, val) with a seeded permutation."""
        if self.val_fraction == 0:
            return dataset, Subset(dataset, [])
        if isinstance(dataset, IterableDataset):
            raise ValueError("TaskStreamDataModule: cannot carve a val part out of a shard stream; give val_tasks")
        order = np.random.default_rng([self.seed, task]).permutation(len(dataset)).tolist()
        n_val = int(round(self.val_fraction * len(dataset)))
        return Subset(dataset, sorted(order[n_val:])), Subset(dataset, sorted(order[:n_val]))


def _assign(keys: Sequence[Any], groups: list[list[Any]]) -> list[list[int]]:
    """Row indices of each group; values are compared as strings so YAML ints/strings both match."""
    task_of = {str(v): t for t, g in enumerate(groups) for v in g}
    rows: list[list[int]] = [[] for _ in groups]
    unassigned = 0
    for i, k in enumerate(keys):
        t = task_of.get(str(k)) if k is not None else None
        if t is None:
            unassigned += k is not None
            continue
        rows[t].append(i)
    if unassigned:
        warnings.warn(f"TaskStreamDataModule: {unassigned} row(s) carry a key in no task and are left out",
                      stacklevel=3)
    return rows


def _id_span(dataset: Dataset) -> int:
    """An upper bound of the ``index`` and ``image_id`` a source hands out (both are < its length
    for mmkit's map-style sources)."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return len(base)
