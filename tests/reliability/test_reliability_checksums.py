"""Checkpoint digests: bytes flipped inside a checkpoint's tensor data load without any error, so
each file's SHA-256 is recorded in `<name>.digest` when it is written and checked when `last`
chooses a file and when a file is loaded."""

import hashlib
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmkit import checksum
from mmkit.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointLoadError,
    atomic_save,
    find_resumable_checkpoint,
    load_checkpoint,
    remove_write_debris,
    resolve_ckpt_path,
    verify_checksum,
)

MARK = 1234.5  # the weights' value: easy to find in the file's bytes


def _training_ckpt(step: int) -> dict:
    return {"state_dict": {"w": torch.full((256,), MARK)}, "global_step": step, "loops": {}, "epoch": 0}


def _flip_a_weight_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(torch.tensor([MARK]).numpy().tobytes()) + 100 * 4 + 1
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_tensor_data_are_caught_when_choosing_and_when_loading(tmp_path):
    older, newer = tmp_path / "epoch=0-step=5.ckpt", tmp_path / "epoch=0-step=10.ckpt"
    atomic_save(_training_ckpt(5), older)
    atomic_save(_training_ckpt(10), newer)
    _flip_a_weight_byte(newer)
    # What made this dangerous: the damaged file loads, with other weights.
    assert not torch.equal(load_checkpoint(newer)["state_dict"]["w"], torch.full((256,), MARK))

    path, skipped = find_resumable_checkpoint([tmp_path])
    assert path == older
    ((bad, reason),) = skipped
    assert bad == newer and str(newer) in reason and "sha256" in reason and "corrupt" in reason

    for load in (AtomicCheckpointIO().load_checkpoint, lambda p: resolve_ckpt_path(str(p), trainer=None)):
        with pytest.raises(CheckpointLoadError, match=rf"{newer}.*sha256"):
            load(newer)
    assert AtomicCheckpointIO().load_checkpoint(older)["global_step"] == 5


def test_the_sidecar_is_sha256sum_format_and_in_place_before_the_checkpoint_is(tmp_path, monkeypatch):
    target = tmp_path / "epoch=0-step=3.ckpt"
    sidecar_at_rename = []
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == target:
            sidecar_at_rename.append(checksum.read_sidecar(target))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    atomic_save(_training_ckpt(3), target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    assert sidecar_at_rename == [[digest]]  # the digest existed before the name did
    assert (tmp_path / "epoch=0-step=3.ckpt.digest").read_text() == f"{digest}  {target.name}\n"
    subprocess.run(["sha256sum", "--check", "--quiet", target.name + ".digest"], cwd=tmp_path, check=True)


def test_a_crash_while_overwriting_a_checkpoint_leaves_one_that_matches_its_sidecar(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"  # ModelCheckpoint's last.ckpt: saved again under one name
    atomic_save(_training_ckpt(1), path)
    old_digest = checksum.file_digest(path)
    real_replace = os.replace

    def killed_at_the_rename(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt  # the process dies between the sidecar and the checkpoint
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(_training_ckpt(2), path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(checksum.read_sidecar(path)) == 2 and old_digest in checksum.read_sidecar(path)
    assert verify_checksum(path) and AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 1

    atomic_save(_training_ckpt(3), path)  # the next save leaves only its own digest
    assert checksum.read_sidecar(path) == [checksum.file_digest(path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.digest"]


def test_overwriting_a_checkpoint_written_without_a_digest_keeps_a_crash_safe(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    torch.save(_training_ckpt(1), path)  # an older mmkit, or Lightning's writer: no sidecar
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt)
                        if Path(b) == path else real_replace(a, b))
    with pytest.raises(KeyboardInterrupt):
        atomic_save(_training_ckpt(2), path)
    assert verify_checksum(path) and load_checkpoint(path)["global_step"] == 1


def test_checkpoints_without_a_sidecar_still_load_unchecked(tmp_path):
    legacy = tmp_path / "epoch=0-step=7.ckpt"
    torch.save(_training_ckpt(7), legacy)
    assert verify_checksum(legacy) is False
    assert find_resumable_checkpoint([tmp_path]) == (legacy, [])
    assert AtomicCheckpointIO().load_checkpoint(legacy)["global_step"] == 7
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), checkpoint_callbacks=[], loggers=[])
    assert resolve_ckpt_path("last", trainer) == str(legacy)


def test_a_link_is_checked_as_the_file_it_points_at_and_removal_takes_the_sidecar(tmp_path):
    real = tmp_path / "epoch=0-step=4.ckpt"
    AtomicCheckpointIO().save_checkpoint(_training_ckpt(4), real)
    os.symlink(real.name, tmp_path / "last.ckpt")
    _flip_a_weight_byte(real)
    with pytest.raises(CheckpointLoadError, match="sha256"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    AtomicCheckpointIO().remove_checkpoint(real)  # ModelCheckpoint pruning its top-k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the dangling link only
    (tmp_path / "orphan.ckpt.digest").write_text("00  orphan.ckpt\n")
    assert checksum.remove_orphan_sidecars(tmp_path) == [tmp_path / "orphan.ckpt.digest"]


def test_lightning_still_numbers_slurm_checkpoints_right_next_to_digests_and_write_debris(tmp_path):
    """Lightning finds `hpc_ckpt_<N>.ckpt` by the digits of every name containing `hpc_ckpt_`."""
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    atomic_save(_training_ckpt(7), tmp_path / "hpc_ckpt_1.ckpt")
    assert _CheckpointConnector.hpc_save_path(tmp_path) == str(tmp_path / "hpc_ckpt_2.ckpt")
    # a SLURM kill during the next save: its temporary file, or its digest before the rename
    (tmp_path / ".hpc_ckpt_2.ckpt.k3x9q1.tmp").write_bytes(b"partial")
    (tmp_path / "hpc_ckpt_2.ckpt.digest").write_text("00  hpc_ckpt_2.ckpt\n")
    (tmp_path / "notes.tmp").write_text("not ours")
    removed = remove_write_debris(tmp_path)
    assert sorted(p.name for p in removed) == [".hpc_ckpt_2.ckpt.k3x9q1.tmp", "hpc_ckpt_2.ckpt.digest"]
    assert _CheckpointConnector.hpc_save_path(tmp_path) == str(tmp_path / "hpc_ckpt_2.ckpt")
    assert (tmp_path / "notes.tmp").exists() and verify_checksum(tmp_path / "hpc_ckpt_1.ckpt")


def test_export_refuses_a_damaged_checkpoint(tmp_path):
    from mmkit.cli import main

    damaged = tmp_path / "epoch=0-step=3.ckpt"
    atomic_save(_training_ckpt(3), damaged)
    _flip_a_weight_byte(damaged)
    recipe = Path(__file__).parents[2] / "recipes" / "default.yaml"
    with pytest.raises(CheckpointLoadError, match=rf"{damaged}.*sha256"):
        main(["export", "--config", str(recipe), "--ckpt_path", str(damaged), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
