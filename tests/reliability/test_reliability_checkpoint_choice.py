"""`--ckpt_path last` chooses by what each checkpoint records about its place in training, not by
file times: a copied run folder (`cp -r`, rsync, a restore) has new, arbitrary modification times."""

import os
import shutil
import subprocess

import torch

from mmkit.checkpoint_io import atomic_save, find_resumable_checkpoint


def _ckpt(step: int, epoch: int = 0, batches: int | None = None) -> dict:
    batches = step if batches is None else batches
    progress = {"total": {"ready": batches, "completed": batches, "started": batches, "processed": batches}}
    loops = {"fit_loop": {"epoch_loop.batch_progress": progress}}
    return {"state_dict": {"w": torch.full((8,), float(step))}, "global_step": step, "epoch": epoch, "loops": loops}


def _set_mtime(path, seconds: int) -> None:
    os.utime(path, ns=(10**18 + seconds * 10**9,) * 2)


def test_a_copied_run_folder_resumes_its_furthest_checkpoint_not_the_file_copied_last(tmp_path):
    run = tmp_path / "run" / "checkpoints"
    for step in (50, 55, 60):
        atomic_save(_ckpt(step), run / f"epoch=0-step={step}.ckpt")
    os.symlink("epoch=0-step=60.ckpt", run / "last.ckpt")
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(tmp_path / "run"), str(copy)], check=True)  # no -p: new times
    # cp copies in directory order: make that order explicit, the older checkpoint copied last
    _set_mtime(copy / "checkpoints" / "epoch=0-step=60.ckpt", 1)
    _set_mtime(copy / "checkpoints" / "epoch=0-step=55.ckpt", 2)
    _set_mtime(copy / "checkpoints" / "epoch=0-step=50.ckpt", 3)

    path, skipped = find_resumable_checkpoint([copy / "checkpoints"], recursive=False)
    assert path is not None and path.name == "epoch=0-step=60.ckpt" and not skipped


def test_ties_in_global_step_are_broken_by_the_loops_progress_then_by_time(tmp_path):
    # Same global step: a checkpoint at a batch's end and one at its epoch's end (one more batch
    # completed), or a micro-batch of gradient accumulation.
    batch_end = tmp_path / "epoch=0-step=12.ckpt"
    epoch_end = tmp_path / "epoch-end.ckpt"
    atomic_save(_ckpt(12, batches=11), batch_end)
    atomic_save(_ckpt(12, batches=12), epoch_end)
    _set_mtime(epoch_end, 1)
    _set_mtime(batch_end, 2)
    assert find_resumable_checkpoint([tmp_path])[0] == epoch_end

    # Equal in everything recorded: the newer file.
    same = tmp_path / "hpc_ckpt_1.ckpt"
    shutil.copy(epoch_end, same)
    shutil.copy(str(epoch_end) + ".digest", str(same) + ".digest")
    _set_mtime(same, 3)
    assert find_resumable_checkpoint([tmp_path])[0] == same
    _set_mtime(same, 0)
    assert find_resumable_checkpoint([tmp_path])[0] == epoch_end


def test_training_progress_reads_lightning_checkpoints_and_tolerates_missing_fields():
    from mmkit.checkpoint_io import training_progress

    assert training_progress(_ckpt(7, epoch=1, batches=9))[:4] == (7, 1, 9, 9)
    assert training_progress({}) == (-1,) * 6
    assert training_progress({"global_step": 3, "loops": {"fit_loop": {}}})[0] == 3
