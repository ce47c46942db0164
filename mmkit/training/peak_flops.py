"""Peak TFLOP/s of the device a run trains on, the denominator of MFU.

GPUs: a table of the vendors' dense peaks (no sparsity) by ``torch.cuda.get_device_name``, 16-bit
(bf16/fp16 tensor cores) or fp32 by the trainer's precision. CPUs: measured by a short matmul
probe and cached (``$XDG_CACHE_HOME/mmkit/peak_tflops.json``, default ``~/.cache/mmkit``) per CPU
model, dtype and thread count, so later runs do not pay for it. A probe that did not have the
cores to itself (other processes running) reads too low: it is used for that run but not cached.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

# Substring of the device name -> (16-bit, fp32) dense peak TFLOP/s. Longer names first: "H100
# PCIe" must win over "H100". fp32 is plain fp32 (PyTorch's default matmul precision, no TF32).
GPU_PEAK_TFLOPS: list[tuple[str, tuple[float, float]]] = [
    ("H100 PCIe", (756.0, 51.2)),
    ("H100 NVL", (835.0, 60.0)),
    ("H100", (989.4, 66.9)),
    ("H200", (989.4, 66.9)),
    ("GH200", (989.4, 66.9)),
    ("B200", (2250.0, 80.0)),
    ("A100", (312.0, 19.5)),
    ("A10G", (70.0, 31.2)),
    ("A10", (125.0, 31.2)),
    ("L40S", (362.0, 91.6)),
    ("L4", (121.0, 30.3)),
    ("RTX 4090", (165.2, 82.6)),
    ("RTX 3090", (71.0, 35.6)),
    ("V100", (125.0, 15.7)),
    ("T4", (65.0, 8.1)),
]


def is_16bit(precision) -> bool:
    """Whether a Lightning precision setting ("bf16-mixed", "16-true", 32, ...) multiplies in 16 bits."""
    return str(precision).startswith(("bf16", "16"))


def gpu_peak_tflops(device_name: str, sixteen_bit: bool) -> float | None:
    """The table's peak for a CUDA device name; None for a device it does not know."""
    for key, (half, single) in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return half if sixteen_bit else single
    return None


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mmkit" / "peak_tflops.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def measure_matmul_tflops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """Best TFLOP/s of ``size``×``size`` matmuls on the CPU over about ``seconds`` (after one warm-up)."""
    # Its own generator: drawing from the global one would make a run's random numbers depend on
    # whether the probe ran (cache empty) or not.
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e12)
    return best


MIN_CPU_SHARE = 0.75  # of wall time × threads the probe must get as CPU time for its result to be kept


def cpu_peak_tflops(sixteen_bit: bool, measure=measure_matmul_tflops) -> tuple[float, bool]:
    """(This CPU's matmul TFLOP/s at the run's dtype and thread count, whether it is cached):
    read from the cache, else measured, and cached when the probe had the cores to itself (its CPU
    time at least ``MIN_CPU_SHARE`` of wall time × threads; a busy machine gives a low peak)."""
    dtype = torch.bfloat16 if sixteen_bit else torch.float32
    key = f"{_cpu_name()}|{str(dtype).removeprefix('torch.')}|threads={torch.get_num_threads()}"
    path = cache_file()
    cached = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}  # a damaged cache is measured again and rewritten
    if key in cached:
        return float(cached[key]), True
    wall, cpu = time.perf_counter(), time.process_time()
    value = measure(dtype)
    share = (time.process_time() - cpu) / max(1e-9, (time.perf_counter() - wall) * torch.get_num_threads())
    if share < MIN_CPU_SHARE:
        return value, False  # measured again by the next run
    cached[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)  # atomic: ranks probing at once do not tear the file
    except OSError:
        return value, False  # a read-only home: measured again next run
    return value, True


def peak_tflops(device: torch.device, precision) -> tuple[float | None, str]:
    """(peak TFLOP/s of one device, where it comes from); None when unknown (an unlisted GPU)."""
    sixteen_bit = is_16bit(precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak_tflops(name, sixteen_bit), f"{name} table, {'16-bit' if sixteen_bit else 'fp32'}"
    if device.type == "cpu":
        value, cached = cpu_peak_tflops(sixteen_bit)
        where = (f"cached in {cache_file()}" if cached
                 else "not cached: the machine was busy or the cache is not writable; measured again next run")
        return value, f"CPU matmul probe ({where})"
    return None, f"no peak known for {device.type} devices"
