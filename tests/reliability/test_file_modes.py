"""Checkpoints, their digests, metrics.csv and exports get the mode the umask allows (0644 under
the usual 022), not mkstemp's or safetensors' owner-only 0600: a serving pod or a colleague with
another uid reading the runs volume must be able to load them."""

import os
import stat

import pytest
import torch

from mmkit.checkpoint_io import atomic_save
from mmkit.checksum import sidecar_path
from mmkit.file_modes import give_folder_usual_modes


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_checkpoints_and_their_digests_are_readable_by_others(tmp_path, umask_022):
    path = tmp_path / "ckpt" / "last.ckpt"
    atomic_save({"w": torch.ones(2)}, path)
    assert _mode(path) == 0o644
    assert _mode(sidecar_path(path)) == 0o644


def test_a_tighter_umask_is_honoured(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_save({"w": torch.ones(2)}, tmp_path / "x.ckpt")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "x.ckpt") == 0o600


def test_export_folders_get_the_usual_modes(tmp_path, umask_022, tiny_export_model):
    out = tiny_export_model.export(tmp_path / "export")
    os.chmod(out / "open_clip_model.safetensors", 0o600)  # as safetensors >= 0.8 writes it
    give_folder_usual_modes(out)
    assert {p.name: _mode(p) for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}


@pytest.fixture
def tiny_export_model():
    from mmkit.models.spec import OpenCLIP

    return OpenCLIP(arch="mmkit-tiny", image_size=32).build()
