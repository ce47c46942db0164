"""EWCIncremental under DDP, FSDP2 and DeepSpeed ZeRO-1/2 on 2 real gloo processes, against one
process with the double batch (fp32), all from one launch of tests/techniques/ewc_ddp_script.py:

- the Fisher (per-sample estimator) and anchor stored after task 0 (gathered whole) equal one
  process's, and so does a per-batch Fisher estimated at the end;
- on every step of task 1: the penalty's value and gradient, the step's whole gradient and the
  weights after the step equal one process's (the first step sits on the anchor, so its penalty
  is 0 by construction; the second one carries a sizeable penalty);
- FSDP stores Fisher and anchors sharded like the parameters, and its sharded checkpoint after
  task 0 resumes into the same task-1 steps;
- ZeRO-3 is refused with an error naming the alternatives.

DeepSpeed runs through mmkit's ``DeepSpeedStrategy`` minus Lightning's CUDA check
(``deepspeed_cpu.CPUDeepSpeedStrategy``), ZeRO-1, ZeRO-2 and ZeRO-2 with ``accumulate_chunks=2``.
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

pytestmark = pytest.mark.slow

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
DISTRIBUTED = ["ddp", "fsdp"] + (["zero1", "zero2", "zero2_chunks"] if HAVE_DEEPSPEED else [])
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed not installed: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import dist_utils
    from ewc_ddp_script import RUNS, worker

    out = tmp_path_factory.mktemp("ewc_sharded")
    names = [r for r in RUNS if HAVE_DEEPSPEED or not r.startswith("zero")]
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dist_utils, "TIMEOUT_S", 900)  # eight fits in one launch (a collective still times out after 300 s)
        dist_utils.run_on_processes(worker, 2, str(out), names)
    print(f"\nEWC strategy runs: {time.perf_counter() - start:.0f}s wall for {len(names)} fits on 2 processes")
    return {
        (name, rank): torch.load(out / f"{name}_rank{rank}.pt", weights_only=False)
        for name in names for rank in ((0,) if name == "single" else (0, 1))
    }


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    # fp32 sums in another order: error relative to the tensor's largest entry.
    return bool((a - b).abs().max() <= rel * (1e-12 + b.abs().max()))


def test_ddp_keeps_the_fisher_identical_across_ranks(runs):
    ranks = [runs[("ddp", r)] for r in range(2)]
    f0, f1 = (r["fisher"] for r in ranks)
    assert set(f0) == set(f1) and f0 and ranks[0]["world"] == 2
    for n in f0:
        assert torch.equal(f0[n], f1[n]), n
        assert torch.equal(ranks[0]["anchor"][n], ranks[1]["anchor"][n]), n
    # Each rank estimated on its own samples; the stored Fisher is their pooled mean (scaled to
    # mean 1: normalize_fisher).
    (s0, c0), (s1, c1) = (r["local"] for r in ranks)
    assert c0 > 0 and c1 > 0
    assert any(not torch.allclose(s0[n] / c0, s1[n] / c1) for n in s0)
    pooled = {n: (s0[n] + s1[n]) / (c0 + c1) for n in s0}
    mean = sum(float(f.double().sum()) for f in pooled.values()) / sum(f.numel() for f in pooled.values())
    for n in f0:
        assert torch.allclose(f0[n], pooled[n] / mean, rtol=1e-5, atol=1e-12), n
    assert ranks[0]["matrix"] == ranks[1]["matrix"]


@pytest.mark.parametrize("name", DISTRIBUTED)
def test_fisher_and_anchor_equal_one_process(runs, name):
    run, ref = runs[(name, 0)], runs[("single", 0)]
    assert run["world"] == 2 and ref["world"] == 1
    assert set(run["fisher"]) == set(ref["fisher"]) and "clip.logit_scale" in ref["fisher"]
    for n, f in ref["fisher"].items():
        assert f.max() > 0, n
        # Weights after task 0's 2 AdamW steps: AdamW divides each gradient by its own running
        # magnitude, so gradients that are float noise (attention key biases: 0 in exact arithmetic)
        # move their weights by noise-sized amounts either way; measured ≤ 2.3e-5.
        assert torch.allclose(run["anchor"][n], ref["anchor"][n], rtol=0, atol=5e-5), n
        # Estimated at those anchors: measured ≤ 4.4e-6 of the largest entry.
        assert _close(run["fisher"][n], f, 1e-4), n
        # The per-batch estimator (task 0 again, at the final weights): measured ≤ 1.3e-5.
        assert _close(run["per_batch"][n], ref["per_batch"][n], 1e-4), n
    for r in (0, 1):  # every rank holds the same whole Fisher (gathered from its shards under FSDP)
        for n, f in runs[(name, r)]["fisher"].items():
            assert torch.equal(f, run["fisher"][n]), (r, n)


@pytest.mark.parametrize("name", DISTRIBUTED + ["fsdp_resume"])
def test_task2_steps_equal_one_process(runs, name):
    run, ref = runs[(name, 0)], runs[("single", 0)]
    assert len(ref["steps"]) == len(run["steps"]) == 2
    assert ref["steps"][0]["penalty"] == 0.0  # the first step of task 1 starts at the anchor
    assert ref["steps"][1]["penalty"] > 0
    for i, (step, want) in enumerate(zip(run["steps"], ref["steps"])):
        assert step["penalty"] == pytest.approx(want["penalty"], rel=1e-4, abs=1e-9), i
        assert step["logged_ewc"] == pytest.approx(step["penalty"], rel=1e-6, abs=1e-9), i  # what the step applied
        assert set(step["grads"]) == set(want["grads"]), i
        # λ F (θ − θ*) inherits the anchors' noise (above): measured ≤ 4.7e-5 of the largest entry.
        for n, g in want["penalty_grads"].items():
            assert _close(step["penalty_grads"][n], g, 2e-4), (i, n)
        for n, g in want["grads"].items():
            assert _close(step["grads"][n], g, 2e-4), (i, n)
        for n, w in want["weights"].items():  # measured ≤ 2.6e-5 (see the anchors above)
            assert torch.allclose(step["weights"][n], w, rtol=0, atol=5e-5), (i, n)
    # The penalty's share of the second step's gradient is not negligible.
    pen, total = ref["steps"][1]["penalty_grads"], ref["steps"][1]["grads"]
    assert sum(float(g.square().sum()) for g in pen.values()) > 0.01 * sum(float(g.square().sum()) for g in total.values())


def test_fsdp_keeps_fisher_and_anchor_in_the_parameters_sharding(runs):
    states = [runs[("fsdp", r)] for r in (0, 1)]
    sharded = {n for n, d in states[0]["is_dtensor"].items() if d}
    assert sharded and set(states[0]["is_dtensor"]) - sharded == {"clip.logit_scale"}  # 0-dim: replicated
    numel, replicated = states[0]["numel"], sum(states[0]["fisher"][n].numel() for n in states[0]["fisher"] if n not in sharded)
    # Each rank stores its shard: the ranks' parts add up to the whole, replicated ones twice.
    assert states[0]["local_numel"] + states[1]["local_numel"] == numel + replicated
    assert max(s["local_numel"] for s in states) < 0.6 * numel


def test_fsdp_checkpoint_restores_the_sharded_penalty(runs):
    saved, resumed = runs[("fsdp", 0)], runs[("fsdp_resume", 0)]
    assert resumed["tasks_consolidated"] == 1 and resumed["is_dtensor"] == saved["is_dtensor"]
    for key in ("fisher", "anchor"):
        for n, t in saved[key].items():
            assert torch.equal(resumed[key][n], t), (key, n)
    for r in (0, 1):
        assert runs[("fsdp_resume", r)]["local_numel"] == runs[("fsdp", r)]["local_numel"]
    for i, (a, b) in enumerate(zip(resumed["steps"], saved["steps"])):
        assert a["penalty"] == pytest.approx(b["penalty"], rel=1e-6, abs=1e-12), i
        for n, w in b["weights"].items():
            assert torch.allclose(a["weights"][n], w, rtol=0, atol=1e-6), (i, n)


@needs_deepspeed
def test_deepspeed_zero3_is_refused(runs):
    for r in (0, 1):
        error = runs[("zero3", r)].get("error", "")
        assert "ZeRO stage 3" in error and "ZeRO stage 1 or 2" in error and "FSDP2" in error, error
