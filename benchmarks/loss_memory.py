"""Peak memory and time of the CLIP loss, forward + backward on CPU: mmkit's tiled loss
(``ClipLoss(tile_size=T)``) against mmkit's plain ``ClipLoss()`` and open_clip's ``ClipLoss``.

    python benchmarks/loss_memory.py                      # B = 4k..64k, writes benchmarks/RESULTS.md
    python benchmarks/loss_memory.py --batches 4096 8192 --no-write

Every measurement runs in a fresh subprocess, so one run's allocator state or peak cannot leak
into the next. Peak extra memory = peak RSS during the runs minus RSS once the inputs exist
(the kernel's peak counter is reset at that point), so it counts the loss's own buffers plus
the two feature gradients (2·B·d·4 bytes, the same for every implementation). A plain run that
is predicted not to fit is skipped; one that runs out anyway is reported as such, not retried.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_file import write_section  # noqa: E402

GIB = 1024**3
HEADING = "## Contrastive loss memory and time (tiled vs plain)"
IMPLS = ("tiled", "plain", "open_clip")
# Extra bytes per B² element assumed before a plain implementation has been measured.
DEFAULT_B2_FACTOR = {"plain": 3 * 4, "open_clip": 6 * 4}


# --- worker: one implementation, one batch size, in its own process ----------------------


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    # Linux: writing 5 resets VmHWM (peak RSS) to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_loss(impl: str, tile: int):
    if impl == "tiled":
        from mmkit.losses import ClipLoss

        loss = ClipLoss(tile_size=tile)
        return lambda x, y, s: loss(x, y, s)["contrastive_loss"]
    if impl == "plain":
        from mmkit.losses import ClipLoss

        loss = ClipLoss()
        return lambda x, y, s: loss(x, y, s)["contrastive_loss"]
    if impl == "open_clip":
        from open_clip.loss import ClipLoss as OpenClipLoss

        loss = OpenClipLoss()
        return lambda x, y, s: loss(x, y, s)
    raise ValueError(impl)


def worker(impl: str, batch: int, dim: int, tile: int, repeats: int, budget: int) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    fn = _make_loss(impl, tile)
    log_scale = torch.tensor(2.6593, requires_grad=True)  # log(1/0.07), CLIP's initial value

    def step(x, y):
        loss = fn(x, y, log_scale.exp())
        loss.backward()
        return loss.item()

    # Warm-up on a small batch: kernels, thread pools and lazy imports are not the loss's memory.
    small = [F.normalize(torch.randn(256, dim), dim=1).requires_grad_() for _ in range(2)]
    step(*small)
    del small

    g = torch.Generator().manual_seed(0)
    x, y = (F.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_() for _ in range(2))
    # An allocation beyond the budget fails cleanly instead of waking the OOM killer (which
    # might pick someone else's process on this shared machine).
    vms = _proc_status("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (vms + budget, resource.RLIM_INFINITY))
    base = _proc_status("VmRSS")
    exact_peak = _reset_peak()
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, loss = [], None
    try:
        for _ in range(repeats):
            x.grad = y.grad = log_scale.grad = None
            t0 = time.perf_counter()
            loss = step(x, y)
            times.append(time.perf_counter() - t0)
    except (RuntimeError, MemoryError) as err:
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return {"status": "oom", "detail": str(err).splitlines()[0][:120]}
    if exact_peak:
        peak = _proc_status("VmHWM")
    else:  # ru_maxrss was never reset: only meaningful if the loss's peak exceeds start-up's
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, base_maxrss)
    return {
        "status": "ok",
        "extra_bytes": peak - base,
        "seconds": statistics.median(times),
        "times": times,
        "loss": loss,
        "threads": torch.get_num_threads(),
        "peak_method": "VmHWM reset" if exact_peak else "ru_maxrss",
    }


# --- driver -------------------------------------------------------------------------------


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_one(impl, batch, args, budget) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(batch), "--dim", str(args.dim), "--tile", str(args.tile)]
    cmd += ["--repeats", str(args.repeats if batch <= args.repeat_below else 1), "--budget-bytes", str(budget)]
    # The worker imports mmkit from this checkout, installed or not.
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"status": "failed", "detail": f"{how} {tail[0][:120]}", "wall": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def _fmt_gib(n: float, unit: str = "") -> str:
    return f"{n / GIB:.2f}{unit}" if n >= 0.1 * GIB else f"{n / 2**20:.0f} MiB"


def _cell(r: dict | None) -> tuple[str, str]:
    if r is None:
        return "–", "–"
    if r["status"] == "ok":
        return _fmt_gib(r["extra_bytes"]), f"{r['seconds']:.2f}"
    return r["status_text"], "–"


def render(results: dict, args, machine: dict) -> str:
    lines = [HEADING, ""]
    lines.append(f"Command: `{args.command}`")
    lines.append("")
    lines.append(
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['threads']} intra-op threads), open_clip {machine['open_clip']}, Python {machine['python']}; "
        f"load average {machine['load_before']} at start, {machine['load_after']} at end"
        + (
            " — **the machine was shared and under load (load average above the core count), so times are noisy.**"
            if machine["loaded"]
            else "."
        )
    )
    lines.append("")
    lines.append(
        f"Forward + backward of the symmetric InfoNCE on B×{args.dim} float32 unit features, single process. "
        f"Memory = peak RSS during the runs minus RSS with the inputs allocated (GiB unless marked MiB; "
        f"includes the two feature gradients, {2 * 4 * args.dim} bytes per sample). Time = median of "
        f"{args.repeats} runs for B ≤ {args.repeat_below}, one run above. tiled = `ClipLoss(tile_size={args.tile})`."
    )
    lines.append("")
    lines.append(
        "| B | tiled mem | plain mem | open_clip mem | tiled s | plain s | open_clip s "
        "| tiled/plain mem | tiled/plain time | loss tiled / plain |"
    )
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for batch in args.batches:
        row = results.get(batch, {})
        cells = {impl: _cell(row.get(impl)) for impl in IMPLS}
        t, p = row.get("tiled"), row.get("plain")
        both = t and p and t["status"] == "ok" and p["status"] == "ok"
        mem_ratio = f"{t['extra_bytes'] / p['extra_bytes']:.1%}" if both else "–"
        time_ratio = f"{t['seconds'] / p['seconds']:.2f}×" if both else "–"
        losses = f"{t['loss']:.5f} / {p['loss']:.5f}" if both else (f"{t['loss']:.5f} / –" if t and t["status"] == "ok" else "–")
        lines.append(
            f"| {batch} | {cells['tiled'][0]} | {cells['plain'][0]} | {cells['open_clip'][0]} "
            f"| {cells['tiled'][1]} | {cells['plain'][1]} | {cells['open_clip'][1]} | {mem_ratio} | {time_ratio} | {losses} |"
        )
    if results.get("sweep"):
        lines.append("")
        sweep = ", ".join(f"T={t}: {r['seconds']:.2f} s / {_fmt_gib(r['extra_bytes'], ' GiB')}" for t, r in results["sweep"].items() if r["status"] == "ok")
        lines.append(f"Tile sweep at B={args.sweep_batch} (time / memory): {sweep}.")
    lines.append("")
    lines.append(results.get("verdict", ""))
    return "\n".join(lines).rstrip() + "\n"


def verdict(results: dict, target_batch: int) -> str:
    ok = lambda c: "met" if c else "**missed**"  # noqa: E731
    row = results.get(target_batch, {})
    t, p = row.get("tiled"), row.get("plain")
    if not (t and t["status"] == "ok"):
        return f"Targets at B={target_batch}: not evaluated, the tiled run is missing."
    if p and p["status"] == "ok":
        mem, tim = t["extra_bytes"] / p["extra_bytes"], t["seconds"] / p["seconds"]
        return (
            f"Targets at B={target_batch}: memory {mem:.1%} of plain (< 5%: {ok(mem < 0.05)}), "
            f"time {tim:.2f}× plain (≤ 1.5×: {ok(tim <= 1.5)})."
        )
    # The plain loss did not run at the target batch: compare memory with its prediction
    # (bytes per B² element measured at the largest batch it ran at) and time at that batch.
    out = [f"Targets at B={target_batch}: the plain loss does not run there ({p['status_text'] if p else 'not run'})."]
    if p and p.get("predicted"):
        mem = t["extra_bytes"] / p["predicted"]
        out.append(f"Against its predicted need, tiled uses {mem:.1%} (< 5%: {ok(mem < 0.05)}).")
    both = [b for b, r in results.items() if isinstance(b, int) and all(r.get(i, {}).get("status") == "ok" for i in ("tiled", "plain"))]
    if both:
        b = max(both)
        tim = results[b]["tiled"]["seconds"] / results[b]["plain"]["seconds"]
        mem = results[b]["tiled"]["extra_bytes"] / results[b]["plain"]["extra_bytes"]
        out.append(
            f"At B={b}, the largest batch where both run: time {tim:.2f}× plain (≤ 1.5×: {ok(tim <= 1.5)}), "
            f"memory {mem:.1%} of plain."
        )
    return " ".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--tile", type=int, default=2048, help="tile size of the tiled loss")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement at small batches (median)")
    ap.add_argument("--repeat-below", type=int, default=8192, help="largest batch that is repeated")
    ap.add_argument("--budget-gib", type=float, default=22.0, help="skip/stop runs needing more than this")
    ap.add_argument("--sweep", type=int, nargs="*", default=[], help="tile sizes to time at --sweep-batch first")
    ap.add_argument("--sweep-batch", type=int, default=8192)
    ap.add_argument("--target-batch", type=int, default=32768)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "B"), help=argparse.SUPPRESS)
    ap.add_argument("--budget-bytes", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.dim, args.tile, args.repeats, args.budget_bytes)))
        return

    args.command = "python benchmarks/loss_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.command = args.command.strip()
    import torch

    try:
        import open_clip

        oc_version = open_clip.__version__
    except Exception:  # pragma: no cover - open_clip is a dependency
        oc_version = "n/a"
    cores = os.cpu_count()
    machine = {
        "cpu": _cpu_name(),
        "cores": cores,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "open_clip": oc_version,
        "python": platform.python_version(),
        "load_before": "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()),
    }
    max_load = os.getloadavg()[0]
    budget_cap = int(args.budget_gib * GIB)
    results: dict = {}

    def budget_now() -> int:
        # Never plan on memory that other users of the machine hold right now.
        return min(budget_cap, _available_bytes() - GIB)

    if args.sweep:
        results["sweep"] = {}
        for tile in args.sweep:
            sub = argparse.Namespace(**{**vars(args), "tile": tile})
            r = run_one("tiled", args.sweep_batch, sub, budget_now())
            results["sweep"][tile] = r
            print(f"sweep T={tile} B={args.sweep_batch}: {r}", flush=True)

    factor = dict(DEFAULT_B2_FACTOR)
    for batch in sorted(args.batches):
        results[batch] = {}
        for impl in args.impls:
            budget = budget_now()
            if impl in factor:
                predicted = factor[impl] * batch * batch
                if predicted > budget:
                    why = "does not fit" if predicted > budget_cap else "not run: memory in use by others"
                    results[batch][impl] = {
                        "status": "skipped",
                        "status_text": f"{why} (~{predicted / GIB:.0f} GiB predicted)",
                        "predicted": predicted,
                    }
                    print(f"B={batch} {impl}: {results[batch][impl]['status_text']}", flush=True)
                    continue
            r = run_one(impl, batch, args, budget)
            if r["status"] == "ok" and impl in factor:
                # Batches run in increasing order: the latest is the least distorted by
                # fixed overheads, so it predicts the next best (+5% margin).
                factor[impl] = 1.05 * r["extra_bytes"] / batch**2
            elif r["status"] == "oom":
                r["status_text"] = f"does not fit (> {budget / GIB:.0f} GiB)"
            elif r["status"] == "failed":
                r["status_text"] = f"failed: {r['detail']}"
            results[batch][impl] = r
            max_load = max(max_load, os.getloadavg()[0])
            print(f"B={batch} {impl}: {r}", flush=True)

    machine["load_after"] = "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())
    machine["loaded"] = max(max_load, os.getloadavg()[0]) > cores
    results["verdict"] = verdict(results, args.target_batch)
    section = render(results, args, machine)
    print(section)
    if not args.no_write:
        write_section(args.out, HEADING, section)
        print(f"wrote {args.out}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
