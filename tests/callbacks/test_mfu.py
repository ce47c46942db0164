"""FLOPs per training sample (counted once), achieved TFLOP/s and MFU, and the peak they are
measured against (GPU table, cached CPU probe)."""

import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from mmkit import CLIPPretrain
from mmkit.callbacks import Throughput
from mmkit.data import ImageTextDataModule, SyntheticShapes
from mmkit.models import OpenCLIP
from mmkit.models.dual_encoder import DualEncoder
from mmkit.models.spec import ModelSpec
from mmkit.training import peak_flops
from mmkit.training.flops import training_flops_per_sample
from mmkit.training.peak_flops import (
    cache_file,
    cpu_peak_tflops,
    gpu_peak_tflops,
    measure_matmul_tflops,
)

ARCH = str(Path(__file__).parents[1] / "models" / "tiny_test_arch.json")
PIXELS, TOKENS, HIDDEN, EMBED = 3 * 4 * 4, 8, 32, 16


class LinearTowers(DualEncoder):
    """Two bias-free linear layers per tower: FLOPs that can be counted by hand."""

    def __init__(self) -> None:
        super().__init__(EMBED)
        self.image_tower = nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, HIDDEN, bias=False), nn.Linear(HIDDEN, EMBED, bias=False))
        self.text_tower = nn.Sequential(nn.Linear(TOKENS, HIDDEN, bias=False), nn.Linear(HIDDEN, EMBED, bias=False))
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def _encode_image(self, images):
        return self.image_tower(images)

    def _encode_text(self, texts):
        return self.text_tower(texts.float())

    def log_scale_parameter(self):
        return self.log_scale


class LinearSpec(ModelSpec):
    def _build(self):
        return LinearTowers()


def test_flops_per_sample_equal_a_hand_count_and_leave_no_trace():
    rows = 6
    module = CLIPPretrain(LinearSpec())
    module.model = module.spec.build()
    batch = {"images": torch.randn(rows, 3, 4, 4), "texts": torch.randint(0, 50, (rows, TOKENS)), "image_id": torch.arange(rows)}
    rng = torch.get_rng_state()

    got = training_flops_per_sample(module, batch)

    def tower(inputs):  # first layer: forward + weight gradient (no input gradient); second: all three
        return 2 * (2 * inputs * HIDDEN + 3 * HIDDEN * EMBED)
    loss = 6 * rows * EMBED  # per sample: the B×B logits (forward) and their gradient to both sides
    assert got == pytest.approx(tower(PIXELS) + tower(TOKENS) + loss, rel=1e-6)
    assert all(p.grad is None for p in module.parameters())  # nothing accumulated
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is untouched


def _fit(tmp_path, **throughput):
    L.seed_everything(0)
    module = CLIPPretrain(OpenCLIP(ARCH), export_dir="")
    dm = ImageTextDataModule(train=SyntheticShapes(16, image_size=16), batch_size=4, preprocessing=module.preprocessing)
    callback = Throughput(window=2, warmup=0, **throughput)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[callback])
    trainer.fit(module, datamodule=dm)
    return callback, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_logged_tflops_and_mfu_follow_from_the_count_and_the_given_peak(tmp_path):
    callback, logged = _fit(tmp_path, peak_tflops=0.002)
    assert callback.flops_per_sample > 0 and (callback.peak, callback.peak_source) == (0.002, "peak_tflops setting")
    assert logged["train/tflops"] == pytest.approx(callback.flops_per_sample * logged["train/samples_per_sec"] / 1e12, rel=1e-5)
    assert logged["train/mfu"] == pytest.approx(logged["train/tflops"] / 0.002, rel=1e-5)


def test_without_a_peak_the_cpu_probe_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(peak_flops, "MIN_CPU_SHARE", 0.0)  # cached even when the test machine is busy
    callback, logged = _fit(tmp_path)
    (peak,) = json.loads(cache_file().read_text()).values()
    assert callback.peak == peak and "CPU matmul probe" in callback.peak_source
    assert cache_file().parent == tmp_path / "cache" / "mmkit"
    assert logged["train/mfu"] == pytest.approx(logged["train/tflops"] / peak, rel=1e-5)
    assert 0 < logged["train/mfu"] < 1


def test_mfu_off_logs_no_flops(tmp_path):
    callback, logged = _fit(tmp_path, mfu=False)
    assert callback.flops_per_sample is None
    assert "train/samples_per_sec" in logged and "train/tflops" not in logged and "train/mfu" not in logged


def test_cpu_peak_probe_runs_once_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peak_flops, "MIN_CPU_SHARE", 0.0)  # a 64×64 probe uses one thread of several
    calls = []

    def probe(dtype):
        calls.append(dtype)
        return measure_matmul_tflops(dtype, size=64, seconds=0.02)

    first, cached = cpu_peak_tflops(False, measure=probe)
    assert first > 0 and cached and calls == [torch.float32]
    assert cpu_peak_tflops(False, measure=probe) == (first, True) and len(calls) == 1  # cached
    cpu_peak_tflops(True, measure=probe)  # bf16 is another entry
    assert calls == [torch.float32, torch.bfloat16]
    assert len(json.loads(cache_file().read_text())) == 2
    cache_file().write_text("{not json")  # a damaged cache is measured again
    assert cpu_peak_tflops(False, measure=probe)[0] > 0 and len(calls) == 3


def test_the_probe_leaves_the_global_random_stream_alone(tmp_path, monkeypatch):
    """Whether the probe runs (empty cache) or not must not change a seeded run's random numbers."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    cpu_peak_tflops(False, measure=lambda dtype: measure_matmul_tflops(dtype, size=64, seconds=0.02))
    assert torch.equal(torch.rand(3), expected)


def test_a_probe_without_the_cores_is_used_but_not_cached(tmp_path, monkeypatch):
    """A probe that waits (as one does while other processes hold the cores) gets little CPU time
    for its wall time: its low peak serves this run and is measured again by the next."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def starved(dtype):
        time.sleep(0.2)
        return 0.01

    assert cpu_peak_tflops(False, measure=starved) == (0.01, False)
    assert not cache_file().exists()
    monkeypatch.setattr(peak_flops, "cpu_peak_tflops", lambda sixteen_bit: (0.01, False))
    value, source = peak_flops.peak_tflops(torch.device("cpu"), "32-true")
    assert value == 0.01 and "busy" in source and "not cached" in source


def test_gpu_peaks_by_device_name_and_precision():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", sixteen_bit=True) == 989.4
    assert gpu_peak_tflops("NVIDIA H100 PCIe", sixteen_bit=True) == 756.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", sixteen_bit=False) == 19.5
    assert gpu_peak_tflops("NVIDIA L4", sixteen_bit=True) == 121.0
    assert gpu_peak_tflops("Some Future GPU", sixteen_bit=True) is None


def test_compiled_towers_are_counted_eagerly_with_the_same_flops():
    # Compiled kernels bypass the counter: the count runs the towers eagerly (and compiles nothing).
    batch = {"images": torch.randn(4, 3, 16, 16), "texts": torch.randint(1, 400, (4, 8)), "image_id": torch.arange(4)}
    counts = []
    for compile in (False, True):
        torch.manual_seed(0)
        module = CLIPPretrain(OpenCLIP(ARCH), compile=compile)
        module.model = module.spec.build()
        if compile:
            module.model.compile_towers()
        counts.append(training_flops_per_sample(module, batch))
    assert counts[0] > 0 and counts[1] == counts[0]


def test_a_peak_below_what_the_run_reaches_is_reported(tmp_path):
    with pytest.warns(UserWarning, match=r"train/mfu is above 1.*peak_tflops setting"):
        _, logged = _fit(tmp_path, peak_tflops=1e-9)
    assert logged["train/mfu"] > 1
