"""DeepSpeed ZeRO-2 and ZeRO-3 (and ZeRO-3 with CPU offload) on CPU, with real gloo processes.

Lightning refuses DeepSpeed without CUDA, so mmkit's side is tested in two ways:

1. DeepSpeed itself: 2 processes build engines with ``deepspeed.initialize`` over mmkit's
   ``CLIPPretrain`` (tiny open_clip dual encoder + ``ClipLoss``, whose feature gather is
   ``mmkit.distributed.all_gather_with_grad``), using the shipped JSON configs, and take one step
   with per-rank batch 4. Loss, gradients (gathered from the ZeRO partitions) and updated fp32
   weights equal one process's AdamW step on the batch of 8. Also: exact chunked accumulation
   (several ``engine.backward`` per step), mmkit's skipped step for a non-finite loss, the
   temperature clamp reaching DeepSpeed's master weights, and the ZeRO checkpoint consolidated
   to one file and exported by ``mmkit export``.
2. mmkit's ``DeepSpeedStrategy`` (``mmkit.parallel.deepspeed_strategy``) with only Lightning's
   CUDA checks removed (``deepspeed_cpu.CPUDeepSpeedStrategy``): the shipped ZeRO-3 recipe run
   through ``mmkit fit`` on 2 processes (the model built whole and partitioned by the engine,
   manual optimisation, clipping via the DeepSpeed config, export at the end of fit, a DeepSpeed
   checkpoint directory) against the same recipe on one process with the double batch.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed: pip install -e '.[dev]'"),
]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ARCH = str(HERE.parent / "models" / "tiny_test_arch.json")
WORLD, PER_RANK = 2, 4
LR, MAX_SCALE = 1e-3, 10.0  # log(10) < log(1/0.07): the clamp acts on the first step
# (DeepSpeed JSON, how the step's gradient is made): every config plainly; the ones whose gradient
# path differs for several backward passes per step, or a skipped step, also that way.
# zero3_partitioned: zero3.json with no small parameter kept whole, as in a large model.
RUNS = [("zero2", "plain"), ("zero3", "plain"), ("zero3_offload", "plain"), ("zero3_partitioned", "plain"),
        ("zero2", "chunks"), ("zero3_partitioned", "chunks"), ("zero2", "skip"), ("zero3", "skip")]


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * PER_RANK, 3, 16, 16, generator=g), torch.randint(1, 400, (WORLD * PER_RANK, 8), generator=g)


def _module():
    from mmkit import CLIPPretrain
    from mmkit.losses import ClipLoss
    from mmkit.models import OpenCLIP

    torch.manual_seed(0)
    module = CLIPPretrain(OpenCLIP(ARCH), loss=ClipLoss(), lr=LR, export_dir="")
    module.configure_model()
    return module


def _optimizer(module):
    from mmkit.training.optim import param_groups

    # mmkit's own optimizer (configure_optimizers needs a trainer): AdamW over its parameter groups.
    return torch.optim.AdamW(param_groups(module, 0.1), lr=LR, betas=(0.9, 0.98), eps=1e-6)


def _ds_config(name: str) -> dict:
    from deepspeed_cpu import ds_config  # what Lightning adds to a shipped config (precision: fp32 here)

    return ds_config(name, PER_RANK)


def _in_engine_forward(engine, module, step):
    from deepspeed_cpu import in_engine_forward

    return in_engine_forward(engine, module, step)


def _engine_worker(rank: int, world: int, out: str) -> None:
    import deepspeed_cpu

    deepspeed_cpu.init_process(rank, world)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from mmkit import distributed as D
    from mmkit.parallel import deepspeed_support as ds
    from mmkit.parallel.ops import parallel_ops
    from mmkit.parallel.deepspeed_strategy import broadcastable_0dim_params
    from mmkit.training.grad_cache import chunked_backward

    images, texts = _batch()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results: dict = {}
    for name, mode in RUNS:
        module = _module()
        with broadcastable_0dim_params():  # as mmkit's DeepSpeedStrategy builds its engine
            engine, optimizer, _, _ = deepspeed.initialize(
                model=module, optimizer=_optimizer(module), config=_ds_config(name), dist_init_required=False
            )
        start = time.perf_counter()
        if mode == "skip":  # mmkit's non-finite step: backward, then zero_grad instead of step
            bad = module.compute_loss(engine(images[rows], texts[rows]), {})["contrastive_loss"] * float("nan")
            engine.backward(bad)
            optimizer.zero_grad(set_to_none=True)
        if mode == "chunks":  # base.training_step's path for accumulate_chunks=2, inside the engine's forward
            def step():
                with ds.coalesced_backward(engine, 2):
                    return chunked_backward(
                        module.forward, lambda **o: module.compute_loss(o, {}), images[rows], texts[rows], 2,
                        engine.backward, lambda: ds.no_sync(engine),
                    )

            loss = _in_engine_forward(engine, module, step)["contrastive_loss"]
        else:
            loss = module.compute_loss(engine(images[rows], texts[rows]), {})["contrastive_loss"]
            engine.backward(loss)
        grads = {n: safe_get_full_grad(p).clone() for n, p in module.named_parameters()}  # collectives
        engine.step()
        parallel_ops(module).clamp_(module.model.log_scale_parameter(), 0.0, math.log(MAX_SCALE))
        state = ds.full_state_dict(module)  # fp32 master weights, gathered
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=name.startswith("zero3")):
            working = {n: p.detach().clone() for n, p in module.named_parameters()}  # the model's own copy
        with torch.no_grad(), ds.gathered(module):  # outside any forward, as zero-shot evaluation runs
            text_features = module.model.encode_text(texts[:3])
        ckpt = Path(out) / f"{name}-{mode}"
        engine.save_checkpoint(str(ckpt), tag="checkpoint")  # what Lightning's strategy calls
        seconds = time.perf_counter() - start
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            results[(name, mode)] = {"loss": mean_loss / world, "grads": grads, "state": state, "working": working,
                                     "text_features": text_features, "ckpt": str(ckpt), "seconds": seconds}
        dist.barrier()
    if rank == 0:
        with D.local_only():  # one process, the whole batch
            module = _module()
            optimizer = _optimizer(module)
            init = {n: p.detach().clone() for n, p in module.state_dict().items()}
            loss = module.compute_loss(module(images, texts), {})["contrastive_loss"]
            loss.backward()
            grads = {n: p.grad.clone() for n, p in module.named_parameters()}
            optimizer.step()
            module.model.clamp_logit_scale(MAX_SCALE)
            with torch.no_grad():
                text_features = module.model.encode_text(texts[:3])
        results["reference"] = {"loss": loss.detach(), "grads": grads, "state": module.state_dict(), "init": init,
                                "text_features": text_features}
        torch.save(results, Path(out) / "results.pt")


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    from dist_utils import run_on_processes

    out = tmp_path_factory.mktemp("deepspeed")
    start = time.perf_counter()
    run_on_processes(_engine_worker, WORLD, str(out))
    results = torch.load(out / "results.pt", weights_only=False)
    results["wall_seconds"] = time.perf_counter() - start
    print(f"\nDeepSpeed engine runs: {results['wall_seconds']:.0f}s wall for 2 processes and {len(RUNS)} engines; "
          + ", ".join(f"{n}/{m} {results[(n, m)]['seconds']:.1f}s" for n, m in RUNS))
    return results


@pytest.mark.parametrize("name,mode", RUNS, ids=[f"{n}-{m}" for n, m in RUNS])
def test_zero_step_equals_one_process_with_the_double_batch(engine_runs, name, mode):
    run, ref = engine_runs[(name, mode)], engine_runs["reference"]
    assert run["loss"].item() == pytest.approx(ref["loss"].item(), abs=1e-6)
    # The gathered feature gradients and DeepSpeed's averaging over ranks give the batch-of-8 gradient.
    assert set(run["grads"]) == set(ref["grads"]) and len(ref["grads"]) > 30
    for n, g in ref["grads"].items():
        # fp32 sums in another order: error relative to the tensor's largest entry (up to ~20 here).
        assert (run["grads"][n] - g).abs().max() <= 2e-6 * (1 + g.abs().max()), n
    # Updated fp32 weights. AdamW divides each gradient by its own running magnitude, so a
    # gradient that is float noise (the attention key biases', zero in exact arithmetic) moves
    # its weight by up to lr·|g|/(|g|+eps) either way: hence 5e-5 against steps of lr = 1e-3.
    moved = max((ref["state"][n] - ref["init"][n]).abs().max().item() for n in ref["grads"])
    assert moved > 0.5 * LR
    for n in ref["grads"]:
        assert torch.allclose(run["state"][n], ref["state"][n], rtol=0, atol=5e-5), n
        assert torch.equal(run["working"][n], run["state"][n]), n  # fp32: the model's copy is the master's
    # The model can be called outside a forward (zero-shot classifier) inside ``gathered``.
    assert torch.allclose(run["text_features"], ref["text_features"], rtol=0, atol=1e-3)


@pytest.mark.parametrize("name,mode", RUNS, ids=[f"{n}-{m}" for n, m in RUNS])
def test_temperature_clamp_reaches_the_master_weights(engine_runs, name, mode):
    # The clamp edits DeepSpeed's fp32 master copy, or the next step would undo it.
    assert engine_runs[(name, mode)]["state"]["model.clip.logit_scale"].item() == pytest.approx(math.log(MAX_SCALE), abs=1e-6)


def _export_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "model:\n  class_path: mmkit.CLIPPretrain\n  init_args:\n"
        f"    model: {{class_path: mmkit.models.OpenCLIP, init_args: {{arch: {ARCH}}}}}\n"
    )
    return recipe


def _exported(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "open_clip_model.safetensors"))


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_zero_checkpoint_consolidates_and_exports(engine_runs, name, tmp_path):
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from mmkit.cli import main
    from mmkit.parallel.deepspeed_support import consolidated_state_dict, is_deepspeed_checkpoint

    run = engine_runs[(name, "plain")]
    ckpt = Path(run["ckpt"])
    assert is_deepspeed_checkpoint(ckpt) and not is_deepspeed_checkpoint(tmp_path)
    if name == "zero3":  # every rank wrote its own shard of the weights
        assert len(list((ckpt / "checkpoint").glob("*model_states.pt"))) == WORLD
    merged = consolidated_state_dict(ckpt)
    assert set(merged) == set(run["state"])
    for n, value in run["state"].items():
        assert torch.equal(merged[n], value), n

    # One file (Lightning's converter) and the directory itself both export like any other run.
    single = tmp_path / "consolidated.ckpt"
    convert_zero_checkpoint_to_fp32_state_dict(str(ckpt), str(single))
    recipe = _export_recipe(tmp_path)
    for source, out in ((ckpt, tmp_path / "export_dir"), (single, tmp_path / "export_file")):
        main(["export", "--config", str(recipe), "--ckpt_path", str(source), "--out", str(out)])
        weights = _exported(out)
        assert set(weights) == {n[len("model.clip."):] for n in run["state"]}
        for n, value in weights.items():
            assert torch.equal(value, run["state"]["model.clip." + n]), n


# -- mmkit's DeepSpeedStrategy, through `mmkit fit` with the shipped ZeRO-3 recipe ---------------
def _fit(out: Path, devices: int, batch: int, chunks: int, deepspeed_config: str | None,
         recipe: str = "recipes/clip_deepspeed_zero3.yaml", extra: tuple[str, ...] = ()) -> None:
    strategy = (["--trainer.strategy", "deepspeed_cpu.CPUDeepSpeedStrategy", "--trainer.strategy.config", deepspeed_config]
                if deepspeed_config else ["--trainer.strategy", "auto"])
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(out / "ckpt"), "save_last": True}}]
    if deepspeed_config:
        callbacks.append({"class_path": "deepspeed_cpu.RecordDeepSpeed", "init_args": {"out": str(out)}})
    cmd = [
        sys.executable, str(HERE / "deepspeed_fit_script.py"), "fit", "--config", recipe,
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), *strategy,
        "--trainer.precision", "32-true", "--trainer.max_steps", "2", "--trainer.val_check_interval", "null",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(out),
        "--trainer.callbacks", json.dumps(callbacks),
        "--model.init_args.model.init_args.arch", ARCH,
        "--model.init_args.accumulate_chunks", str(chunks), "--model.init_args.max_logit_scale", str(MAX_SCALE),
        "--model.init_args.warmup_steps", "1", "--model.init_args.grad_clip_norm", "0.5",
        "--model.init_args.export_dir", str(out / "export"),
        "--data.init_args.train", '{class_path: mmkit.data.SyntheticShapes, init_args: {size: 64, seed: 0, image_size: 16}}',
        "--data.init_args.val", "null", "--data.init_args.batch_size", str(batch), "--data.init_args.num_workers", "0",
        "--data.init_args.persistent_workers", "false", "--data.init_args.pin_memory", "false",
        "--data.init_args.train_augment", "false", "--test_after_fit", "false", *extra,
    ]
    subprocess.run(cmd, check=True, timeout=900, cwd=ROOT)


def test_lightning_deepspeed_zero3_recipe_matches_one_process(tmp_path):
    """ZeRO-3 on 2 processes (batch 4 each, exact chunked accumulation in 2 chunks, clipping at
    0.5) takes the same 2 steps as one plain process with batch 8: same exported weights."""
    start = time.perf_counter()
    _fit(tmp_path / "ds", WORLD, PER_RANK, 2, "recipes/deepspeed/zero3.json")
    ds_seconds = time.perf_counter() - start
    _fit(tmp_path / "ref", 1, WORLD * PER_RANK, 1, None)
    print(f"\nLightning DeepSpeed ZeRO-3 fit, 2 processes: {ds_seconds:.0f}s; one-process reference: "
          f"{time.perf_counter() - start - ds_seconds:.0f}s")

    engine = json.loads((tmp_path / "ds" / "engine.json").read_text())
    assert engine["engine"] == "DeepSpeedEngine" and engine["zero_stage"] == 3 and engine["world_size"] == WORLD
    assert engine["global_step"] == 2
    assert engine["gradient_clipping"] == 0.5  # the module's grad_clip_norm, written into the config by mmkit
    assert engine["master_log_scale"] <= math.log(MAX_SCALE) + 1e-6  # clamped after step 1, then one more step

    ds_weights, ref_weights = _exported(tmp_path / "ds" / "export"), _exported(tmp_path / "ref" / "export")
    assert set(ds_weights) == set(ref_weights)
    for n, ref in ref_weights.items():
        # Measured max difference 2.6e-7 after the 2 AdamW steps; margin for noise-level gradients (engine test).
        assert torch.allclose(ds_weights[n], ref, rtol=0, atol=2e-5), n

    # The sharded checkpoint Lightning wrote exports to exactly the weights exported at the end of fit.
    ckpt = tmp_path / "ds" / "ckpt" / "last.ckpt"
    assert ckpt.is_dir()
    from mmkit.cli import main

    main(["export", "--config", str(_export_recipe(tmp_path)), "--ckpt_path", str(ckpt), "--out", str(tmp_path / "from_ckpt")])
    for n, value in _exported(tmp_path / "from_ckpt").items():
        assert torch.equal(value, ds_weights[n]), n


# -- benchmarks/gpu_check.sh ------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run the check")
def test_gpu_check_refuses_cleanly_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    start = time.perf_counter()
    sh = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert sh.returncode == 3 and "no CUDA GPU" in sh.stderr, sh.stderr
    py = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
    assert py.returncode == 3 and "no CUDA GPU" in py.stderr, py.stderr
    assert time.perf_counter() - start < 240
    usage = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert usage.returncode == 0 and "--strategies" in usage.stdout


def test_lightning_deepspeed_zero2_recipe_trains_and_exports(tmp_path):
    """The shipped ZeRO-2 recipe (its strategy swapped for the CPU stand-in of mmkit's
    DeepSpeedStrategy, since Lightning's refuses CPUs) on 2 processes: a ZeRO-2 engine takes the steps and the
    run exports."""
    _fit(tmp_path / "ds", WORLD, PER_RANK, 1, "recipes/deepspeed/zero2.json", recipe="recipes/clip_deepspeed_zero2.yaml")
    engine = json.loads((tmp_path / "ds" / "engine.json").read_text())
    assert engine["zero_stage"] == 2 and engine["world_size"] == WORLD and engine["global_step"] == 2
    assert _exported(tmp_path / "ds" / "export")


@pytest.mark.parametrize("config", ["recipes/deepspeed/zero2.json", "recipes/deepspeed/zero3.json"])
def test_compiled_towers_under_deepspeed_match_one_eager_process(config, tmp_path):
    """``compile: true`` under ZeRO-2 and ZeRO-3 (2 processes, batch 4 each, 2 chunks): the same 2
    steps as one eager process with batch 8 (exported weights within float32 noise)."""
    _fit(tmp_path / "ds", WORLD, PER_RANK, 2, config, extra=("--model.init_args.compile", "true"))
    _fit(tmp_path / "ref", 1, WORLD * PER_RANK, 1, None)
    ds_weights, ref_weights = _exported(tmp_path / "ds" / "export"), _exported(tmp_path / "ref" / "export")
    assert set(ds_weights) == set(ref_weights)
    for n, ref in ref_weights.items():
        assert torch.allclose(ds_weights[n], ref, rtol=0, atol=2e-5), n
