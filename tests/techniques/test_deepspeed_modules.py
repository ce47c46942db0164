"""MetricAlign, KDStudent and AlignGAN (``mode: gradient_reversal``) under DeepSpeed ZeRO-2 and
ZeRO-3 on CPU, with real gloo processes; and AlignGAN's refusal of ``mode: alternating``.

As ``test_deepspeed.py`` does for CLIPPretrain: 2 processes build engines with
``deepspeed.initialize`` over each module (torch AdamW, the shipped ``recipes/deepspeed`` JSON;
ZeRO-3 with every parameter partitioned) and take 2 steps with per-rank batch 4, running each
step inside the engine's forward as Lightning does. Loss, gradients (gathered from the ZeRO
partitions) and updated fp32 weights equal one process's 2 AdamW steps on the batches of 8. All
runs share one pair of processes (each process imports Lightning and DeepSpeed once).

- MetricAlign: projection heads + VSE++ hardest-negative ``RankingLoss`` with the cross-batch
  memory queue (the second step ranks against the first step's global batch; image ids shared
  across the rank boundary and with queued rows are never negatives).
- KDStudent: a frozen teacher of another width (so ``DistillationLoss`` owns a learned projection,
  which must train as on one process); the teacher stays out of the engine, the optimizer and the
  ZeRO partitions, unchanged, and gives one process's outputs (under ZeRO-3 it is even built
  before the engine).
- AlignGAN (ZeRO-3 here): D inside the engine (its gradients reduced by DeepSpeed once, not by
  hand again), spectral norm included.

AlignGAN under ZeRO-2 instead runs its own ``training_step`` in a 2-process fit by mmkit's
DeepSpeed strategy (``deepspeed_align_gan_fit_script.py``) against one plain process with the
double batch; ``mode: alternating`` is refused under that strategy.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed: pip install -e '.[dev]'"),
]

HERE = Path(__file__).resolve().parent
ARCH = str(HERE.parent / "models" / "tiny_test_arch.json")  # embed 16, 16 px, context 8
WORLD, PER_RANK, STEPS = 2, 4, 2
LR, MAX_SCALE = 1e-3, 10.0
MODULES = ("metric_align", "kd_student", "align_gan")
# Stage name -> shipped JSON; ZeRO-3 with no small parameter kept whole, as in a large model.
STAGES = {"zero2": "zero2", "zero3": "zero3_partitioned"}
# AlignGAN under ZeRO-2 runs through mmkit's DeepSpeedStrategy instead (its training_step).
RUNS = [(m, s) for m in MODULES for s in STAGES if (m, s) != ("align_gan", "zero2")]


def _teacher_arch(folder: Path) -> str:
    """Another width (24), resolution (24 px) and context length (12) than the student."""
    path = folder / "teacher_arch.json"
    path.write_text(json.dumps({
        "embed_dim": 24,
        "vision_cfg": {"image_size": 24, "layers": 1, "width": 48, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 1},
    }))
    return str(path)


def _batches() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    n = WORLD * PER_RANK
    # Step 1: rows 3 (rank 0) and 4 (rank 1) show one image. Step 2: ids 2 and 6 are in the queue.
    ids = [[0, 1, 2, 3, 3, 5, 6, 7], [8, 9, 2, 11, 12, 13, 6, 15]]
    return [
        {
            "images": torch.randn(n, 3, 16, 16, generator=g),
            "texts": torch.randint(1, 400, (n, 8), generator=g),
            "teacher_images": torch.randn(n, 3, 24, 24, generator=g),
            "teacher_texts": torch.randint(1, 400, (n, 12), generator=g),
            "image_id": torch.tensor(ids[step]),
        }
        for step in range(STEPS)
    ]


def _module(name: str, teacher_arch: str):
    from mmkit import AlignGAN, KDStudent, MetricAlign
    from mmkit.losses import DistillationLoss, RankingLoss
    from mmkit.models import OpenCLIP, Teacher

    torch.manual_seed(0)
    common = dict(lr=LR, export_dir="")
    if name == "metric_align":  # no head dropout: nothing random, so 2 x 4 can equal 1 x 8
        module = MetricAlign(OpenCLIP(ARCH), loss=RankingLoss(negatives="hardest", memory_size=12),
                             projection_head=True, head_dropout=0.0, **common)
    elif name == "kd_student":
        loss = DistillationLoss(contrastive=1.0, similarity=1.0, feature=1.0, interactive=1.0, temperature=2.0)
        module = KDStudent(OpenCLIP(ARCH), teacher=Teacher(OpenCLIP(teacher_arch)), loss=loss, **common)
    else:  # constant reversal weight: the encoders get D's reversed gradient from the first step
        module = AlignGAN(OpenCLIP(ARCH), mode="gradient_reversal", objective="bce", adv_weight=0.5,
                          grl_schedule="constant", d_hidden_dim=32, d_lr=1e-2, **common)
    module.configure_model()
    return module


def _optimizer(name: str, module):
    from mmkit.training.optim import param_groups

    # The module's own optimizer (configure_optimizers needs a trainer for its schedule).
    groups = param_groups(module, 0.1)
    if name == "align_gan":  # AlignGAN.configure_optimizers, gradient_reversal: D in its own group
        d = {id(p) for p in module.discriminator.parameters()}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in d]} for g in groups]
        groups.append({"params": list(module.discriminator.parameters()), "lr": module.d_lr,
                       "betas": module.d_betas, "weight_decay": module.d_weight_decay})
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.98), eps=1e-6)


def _terms(name: str, module, batch: dict) -> dict:
    """The step's loss terms, as the module's ``training_step`` computes them (its forward called
    directly, as there)."""
    outputs = module.forward(batch["images"], batch["texts"])
    if name == "align_gan":
        return module._reversal_loss(outputs, batch)
    return module.compute_loss(outputs, batch)


def _trainable(module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def _worker(rank: int, world: int, out: str) -> None:
    import deepspeed_cpu

    deepspeed_cpu.init_process(rank, world)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    import math

    from mmkit import distributed as D
    from mmkit.parallel import deepspeed_support as ds
    from mmkit.parallel.ops import parallel_ops
    from mmkit.parallel.deepspeed_strategy import broadcastable_0dim_params
    from mmkit.techniques.base import loss_total

    folder = Path(out)
    teacher_arch = str(folder / "teacher_arch.json")
    batches = _batches()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results: dict = {}
    for name, stage in RUNS:
        start = time.perf_counter()
        module = _module(name, teacher_arch)
        if name == "kd_student" and stage == "zero3":
            module.teacher  # built before the engine: it must still stay out of it
        with broadcastable_0dim_params():  # as mmkit's DeepSpeedStrategy builds its engine
            engine, _, _, _ = deepspeed.initialize(model=module, optimizer=_optimizer(name, module),
                                                   config=deepspeed_cpu.ds_config(STAGES[stage], PER_RANK),
                                                   dist_init_required=False)
        steps = []
        for batch in batches:
            local = {k: v[rows] for k, v in batch.items()}

            def step():
                terms = _terms(name, module, local)
                engine.backward(loss_total(terms))  # manual_backward under DeepSpeed
                return terms

            terms = deepspeed_cpu.in_engine_forward(engine, module, step)
            if name == "align_gan":
                parallel_ops(module).after_backward()  # training_step's call after the backward
            grads = {n: safe_get_full_grad(p).clone() for n, p in module.named_parameters() if p.requires_grad}
            engine.step()
            parallel_ops(module).clamp_(module.model.log_scale_parameter(), 0.0, math.log(MAX_SCALE))
            loss = loss_total(terms).detach().clone()
            dist.all_reduce(loss)
            steps.append({"loss": loss / world, "grads": grads})
        run = {"steps": steps, "params": sorted(n for n, _ in module.named_parameters()),
               "whole": sorted(n for n, p in module.named_parameters() if p.numel() > 0)}
        run["state"] = ds.full_state_dict(module)  # fp32 master weights, gathered
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=stage == "zero3"):
            run["working"] = {n: p.detach().clone() for n, p in module.named_parameters()}
        run["mastered"] = sorted(n for n, p in module.named_parameters() if safe_get_full_fp32_param(p) is not None)
        if name == "kd_student":
            teacher = module._teacher
            engine_params = {id(p) for p in engine.module.parameters()}
            run["teacher"] = {
                "in_engine": any(id(p) in engine_params for p in teacher.parameters()),
                "deepspeed_attrs": sorted({a for p in teacher.parameters() for a in vars(p) if a.startswith(("ds_", "_hp", "_z3"))}),
                "requires_grad": any(p.requires_grad or p.grad is not None for p in teacher.parameters()),
                "training": teacher.training,
                "state": {k: v.clone() for k, v in teacher.state_dict().items()},
                # The whole batch on one rank (no collective): only a whole, unpartitioned teacher can.
                "outputs": teacher(batches[0]["teacher_images"], batches[0]["teacher_texts"]),
            }
        run["seconds"] = time.perf_counter() - start
        if rank == 0:
            results[(name, stage)] = run
        dist.barrier()
    if rank == 0:
        with D.local_only():  # one process, the whole batches
            for name in MODULES:
                module = _module(name, teacher_arch)
                optimizer = _optimizer(name, module)
                ref = {"init": {k: v.clone() for k, v in module.state_dict().items()}, "steps": [],
                       "trainable": _trainable(module)}
                for batch in batches:
                    loss = loss_total(_terms(name, module, batch))
                    loss.backward()
                    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    module.model.clamp_logit_scale(MAX_SCALE)
                    ref["steps"].append({"loss": loss.detach(), "grads": grads})
                ref["state"] = module.state_dict()
                if name == "kd_student":
                    fresh = _module(name, teacher_arch).teacher
                    ref["teacher"] = {"state": fresh.state_dict(),
                                      "outputs": fresh(batches[0]["teacher_images"], batches[0]["teacher_texts"])}
                results[(name, "reference")] = ref
        torch.save(results, folder / "results.pt")


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    from dist_utils import run_on_processes

    out = tmp_path_factory.mktemp("deepspeed_modules")
    _teacher_arch(out)
    start = time.perf_counter()
    run_on_processes(_worker, WORLD, str(out))
    results = torch.load(out / "results.pt", weights_only=False)
    print(f"\nDeepSpeed module engine runs: {time.perf_counter() - start:.0f}s wall for 2 processes and {len(RUNS)} engines; "
          + ", ".join(f"{m}/{s} {results[(m, s)]['seconds']:.1f}s" for m, s in RUNS))
    return results


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    # fp32 sums in another order: error relative to the tensor's largest entry.
    return bool((a.float() - b.float()).abs().max() <= rel * (1 + b.float().abs().max()))


def _assert_trained_alike(state: dict, ref_state: dict, ref_steps: list[dict], names: list[str]) -> None:
    """Updated fp32 weights after the steps (measured: within 7e-7). AdamW divides each gradient
    by its own running magnitude, so an entry whose gradient is float noise (the attention key
    biases': zero in exact arithmetic, ~1e-7 here against ~1 elsewhere in the tensor) moves by up
    to lr per step either way: for those entries only that bound holds."""
    lr_max = 1e-2  # the largest learning rate here (AlignGAN's D)
    for n in names:
        got, want = state[n], ref_state[n]
        g = torch.stack([s["grads"][n].abs() for s in ref_steps]).amax(0)
        noise = g <= 1e-5 * g.max()
        assert torch.allclose(got[~noise], want[~noise], rtol=0, atol=5e-6), n
        assert ((got - want)[noise].abs() <= len(ref_steps) * lr_max * 1.01).all(), n


@pytest.mark.parametrize("name,stage", RUNS, ids=[f"{m}-{s}" for m, s in RUNS])
def test_zero_steps_equal_one_process_with_the_double_batch(engine_runs, name, stage):
    run, ref = engine_runs[(name, stage)], engine_runs[(name, "reference")]
    # DeepSpeed trains exactly the module's trainable parameters (a loss's own included); under
    # ZeRO-3 each process holds a partition of every one (heads, D and the KD projection too).
    assert run["mastered"] == sorted(ref["trainable"])
    assert run["whole"] == ([] if stage == "zero3" else run["params"])
    for got, want in zip(run["steps"], ref["steps"], strict=True):
        assert got["loss"].item() == pytest.approx(want["loss"].item(), rel=1e-5, abs=1e-6)
        assert set(got["grads"]) == set(want["grads"])
        for n, g in want["grads"].items():
            assert _close(got["grads"][n], g, 1e-5), n
    _assert_trained_alike(run["state"], ref["state"], ref["steps"], ref["trainable"])
    for n in ref["trainable"]:
        assert not torch.equal(ref["state"][n], ref["init"][n]), n  # every trained weight moved
        assert torch.equal(run["working"][n], run["state"][n]), n  # fp32: the model's copy is the master's
    # Frozen parameters and buffers (MetricAlign's queue, D's spectral-norm vectors) as on one process.
    assert set(run["state"]) == set(ref["state"])
    for n, value in ref["state"].items():
        if n not in ref["trainable"]:
            assert torch.allclose(run["state"][n].to(value.dtype), value, rtol=0, atol=1e-5), n


def test_metric_align_queue_and_loss_parameters(engine_runs):
    ref = engine_runs[("metric_align", "reference")]
    assert int(ref["state"]["loss.0.memory.count"]) == 12  # step 2 ranked against step 1's 8 rows
    assert "model.clip.logit_scale" not in ref["trainable"]  # a hinge loss: temperature frozen
    assert any(n.startswith("image_head.") for n in ref["trainable"])


def test_kd_projection_trains_and_teacher_stays_out_of_deepspeed(engine_runs):
    ref = engine_runs[("kd_student", "reference")]
    assert "loss.projection.weight" in ref["trainable"]  # the loss's own parameter, trained
    assert ref["steps"][0]["grads"]["loss.projection.weight"].abs().max() > 0
    for stage in STAGES:
        teacher = engine_runs[("kd_student", stage)]["teacher"]
        assert not teacher["in_engine"] and teacher["deepspeed_attrs"] == [], stage
        assert not teacher["requires_grad"] and not teacher["training"], stage
        assert set(teacher["state"]) == set(ref["teacher"]["state"])
        for k, v in ref["teacher"]["state"].items():  # untouched by the steps
            assert torch.equal(teacher["state"][k], v), (stage, k)
        for k, v in ref["teacher"]["outputs"].items():
            assert torch.allclose(teacher["outputs"][k], v, rtol=0, atol=1e-6), (stage, k)


def test_align_gan_alternating_is_refused_under_deepspeed():
    import lightning as L
    from deepspeed_cpu import CPUDeepSpeedStrategy

    from mmkit import AlignGAN
    from mmkit.models import OpenCLIP

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=CPUDeepSpeedStrategy(stage=2), logger=False)
    refused = AlignGAN(OpenCLIP(ARCH), mode="alternating", export_dir="")
    refused.trainer = trainer
    with pytest.raises(ValueError, match=r"mode: alternating needs two optimizers.*use mode: gradient_reversal"):
        refused.configure_model()
    allowed = AlignGAN(OpenCLIP(ARCH), mode="gradient_reversal", export_dir="")
    allowed.trainer = trainer
    allowed.configure_model()
    assert allowed.discriminator is not None


def test_lightning_deepspeed_fits_align_gan_gradient_reversal(tmp_path):
    """AlignGAN's own ``training_step`` under mmkit's DeepSpeedStrategy (ZeRO-2, 2 processes,
    batch 4 each): the same 2 steps as one plain process with batch 8 (loss, encoder and D
    gradients, trained weights). D's gradients are reduced by DeepSpeed alone."""
    import subprocess
    import sys

    from deepspeed_align_gan_fit_script import run

    root = HERE.parents[1]
    start = time.perf_counter()
    cmd = [sys.executable, str(HERE / "deepspeed_align_gan_fit_script.py"), str(tmp_path / "ds"), str(WORLD),
           str(PER_RANK), str(root / "recipes" / "deepspeed" / "zero2.json")]
    subprocess.run(cmd, check=True, timeout=600, cwd=root)
    ds_seconds = time.perf_counter() - start
    run(tmp_path / "ref", 1, WORLD * PER_RANK, None)
    print(f"\nLightning DeepSpeed ZeRO-2 AlignGAN fit, 2 processes: {ds_seconds:.0f}s; one-process reference: "
          f"{time.perf_counter() - start - ds_seconds:.0f}s")
    got, want = torch.load(tmp_path / "ds" / "result.pt"), torch.load(tmp_path / "ref" / "result.pt")
    assert got["world"] == WORLD and got["zero_stage"] == 2 and want["zero_stage"] is None
    assert got["global_step"] == want["global_step"] == 2 and len(got["steps"]) == len(want["steps"]) == 2
    for g, w in zip(got["steps"], want["steps"], strict=True):
        assert g["loss"].item() == pytest.approx(w["loss"].item(), rel=1e-5, abs=1e-6)
        assert set(g["grads"]) == set(w["grads"]) and any(n.startswith("discriminator.") for n in w["grads"])
        for n, grad in w["grads"].items():
            assert _close(g["grads"][n], grad, 1e-5), n
    assert set(got["state"]) == set(want["state"])
    trained = list(want["steps"][0]["grads"])
    _assert_trained_alike(got["state"], want["state"], want["steps"], trained)
    for n, value in want["state"].items():  # D's spectral-norm vectors
        if n not in trained:
            assert torch.allclose(got["state"][n].to(value.dtype), value, rtol=0, atol=1e-5), n
