"""Checkpoints that carry code are refused before anything unpickles them: a crafted ``.metadata``
or non-tensor item in an FSDP2 (torch.distributed.checkpoint) folder, a crafted DeepSpeed
``*.pt``, a single file that references a function. ``mmkit export``, ``--ckpt_path last`` and an
explicit folder all refuse them by name, and the payload (which would only create a marker file in
tmp_path) never runs. Genuine folders still pass; a sharded folder in a one-device run is skipped."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmkit.checkpoint_io import (
    CheckpointLoadError,
    atomic_save,
    check_resumable,
    find_resumable_checkpoint,
    load_checkpoint,
    resolve_ckpt_path,
)

ARCH = str(Path(__file__).resolve().parents[1] / "models" / "tiny_test_arch.json")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


class _Touch:
    """Unpickled, this creates ``marker`` and does nothing else: the proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _module():
    from mmkit import CLIPPretrain
    from mmkit.models import OpenCLIP

    torch.manual_seed(0)
    module = CLIPPretrain(OpenCLIP(ARCH), export_dir="")
    module.configure_model()
    return module


def _fsdp2_folder(folder: Path, module) -> Path:
    """What Lightning's ModelParallelStrategy (``strategy: fsdp2``) writes, from one process: the
    module's and optimizer's states as torch.distributed.checkpoint shards with their ``.metadata``
    index (the same classes as a 2-process FSDP2 run's), and Lightning's ``meta.pt``."""
    import torch.distributed.checkpoint as dcp

    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving from one process"
        dcp.save({"state_dict": module.state_dict(), "optimizer_0": optimizer.state_dict()}, checkpoint_id=folder)
    torch.save({"global_step": 2, "epoch": 0, "loops": {}, "hyper_parameters": {}}, folder / "meta.pt")
    return folder


def _rewrite_metadata(folder: Path, change) -> None:
    with (folder / ".metadata").open("rb") as f:
        metadata = pickle.load(f)  # our own genuine file
    change(metadata)
    with (folder / ".metadata").open("wb") as f:
        pickle.dump(metadata, f, protocol=4)


def _export(tmp_path: Path, ckpt: Path, out: str = "export") -> Path:
    from mmkit.cli import main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("model:\n  class_path: mmkit.CLIPPretrain\n  init_args:\n"
                      f"    model: {{class_path: mmkit.models.OpenCLIP, init_args: {{arch: {ARCH}}}}}\n")
    main(["export", "--config", str(recipe), "--ckpt_path", str(ckpt), "--out", str(tmp_path / out)])
    return tmp_path / out


def _fsdp2_trainer(root: Path):
    from mmkit.parallel.fsdp2_strategy import FSDP2Strategy

    return SimpleNamespace(default_root_dir=str(root), checkpoint_callbacks=[], loggers=[], strategy=FSDP2Strategy())


def _live(marker: Path, load) -> None:
    """The crafted file is a real attack: an unsafe load of it creates the marker."""
    load()
    assert marker.exists()
    marker.unlink()


# -- FSDP2 / torch.distributed.checkpoint ---------------------------------------------------------
@pytest.fixture
def genuine_fsdp2(tmp_path):
    module = _module()
    return module, _fsdp2_folder(tmp_path / "checkpoints" / "last.ckpt", module)


def test_a_genuine_fsdp2_folder_passes_the_checks_and_exports(genuine_fsdp2, tmp_path):
    from safetensors.torch import load_file

    module, folder = genuine_fsdp2
    assert check_resumable(folder)["global_step"] == 2
    weights = load_file(str(_export(tmp_path, folder) / "open_clip_model.safetensors"))
    assert set(weights) == {k[len("model.clip."):] for k in module.state_dict()}
    for name, value in module.state_dict().items():
        assert torch.equal(weights[name[len("model.clip."):]], value), name


def test_crafted_dcp_metadata_is_refused_and_never_unpickled(genuine_fsdp2, tmp_path, capsys):
    _, folder = genuine_fsdp2
    marker = tmp_path / "pwned"
    _rewrite_metadata(folder, lambda md: setattr(md.storage_meta, "modules", [_Touch(marker)]))
    _live(marker, lambda: pickle.loads((folder / ".metadata").read_bytes()))
    older = folder.parent / "epoch=0-step=1.ckpt"
    atomic_save({"state_dict": {}, "global_step": 1, "loops": {}}, older)
    os.utime(older, ns=(10**18, 10**18))
    refusal = rf"{folder / '.metadata'} references pathlib.Path.touch, which a checkpoint never needs"

    with pytest.raises(CheckpointLoadError, match=refusal):
        _export(tmp_path, folder)
    assert not marker.exists()

    found, skipped = find_resumable_checkpoint([folder.parent], recursive=False)
    assert found == older.resolve() and [p for p, _ in skipped] == [folder]
    assert "references pathlib.Path.touch" in skipped[0][1]
    assert resolve_ckpt_path("last", _fsdp2_trainer(tmp_path)) == str(older.resolve())
    assert f"skipped {folder}" in capsys.readouterr().out
    with pytest.raises(CheckpointLoadError, match=refusal):
        resolve_ckpt_path(str(folder), _fsdp2_trainer(tmp_path))
    with pytest.raises(CheckpointLoadError, match=refusal):  # Trainer.fit(ckpt_path=folder) from Python
        _fsdp2_trainer(tmp_path).strategy.load_checkpoint(folder)
    assert not marker.exists()


def test_crafted_non_tensor_item_in_a_dcp_shard_is_refused(genuine_fsdp2, tmp_path):
    """torch loads a shard's non-tensor items (optimizer hyperparameters) with weights_only=False:
    a benign index can point one at a crafted blob."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    _, folder = genuine_fsdp2
    marker = tmp_path / "pwned"
    blob = io.BytesIO()
    torch.save(_Touch(marker), blob, pickle_protocol=4)
    shard = folder / "__0_0.distcp"
    offset = shard.stat().st_size
    with shard.open("ab") as f:
        f.write(blob.getvalue())

    def point_lr_at_blob(md):
        (key,) = [k for k in md.storage_data if k.fqn == "optimizer_0.param_groups.0.lr"]
        md.storage_data[key] = _StorageInfo(relative_path=shard.name, offset=offset, length=len(blob.getvalue()))

    _rewrite_metadata(folder, point_lr_at_blob)
    _live(marker, lambda: torch.load(io.BytesIO(blob.getvalue()), weights_only=False))
    refusal = rf"{shard} \(its item optimizer_0.param_groups.0.lr\) references pathlib.Path.touch"

    with pytest.raises(CheckpointLoadError, match=refusal):
        _export(tmp_path, folder)
    found, skipped = find_resumable_checkpoint([folder.parent], recursive=False)
    assert found is None and [p for p, _ in skipped] == [folder]
    with pytest.raises(CheckpointLoadError, match=refusal):
        resolve_ckpt_path(str(folder), _fsdp2_trainer(tmp_path))
    assert not marker.exists()


def test_a_dcp_index_that_points_outside_its_folder_is_refused(genuine_fsdp2):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    _, folder = genuine_fsdp2

    def escape(md):
        key = next(iter(md.storage_data))
        md.storage_data[key] = _StorageInfo(relative_path="../elsewhere.distcp", offset=0, length=10)

    _rewrite_metadata(folder, escape)
    with pytest.raises(CheckpointLoadError, match=r"points outside its folder \('../elsewhere.distcp'\)"):
        check_resumable(folder)


# -- DeepSpeed -------------------------------------------------------------------------------------
def _deepspeed_folder(folder: Path, model_states: dict, protocol: int = 2) -> Path:
    """The layout DeepSpeed (and Lightning's DeepSpeedStrategy) writes: ``latest`` naming a tag folder."""
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    torch.save(model_states, folder / "checkpoint" / "mp_rank_00_model_states.pt", pickle_protocol=protocol)
    return folder


@needs_deepspeed
def test_crafted_deepspeed_model_states_are_refused_and_never_unpickled(tmp_path):
    from mmkit.parallel.deepspeed_strategy import DeepSpeedStrategy

    marker = tmp_path / "pwned"
    folder = _deepspeed_folder(tmp_path / "checkpoints" / "last.ckpt",
                               {"module": {"w": torch.zeros(2)}, "ds_version": "0.19.8", "hook": _Touch(marker)},
                               protocol=4)  # torch's weights_only loader stops at its opcodes: the name still comes out
    states = folder / "checkpoint" / "mp_rank_00_model_states.pt"
    _live(marker, lambda: torch.load(states, weights_only=False))
    refusal = rf"{states} references pathlib.Path.touch, which a checkpoint never needs"

    with pytest.raises(CheckpointLoadError, match=refusal):
        _export(tmp_path, folder)
    assert not marker.exists()

    found, skipped = find_resumable_checkpoint([folder.parent], recursive=False)
    assert found is None and [p for p, _ in skipped] == [folder] and "pathlib.Path.touch" in skipped[0][1]
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), checkpoint_callbacks=[], loggers=[],
                              strategy=DeepSpeedStrategy(stage=2))
    with pytest.raises(CheckpointLoadError, match=r"no usable checkpoint"):
        resolve_ckpt_path("last", trainer)
    with pytest.raises(CheckpointLoadError, match=refusal):
        resolve_ckpt_path(str(folder), trainer)
    with pytest.raises(CheckpointLoadError, match=refusal):  # Trainer.fit(ckpt_path=folder) from Python
        trainer.strategy.load_checkpoint(folder)
    assert not marker.exists()


@needs_deepspeed
def test_deepspeed_objects_its_real_checkpoints_hold_are_admitted_and_nothing_else(tmp_path):
    from collections import OrderedDict

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from mmkit.parallel.sharded_checkpoint import verify_deepspeed_checkpoint

    # What a ZeRO-2 run's zero_pp_rank_*_optim_states.pt holds besides tensors and containers.
    optim = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                      "param_slice_mappings": [OrderedDict(w=fragment_address(numel=2, start=0))],
                                      "single_partition_of_fp32_groups": [torch.zeros(2)]}}
    folder = _deepspeed_folder(tmp_path / "ds", {"module": OrderedDict(w=torch.zeros(2)), "ds_version": "0.19.8"})
    torch.save(optim, folder / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    verify_deepspeed_checkpoint(folder)

    (folder / "latest").write_text("../../elsewhere")  # DeepSpeed would read another folder's files
    with pytest.raises(CheckpointLoadError, match="not a folder inside"):
        verify_deepspeed_checkpoint(folder)


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


# -- a sharded folder in a one-device run ------------------------------------------------------------
def test_last_skips_sharded_folders_a_one_device_run_cannot_load(genuine_fsdp2, tmp_path, capsys):
    import lightning as L

    _, fsdp2 = genuine_fsdp2
    run = fsdp2.parent
    good = run / "epoch=0-step=0.ckpt"
    # Behind the FSDP2 folder in training (and older): under FSDP2 the folder is the one to resume.
    atomic_save({"state_dict": {}, "global_step": 0, "loops": {}}, good)
    os.utime(good, ns=(10**18, 10**18))
    unfinished = run / "zzz.ckpt"
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"shards")
    deepspeed = run / "ds.ckpt"
    (deepspeed / "checkpoint").mkdir(parents=True)
    (deepspeed / "latest").write_text("checkpoint")
    (deepspeed / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"never read")

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    assert resolve_ckpt_path("last", trainer) == str(good.resolve())
    out = capsys.readouterr().out
    for folder, kind in ((fsdp2, "an FSDP2"), (unfinished, "an FSDP2"), (deepspeed, "a DeepSpeed")):
        assert f"skipped {folder}: checkpoint {folder} is {kind}" in out
    assert out.count("which this run's strategy cannot load (it loads single checkpoint files only)") == 3
    with pytest.raises(CheckpointLoadError, match=rf"{fsdp2} is an FSDP2 .*cannot load"):
        resolve_ckpt_path(str(fsdp2), trainer)
    # Under FSDP2 the same finished folder is the one to resume from.
    assert resolve_ckpt_path("last", _fsdp2_trainer(tmp_path)) == str(fsdp2)
