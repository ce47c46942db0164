"""Checkpoint files: atomic writes, errors that name a broken file, `last` skipping broken files,
and RNG states that survive weights_only loading."""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkit.callbacks.resume_state import capture_rng_state, restore_rng_state
from mmkit.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointLoadError,
    atomic_save,
    find_resumable_checkpoint,
    load_checkpoint,
)


def _training_ckpt(step: int) -> dict:
    return {"state_dict": {"w": torch.full((64,), float(step))}, "global_step": step, "loops": {}, "epoch": 0}


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("serialisation failed half-way")


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_debris(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save(_training_ckpt(1), path)
    with pytest.raises(RuntimeError, match="half-way"):
        atomic_save({"state_dict": {"w": torch.zeros(10_000)}, "bad": _FailsToPickle()}, path)
    assert load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.digest"]  # and its digest


def test_the_write_goes_to_a_synced_temporary_file_in_the_target_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", fd)), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append(("replace", Path(a), Path(b))), real_replace(a, b))[1]
    )
    target = tmp_path / "sub" / "epoch=0-step=3.ckpt"
    AtomicCheckpointIO().save_checkpoint(_training_ckpt(3), target)
    kinds = [e[0] for e in events]
    assert kinds.index("fsync") < kinds.index("replace")  # data on disk before the name points at it
    (_, src, dst), = [e for e in events if e[0] == "replace" and e[2] == target]  # (the other: its digest)
    assert dst == target and src.parent == target.parent and src.name.startswith(".") and not src.name.endswith(".ckpt")
    ckpt_replace = events.index(("replace", src, dst))
    assert [e[0] for e in events[ckpt_replace:]] == ["replace", "fsync"]  # the folder (the rename) last
    assert load_checkpoint(target)["global_step"] == 3


def test_a_broken_checkpoint_fails_with_its_name(tmp_path):
    good = tmp_path / "good.ckpt"
    atomic_save(_training_ckpt(5), good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    for bad in (truncated, empty):
        with pytest.raises(CheckpointLoadError, match=rf"{bad}.*truncated or corrupt"):
            load_checkpoint(bad)
        with pytest.raises(CheckpointLoadError, match=str(bad)):
            AtomicCheckpointIO().load_checkpoint(bad)


def test_pickled_objects_are_refused_by_weights_only_loading(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "loops": {}, "hparams": Path("x")}, path)
    with pytest.raises(CheckpointLoadError, match=rf"{path}.*weights_only"):
        load_checkpoint(path)


def test_last_takes_the_furthest_checkpoint_that_loads_and_names_the_skipped_ones(tmp_path):
    run = tmp_path / "checkpoints"
    paths = [run / f"epoch=0-step={s}.ckpt" for s in (5, 10, 15)]
    for i, path in enumerate(paths):
        atomic_save(_training_ckpt(5 * (i + 1)), path)
        os.utime(path, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    newest = paths[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # killed mid-write by a non-atomic writer
    os.utime(newest, ns=(10**18 + 3 * 10**9,) * 2)
    zero = run / "epoch=0-step=20.ckpt"
    zero.write_bytes(b"")
    os.utime(zero, ns=(10**18 + 4 * 10**9,) * 2)
    (run / "not-a-training-checkpoint.ckpt").write_bytes(b"")  # oldest, but its step is unknown: named too
    os.utime(run / "not-a-training-checkpoint.ckpt", ns=(10**17,) * 2)
    os.symlink(zero.name, run / "last.ckpt")  # a link counts as the file it points at

    path, skipped = find_resumable_checkpoint([tmp_path], recursive=True)
    assert path == paths[1].resolve()
    assert [p.name for p, _ in skipped] == [zero.name, newest.name, "not-a-training-checkpoint.ckpt"]
    assert all(str(p) in reason and "truncated or corrupt" in reason for p, reason in skipped)
    assert find_resumable_checkpoint([tmp_path / "nowhere"]) == (None, [])


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.randn(3), np.random.randn(3), random.random()  # numpy keeps a cached gaussian too
    state = capture_rng_state()
    expected = torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)]
    torch.save({"rng": state}, tmp_path / "rng.ckpt")
    loaded = torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"]
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(loaded)
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]
