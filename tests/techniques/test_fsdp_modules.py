"""MetricAlign, AlignGAN (both modes) and KDStudent under real FSDP2 (``strategy: fsdp2``, i.e.
Lightning's ModelParallelStrategy + fully_shard, the CPU route: 2 gloo processes, per-rank batch 4, float32)
take the step of one process with batch 8: the same gradients (sharded ones gathered to full
tensors; clipped, over sharded and replicated parameters together), losses and validation metrics. Also: MetricAlign's memory queue stays identical on both
ranks; AlignGAN's discriminator (replicated, not sharded) is identical on both ranks after its
steps; KDStudent's frozen teacher is sharded over the 2 ranks and stays out of the optimizer and
the checkpoint.

One subprocess (fsdp_modules_script.py) runs all four 2-process fits, to pay the imports once;
each one-process reference runs in this process.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fsdp_modules_script as script

SCRIPT = Path(__file__).with_name("fsdp_modules_script.py")
ATOL, RTOL = 1e-5, 1e-5  # float32: the sharded run reduces in another order


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    subprocess.run([sys.executable, str(SCRIPT), str(out), "2", "4", ",".join(script.SETTINGS)], check=True, timeout=900)
    return out


def _load(out: Path, name: str, world: int) -> list[dict]:
    return [torch.load(out / name / f"{name}_rank{r}.pt") for r in range(world)]


def _single(tmp_path: Path, name: str) -> dict:
    script.run_one(name, tmp_path / name, 1, 8)
    return _load(tmp_path, name, 1)[0]


def _assert_same_step(ranks: list[dict], single: dict, must_have: tuple[str, ...]) -> None:
    assert ranks[0]["world"] == 2 and single["world"] == 1
    ref = single["grads"]
    assert set(ranks[0]["grads"]) == set(ref) and len(ref) > 10
    for key in must_have:
        assert key in ref, key
    # The step clipped the global norm (sharded and replicated gradients together) to CLIP.
    assert torch.stack([g.norm() for g in ref.values()]).norm().item() == pytest.approx(script.CLIP, rel=1e-4)
    for name, g in ref.items():
        for rank in ranks:  # full gradients: the same on both ranks, and those of the big batch
            assert torch.allclose(rank["grads"][name], g, atol=ATOL, rtol=RTOL), name
    # The per-rank losses of an exact loss average to the loss of the whole batch.
    fsdp_loss = torch.tensor([r["losses"] for r in ranks]).mean(0)
    assert torch.allclose(fsdp_loss, torch.tensor(single["losses"]), atol=ATOL, rtol=RTOL)
    # Retrieval metrics are computed over the whole gathered split (11 + 10 rows).
    vals = [k for k in single["metrics"] if k.startswith("val/") and k != "val/loss"]
    assert "val/i2t_R@1" in vals
    for key in vals:
        assert ranks[0]["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-5), key


@pytest.mark.slow
def test_metric_align_with_head_hardest_negatives_and_memory_queue(fsdp, tmp_path):
    """Gradients at the second step, which ranks against the queue filled by the first."""
    ranks, single = _load(fsdp, "metric_align", 2), _single(tmp_path, "metric_align")
    _assert_same_step(ranks, single, ("image_head.net.weight", "text_head.net.bias"))
    assert "model.clip.logit_scale" not in single["grads"]  # unused by the hinge loss: frozen
    for key in ("train/ranking_active", "train/ranking_neg_sim", "train/ranking_gap"):  # global statistics
        assert ranks[0]["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-5), key
    queues = [r["memory"] for r in ranks]
    assert len(queues[0][0]) == 16
    assert all(torch.equal(a, b) for a, b in zip(*queues))
    for a, b in zip(queues[0], single["memory"]):
        assert torch.allclose(a.float(), b.float(), atol=ATOL), "the queue differs from the one-process run"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["alternating", "reversal"])
def test_align_gan_keeps_the_replicated_discriminator_identical(fsdp, tmp_path, mode):
    """Rank 1 starts from another D: it is copied from rank 0 at the start, and its averaged
    updates (2 critic steps, or one shared step) leave it bit-identical on both ranks."""
    name = f"align_gan_{mode}"
    ranks, single = _load(fsdp, name, 2), _single(tmp_path, name)
    _assert_same_step(ranks, single, ("model.clip.logit_scale",))
    if mode == "reversal":  # D learns from the encoders' backward: its averaged gradient
        assert any(k.startswith("discriminator.") for k in single["grads"])
    d0, d1, ref = ranks[0]["discriminator"], ranks[1]["discriminator"], single["discriminator"]
    assert set(d0) == set(ref) and len(ref) >= 6
    for key, value in ref.items():
        assert torch.equal(d0[key], d1[key]), f"discriminator.{key} differs between ranks"
        # Adam divides by |g|: float32 rounding of a near-zero gradient entry moves its update by
        # up to ~0.1% of one D step (d_lr 1e-2); the ranks themselves agree bit for bit.
        assert torch.allclose(d0[key], value, atol=1e-4, rtol=1e-4), f"discriminator.{key}"
    if mode == "alternating":
        assert ranks[0]["d_steps"] == ranks[1]["d_steps"] == single["d_steps"] == [2]
    for key in ("val/d_accuracy", "val/d_auc", "val/modality_gap"):
        assert ranks[0]["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-5), key


@pytest.mark.slow
def test_align_gan_averages_the_gradients_of_a_paired_loss_that_owns_parameters(fsdp, tmp_path):
    """A paired loss with its own (replicated) parameters: under FSDP2 their gradients must be
    averaged over ranks like the temperature's and D's, or each rank steps on its own half batch
    and the loss's weights drift apart (they did before the base step owned AlignGAN's step)."""
    name = "align_gan_owned_loss"
    ranks, single = _load(fsdp, name, 2), _single(tmp_path, name)
    _assert_same_step(ranks, single, ("loss.0.proj.weight", "loss.0.proj.bias", "model.clip.logit_scale"))
    for key, value in single["loss"].items():
        assert torch.equal(ranks[0]["loss"][key], ranks[1]["loss"][key]), f"loss.{key} differs between ranks"
        assert torch.allclose(ranks[0]["loss"][key], value, atol=1e-5, rtol=1e-5), f"loss.{key}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kd_student", "kd_student_chunked"])
def test_kd_student_shards_the_frozen_teacher_and_takes_the_same_step(fsdp, tmp_path, name):
    """Also with accumulate_chunks 2: the sharded teacher runs chunk by chunk on both ranks."""
    ranks, single = _load(fsdp, name, 2), _single(tmp_path, name)
    _assert_same_step(ranks, single, ("loss.projection.weight", "model.clip.logit_scale"))
    for key in ("train/similarity_kd_loss", "train/feature_kd_loss", "train/interactive_kd_loss"):
        fsdp_value = sum(r["metrics"][key] for r in ranks) / 2
        assert fsdp_value == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-6), key
    for rank in ranks:
        teacher = rank["teacher"]
        assert teacher["all_dtensors"] and teacher["mesh_sizes"] == [2]
        # Each rank holds about half of the teacher (dim-0 shards; padding rounds up).
        assert 0.45 < teacher["local_numel"] / teacher["full_numel"] < 0.55, teacher
        assert teacher["blocks_sharded"] >= 5  # 2 + 2 transformer blocks and the root
        assert not (teacher["requires_grad"] or teacher["in_optimizer"] or teacher["training"])
        assert rank["state_dict_keys"] == single["state_dict_keys"]  # no teacher in the checkpoint
    assert sum(r["teacher"]["local_numel"] for r in ranks) >= ranks[0]["teacher"]["full_numel"]
    assert single["teacher"]["local_numel"] == single["teacher"]["full_numel"]  # one process: whole
    assert not any("teacher" in k for k in single["state_dict_keys"])


@pytest.mark.slow
def test_kd_student_whole_fit_under_ddp_takes_the_same_step(tmp_path):
    """The whole KDStudent (student, frozen teacher, the loss's projection) under Lightning's DDP on 2
    processes: the same (clipped, averaged) gradients, losses and validation metrics as one process
    with the double batch; the teacher stays whole on each rank."""
    out = tmp_path / "ddp"
    subprocess.run([sys.executable, str(SCRIPT), str(out), "2", "4", "kd_student", "ddp"], check=True, timeout=900)
    ranks, single = _load(out, "kd_student", 2), _single(tmp_path, "kd_student")
    _assert_same_step(ranks, single, ("loss.projection.weight", "model.clip.logit_scale"))
    for rank in ranks:
        assert rank["teacher"]["local_numel"] == rank["teacher"]["full_numel"]
        assert not (rank["teacher"]["requires_grad"] or rank["teacher"]["in_optimizer"])
