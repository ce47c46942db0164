"""The loss protocol (mmkit/losses/protocol.py) on its own: what reaches a loss, LossSum's weights,
names and declarations, the setup hook, every shipped loss's declarations, and the one cross-rank
normaliser (mmkit.distributed.mean_divisor / global_mean_divisor) on 1 and 2 processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dist_utils import run_on_processes
from mmkit import distributed as D
from mmkit.losses import (
    ClipLoss, DistillationLoss, FeatureDistillLoss, InteractiveContrastiveLoss, LossSum, PairedLoss, RankingLoss,
    SigLipLoss, SimilarityDistillLoss, TripletLoss,
)
from mmkit.losses.protocol import as_loss, call_loss, loss_context, scale_terms, uses_logit_bias, uses_logit_scale


def _outputs(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = lambda: torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)  # noqa: E731
    return {"image_features": f(), "text_features": f(), "logit_scale": torch.tensor(10.0), "logit_bias": torch.tensor(-2.0)}


class _Named(PairedLoss):
    def forward(self, image_features, text_features):
        return {"dist_loss": (image_features - text_features).pow(2).sum(), "rows": torch.tensor(float(len(image_features)))}


class _Everything(nn.Module):  # a plain module with **kwargs: gets every input
    def forward(self, **inputs):
        self.seen = set(inputs)
        return {"zero_loss": torch.zeros(())}


def test_a_loss_receives_the_inputs_its_forward_names():
    inputs = {**_outputs(), **loss_context(7, {"image_id": torch.arange(6)})}
    assert set(inputs) == {"image_features", "text_features", "logit_scale", "logit_bias", "step", "image_ids"}
    out = call_loss(_Named(), inputs)  # would raise TypeError if logit_scale, step, ... reached it
    assert set(out) == {"dist_loss", "rows"}
    everything = _Everything()
    call_loss(everything, inputs)
    assert everything.seen == set(inputs)
    assert loss_context(3, {})["image_ids"] is None


def test_loss_sum_weights_loss_terms_only_and_refuses_clashes():
    inputs = _outputs()
    single = call_loss(_Named(), inputs)
    total = LossSum([_Named(), ClipLoss()], weights=[0.25, 2.0])(**inputs)
    assert set(total) == {"dist_loss", "rows", "contrastive_loss"}
    assert torch.allclose(total["dist_loss"], 0.25 * single["dist_loss"])
    assert torch.equal(total["rows"], single["rows"])  # statistics are not weighted
    assert torch.allclose(total["contrastive_loss"], 2.0 * ClipLoss()(**inputs)["contrastive_loss"])
    with pytest.raises(ValueError, match="distinct names"):
        LossSum([ClipLoss(), ClipLoss()])(**inputs)
    with pytest.raises(ValueError, match="distinct names"):
        LossSum([RankingLoss(), RankingLoss(negatives="hardest")])
    with pytest.raises(ValueError, match="2 weights for 1 losses"):
        LossSum([ClipLoss()], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="LossSum: weights must be a list of values each >= 0"):
        LossSum([ClipLoss()], weights=[-1.0])
    # Distinct names let two of one class be combined; the step reaches the one that needs it.
    pair = LossSum([RankingLoss(sum_warmup_steps=2), RankingLoss(negatives="hardest", name="hard")])
    out = pair(**inputs, step=0, image_ids=None)
    assert {"ranking_loss", "hard_loss"} <= set(out)


def test_as_loss_wraps_every_form_of_the_loss_argument():
    default = as_loss(None, default=ClipLoss)
    assert isinstance(default, LossSum) and len(default) == 1 and isinstance(default[0], ClipLoss)
    clip = ClipLoss()
    assert as_loss(clip, default=RankingLoss)[0] is clip
    listed = as_loss([clip, TripletLoss()], default=RankingLoss)
    assert len(listed) == 2 and isinstance(listed[1], TripletLoss)
    given = LossSum([clip])
    assert as_loss(given, default=RankingLoss) is given
    assert list(as_loss(RankingLoss(memory_size=3), default=ClipLoss).state_dict())[0].startswith("0.memory.")


def test_declarations_of_the_shipped_losses():
    scale_and_bias = {
        ClipLoss(): (True, False),
        ClipLoss(tile_size=2): (True, False),
        SigLipLoss(): (True, True),
        RankingLoss(): (False, False),
        TripletLoss(): (False, False),
        SimilarityDistillLoss(): (True, False),
        FeatureDistillLoss(): (False, False),
        InteractiveContrastiveLoss(): (True, False),
        DistillationLoss(): (True, False),
        DistillationLoss(contrastive=0.0, similarity=0.0, feature=1.0): (False, False),
        DistillationLoss(similarity=0.0, feature=1.0, student_loss=RankingLoss()): (False, False),
        DistillationLoss(similarity=0.0, feature=1.0, student_loss=SigLipLoss()): (True, True),
        LossSum([RankingLoss(), TripletLoss()]): (False, False),
        LossSum([RankingLoss(), SigLipLoss()]): (True, True),
        _Everything(): (True, True),  # a plain module declares nothing: nothing is frozen
    }
    for loss, expected in scale_and_bias.items():
        assert (uses_logit_scale(loss), uses_logit_bias(loss)) == expected, type(loss).__name__
    shipped = [ClipLoss, SigLipLoss, RankingLoss, TripletLoss, SimilarityDistillLoss, FeatureDistillLoss,
               InteractiveContrastiveLoss, DistillationLoss, LossSum]
    assert all(issubclass(cls, PairedLoss) for cls in shipped)


def test_setup_reaches_every_memory_queue_and_is_idempotent():
    inner = RankingLoss(memory_size=5)
    loss = DistillationLoss(student_loss=[ClipLoss(), inner])  # DistillationLoss → LossSum → RankingLoss
    loss.setup(8, "cpu")
    assert inner.memory.image.shape == (5, 8) and len(inner.memory) == 0
    inner.memory.enqueue(torch.ones(2, 8), torch.ones(2, 8))
    loss.setup(8, "cpu")  # a second configure_model keeps the queue
    assert len(inner.memory) == 2


def test_scale_terms():
    terms = {"a_loss": torch.tensor(2.0), "stat": torch.tensor(3.0)}
    assert scale_terms(terms, 1.0) is terms
    assert {k: float(v) for k, v in scale_terms(terms, 0.5).items()} == {"a_loss": 1.0, "stat": 3.0}


def test_mean_divisor_on_one_process():
    assert D.mean_divisor(8) == 8.0 and D.mean_divisor(8, partitioned=False) == 8.0
    assert D.mean_divisor(0) == 1.0  # an empty batch gives a loss of 0, not NaN
    assert D.global_mean_divisor(5) == 5.0


def _divisor_worker(rank, world, out_dir):
    local = [3, 5][rank]  # uneven
    result = {
        "global": D.global_mean_divisor(local),
        "partitioned": D.mean_divisor(8),
        "replicated": D.mean_divisor(8, partitioned=False),
    }
    with D.local_only():
        result["local_only"] = D.global_mean_divisor(local)
    torch.save(result, Path(out_dir) / f"{rank}.pt")


@pytest.mark.slow
def test_mean_divisor_on_two_processes_with_uneven_batches(tmp_path):
    run_on_processes(_divisor_worker, 2, str(tmp_path))
    for rank, local in enumerate([3, 5]):
        r = torch.load(tmp_path / f"{rank}.pt")
        # 8 rows over 2 ranks: each rank's sum / 4, and the mean of the two is the sum of all / 8.
        assert r == {"global": 4.0, "partitioned": 4.0, "replicated": 8.0, "local_only": float(local)}


DOCS = Path(__file__).parents[2] / "docs" / "losses.md"
ARCH = str(Path(__file__).parents[1] / "models" / "tiny_test_arch.json")


def _blocks(text: str, lang: str) -> list[str]:
    parts = text.split(f"```{lang}\n")[1:]
    return [p.split("```")[0] for p in parts]


@pytest.mark.slow
def test_docs_example_loss_runs_in_a_recipe_through_the_cli(tmp_path, monkeypatch):
    """docs/losses.md's own loss, saved as my_losses.py and named by class_path in its overlay on
    recipes/default.yaml, trains through `mmkit fit`."""
    from mmkit.cli import main

    text = DOCS.read_text()
    (tmp_path / "my_losses.py").write_text(_blocks(text, "python")[0])
    overlay = next(b for b in _blocks(text, "yaml") if "my_losses." in b)
    (tmp_path / "my_loss.yaml").write_text(overlay)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    main([
        "fit", "--config", str(Path(__file__).parents[2] / "recipes" / "default.yaml"), "--config", str(tmp_path / "my_loss.yaml"),
        "--model.init_args.model.init_args.arch", ARCH, "--model.init_args.model.init_args.image_size", "16",
        "--data.init_args.train.init_args.size", "32", "--data.init_args.train.init_args.image_size", "16",
        "--data.init_args.val.init_args.size", "8", "--data.init_args.val.init_args.image_size", "16",
        "--data.init_args.test.init_args.size", "8", "--data.init_args.test.init_args.image_size", "16",
        "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "8", "--data.init_args.num_workers", "0",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
        "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
        "--model.init_args.export_dir", "",
    ])
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/contrastive_loss", "train/pair_distance_loss", "train/pair_distance"} <= set(header)
