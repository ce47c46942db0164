"""Fused vs math attention kernel on this CPU (issue 17): what ``mmkit/models/attention_kernels.py``
chooses from. Forward + backward of one ``scaled_dot_product_attention`` call per kernel, dtype and
sequence length (the shapes of CLIP towers), then one whole mmkit-tiny training step in bf16 with
each kernel (the same model and batch, in-memory).

    python benchmarks/attention_kernels.py [--threads 2] [--repeats 3] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import write_section  # noqa: E402

HEADING = "## Attention kernels on the CPU: fused vs math, fp32 vs bf16 (issue 17)"
# (batch, heads, tokens, head width, causal): tiny presets' text and image, CLIP text, ViT-B/32, B/16, L/14-336
SHAPES = [(64, 4, 17, 32, False), (64, 4, 32, 32, True), (32, 12, 50, 64, False), (32, 12, 77, 64, True),
          (16, 12, 197, 64, False), (4, 16, 577, 64, False)]
KERNELS = {"fused": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def one_call(shape, dtype, kernel, repeats: int) -> float:
    b, h, n, d, causal = shape
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, requires_grad=True) for _ in range(3))

    def run():
        with sdpa_kernel([kernel]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.float().sum().backward()
    return median_ms(run, repeats)


def whole_step(kernel: str, repeats: int) -> float:
    """An mmkit-tiny CLIPPretrain-style step (forward, loss, backward, fused AdamW) in bf16 autocast;
    ``kernel``: "mmkit" (mmkit's choice) or "fused" (torch's default, forced for every tower)."""
    from mmkit.losses import ClipLoss
    from mmkit.models import OpenCLIP

    torch.manual_seed(0)
    spec = OpenCLIP("mmkit-tiny")
    model = spec.build().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(64, 3, 64, 64)
    texts = spec.preprocessing.tokenize([f"caption number {i}" for i in range(64)])
    loss_fn = ClipLoss()
    force = (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])) if kernel == "fused" else contextlib.nullcontext
    # mmkit's choice is made inside encode_*: the fused run calls the towers' own encoders instead.
    encode = (lambda x, t: (model._encode_image(x), model._encode_text(t))) if kernel == "fused" else \
        (lambda x, t: (model.encode_image(x, normalize=False), model.encode_text(t, normalize=False)))

    def run():
        with force(), torch.autocast("cpu", dtype=torch.bfloat16):
            img, txt = encode(images, texts)
            out = loss_fn(image_features=F.normalize(img.float(), dim=-1), text_features=F.normalize(txt.float(), dim=-1),
                          logit_scale=model.log_scale_parameter().exp())
        sum(v for k, v in out.items() if k.endswith("loss")).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return median_ms(run, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="record in benchmarks/RESULTS.md (run on an idle machine)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lines = [HEADING, "", f"Command: `python benchmarks/attention_kernels.py {' '.join(sys.argv[1:])}`", "",
             f"torch {torch.__version__}, {a.threads} threads, median of {a.repeats} after one warm-up; "
             "milliseconds for forward + backward of one call.", "",
             "| batch × heads × tokens × width (causal) | fp32 fused | fp32 math | bf16 fused | bf16 math | bf16: fused ÷ math |",
             "| --- | --- | --- | --- | --- | --- |"]
    for shape in SHAPES:
        t = {(str(dt), name): one_call(shape, dt, kern, a.repeats)
             for dt in (torch.float32, torch.bfloat16) for name, kern in KERNELS.items()}
        f32, b16 = str(torch.float32), str(torch.bfloat16)
        row = (f"| {' × '.join(map(str, shape[:4]))}{' (causal)' if shape[4] else ''} | {t[f32, 'fused']:.1f} | "
               f"{t[f32, 'math']:.1f} | {t[b16, 'fused']:.1f} | {t[b16, 'math']:.1f} | {t[b16, 'fused'] / t[b16, 'math']:.2f} |")
        print(row, flush=True)
        lines.append(row)
    fused, mmkit = whole_step("fused", a.repeats), whole_step("mmkit", a.repeats)
    lines += ["", f"Whole mmkit-tiny training step in bf16 autocast (batch 64, 64 px): torch's fused kernel {fused:.0f} ms, "
              f"mmkit's choice {mmkit:.0f} ms ({fused / mmkit:.2f}× faster)."]
    section = "\n".join(lines) + "\n"
    print(section)
    if a.write:
        write_section(HERE / "RESULTS.md", HEADING, section)


if __name__ == "__main__":
    main()
