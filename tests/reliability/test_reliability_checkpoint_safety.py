"""Checkpoints that carry code are refused before anything unpickles them, by name: a single file
that references a function; library loads inside ``weights_only_everywhere``. The payload (which
would only create a marker file in tmp_path) never runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from mmkit.checkpoint_io import CheckpointLoadError, find_resumable_checkpoint, load_checkpoint


class _Touch:
    """Unpickled, this creates ``marker`` and does nothing else: the proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.touch, (self.marker,)


# -- single files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [os.system, exec], ids=["os.system", "exec"])
def test_a_checkpoint_file_that_references_code_is_refused_as_such_not_called_corrupt(tmp_path, code):
    path = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "loops": {}, "hook": code}, path)  # a reference, never called
    name = f"{code.__module__}.{code.__name__}"  # posix.system (os.system on Linux), builtins.exec
    for error in (_error(lambda: load_checkpoint(path)), find_resumable_checkpoint([tmp_path])[1][0][1]):
        assert f"{path} references {name}, which a checkpoint never needs" in error
        assert "carries code" in error and "refused" in error
        assert "truncated or corrupt" not in error and "False" not in error  # no advice to load it unsafely


def test_torch_loads_inside_weights_only_everywhere_run_no_code(tmp_path):
    from mmkit.safe_unpickle import weights_only_everywhere

    marker, path = tmp_path / "pwned", tmp_path / "blob.pt"
    torch.save({"hook": _Touch(marker)}, path)
    with weights_only_everywhere(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)  # what DeepSpeed and torch.distributed.checkpoint ask for
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def _error(call) -> str:
    with pytest.raises(CheckpointLoadError) as e:
        call()
    return str(e.value)
