"""Every shipped loss in every technique it makes sense in, through the one loss protocol: a short
real fit each (tiny model, SyntheticShapes), with the loss's terms logged, the temperature and
the bias trained exactly when some loss reads them (frozen otherwise, in every technique), every
other trainable parameter moving, the memory queue allocated in ``configure_model`` (before DDP
would wrap the module) and filled by training, and the context (``step``, ``image_ids``) reaching
the losses that declare it."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from mmkit import AlignGAN, CLIPPretrain, EWCIncremental, KDStudent, MetricAlign
from mmkit.data import ImageTextDataModule, SyntheticShapes, TaskStreamDataModule
from mmkit.losses import ClipLoss, DistillationLoss, LossSum, PairedLoss, RankingLoss, SigLipLoss, TripletLoss
from mmkit.models import OpenCLIP, Teacher

EMBED_DIM = 16  # tests/models/tiny_test_arch.json
MEMORY = 12

# name: (build the loss, its *_loss terms, reads the temperature, reads the bias, has a memory queue)
LOSSES = {
    "clip": (lambda: ClipLoss(), ["contrastive_loss"], True, False, False),
    "clip_tiled": (lambda: ClipLoss(local_loss=True, tile_size=3), ["contrastive_loss"], True, False, False),
    "siglip": (lambda: SigLipLoss(), ["sigmoid_loss"], True, True, False),
    # sum_warmup_steps needs the step: the loss raises where a technique does not pass it.
    "ranking": (lambda: RankingLoss(negatives="hardest", sum_warmup_steps=1), ["ranking_loss"], False, False, False),
    "ranking_memory": (lambda: RankingLoss(negatives="semi_hard", memory_size=MEMORY), ["ranking_loss"], False, False, True),
    "triplet": (lambda: TripletLoss(), ["triplet_loss"], False, False, False),
    "clip+triplet": (lambda: [ClipLoss(), TripletLoss(weight=0.5)], ["contrastive_loss", "triplet_loss"], True, False, False),
    "siglip+ranking": (
        lambda: LossSum([SigLipLoss(), RankingLoss(memory_size=MEMORY)], weights=[1.0, 0.5]),
        ["sigmoid_loss", "ranking_loss"], True, True, True,
    ),
}
TECHNIQUES = ["clip_pretrain", "metric_align", "align_gan", "ewc_incremental"]


def _matrix():
    """Every (loss, technique) pair; a diagonal that covers each loss once and each technique twice
    runs in the fast lane, the rest is marked slow."""
    for i, loss in enumerate(LOSSES):
        for j, technique in enumerate(TECHNIQUES):
            marks = () if j == i % len(TECHNIQUES) else (pytest.mark.slow,)
            yield pytest.param(loss, technique, id=f"{loss}-{technique}", marks=marks)


def _spec(tiny_arch):
    # Every model has a bias, so that its freezing is checked for every loss (only SigLIP's reads it).
    return OpenCLIP(tiny_arch, init_logit_bias=-5.0)


def _module(technique: str, tiny_arch: str, loss):
    torch.manual_seed(0)
    kw = dict(export_dir="", warmup_steps=0, lr=1e-3, weight_decay=0.0)
    if technique == "clip_pretrain":
        return CLIPPretrain(_spec(tiny_arch), loss=loss, **kw)
    if technique == "metric_align":
        return MetricAlign(_spec(tiny_arch), loss=loss, **kw)
    if technique == "align_gan":
        return AlignGAN(_spec(tiny_arch), loss=loss, d_hidden_dim=16, **kw)
    if technique == "ewc_incremental":
        return EWCIncremental(_spec(tiny_arch), loss=loss, fisher_samples=4, fisher_batch_size=4,
                              evaluate_before=False, report_dir="", **kw)
    if technique == "kd_student":
        return KDStudent(_spec(tiny_arch), teacher=Teacher(OpenCLIP(tiny_arch)), loss=loss, **kw)
    raise ValueError(technique)


def _fit(module, tmp_path, callbacks=()):
    trainer_kw = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=list(callbacks),
    )
    torch.manual_seed(1)
    if isinstance(module, EWCIncremental):  # two tasks of one epoch: the penalty acts in the second
        dm = TaskStreamDataModule(
            train=SyntheticShapes(16, seed=0, image_size=16), val=SyntheticShapes(8, seed=1, image_size=16),
            task_groups=[["circle", "square"], ["triangle", "cross", "star"]], batch_size=8, eval_batch_size=8,
            train_augment=False, preprocessing=module.preprocessing,
        )
        trainer = L.Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, **trainer_kw)
    else:
        dm = ImageTextDataModule(train=SyntheticShapes(24, seed=0, image_size=16), batch_size=8,
                                 preprocessing=module.preprocessing, train_augment=False)
        trainer = L.Trainer(max_steps=3, use_distributed_sampler=False, **trainer_kw)
    trainer.fit(module, datamodule=dm)
    return trainer


def _memories(module):
    return [m for m in module.loss.modules() if type(m).__name__ == "MemoryQueue"]


def _check_fit(module, tmp_path, terms, uses_scale, uses_bias, memory):
    module.configure_model()
    model = module.model
    scale, bias = model.log_scale_parameter(), model.bias_parameter()
    assert scale.requires_grad is uses_scale and bias.requires_grad is uses_bias
    queues = _memories(module)
    assert len(queues) == int(memory)
    for q in queues:  # real buffers before the strategy wraps the module
        assert q.image.shape == (MEMORY, EMBED_DIM) and len(q) == 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    trainer = _fit(module, tmp_path)

    logged = trainer.callback_metrics
    for key in terms:
        assert f"train/{key}" in logged and math.isfinite(float(logged[f"train/{key}"])), key
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == trainable
    assert ("clip.logit_scale" in changed) is uses_scale and ("clip.logit_bias" in changed) is uses_bias
    assert all(len(q) > 0 for q in queues)
    return trainer


@pytest.mark.parametrize("loss_name, technique", _matrix())
def test_every_loss_trains_in_every_technique(tiny_arch, tmp_path, loss_name, technique):
    build, terms, uses_scale, uses_bias, memory = LOSSES[loss_name]
    if technique == "align_gan":
        terms = [*terms, "adversarial_loss", "d_loss"]
    if technique == "ewc_incremental":
        terms = [*terms, "ewc_loss"]
    module = _module(technique, tiny_arch, build())
    trainer = _check_fit(module, tmp_path, terms, uses_scale, uses_bias, memory)
    if technique == "ewc_incremental":  # the Fisher covers what trains, the temperature iff it does
        fisher = module.penalty.terms[0]["fisher"]
        assert set(fisher) == {n for n, p in module.model.named_parameters() if p.requires_grad}
        assert float(trainer.callback_metrics["train/ewc_loss"]) > 0


# DistillationLoss is KDStudent's own: its student loss is any loss (or list) of the protocol.
KD = {
    "clip+similarity": (dict(similarity=1.0), "clip", True, False),
    "ranking_memory+feature": (dict(similarity=0.0, feature=1.0), "ranking_memory", False, True),
    "siglip+feature": (dict(similarity=0.0, feature=1.0), "siglip", True, False),
    "triplet+interactive": (dict(similarity=0.0, interactive=1.0), "triplet", True, False),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if i == 0 else (pytest.mark.slow,)) for i, c in enumerate(KD)])
def test_distillation_with_every_student_loss(tiny_arch, tmp_path, case):
    weights, student, uses_scale, memory = KD[case]
    build, terms, _, student_bias, _ = LOSSES[student]
    loss = DistillationLoss(student_loss=build(), **weights)
    kd_terms = [f"{k}_kd_loss" for k, w in weights.items() if w]
    module = _module("kd_student", tiny_arch, loss)
    _check_fit(module, tmp_path, terms + kd_terms, uses_scale, uses_scale and student_bias, memory)


class _ContextProbe(PairedLoss):
    """Declares the features and the context only: nothing else may reach it."""

    uses_logit_scale = False

    def __init__(self):
        super().__init__()
        self.steps: list[int] = []
        self.ids: list[torch.Tensor] = []

    def forward(self, image_features, text_features, step, image_ids):
        if self.training:
            self.steps.append(step)
            self.ids.append(image_ids)
        return {"probe_loss": (image_features - text_features).pow(2).sum(-1).mean()}


class _Batches(L.Callback):
    def __init__(self):
        self.ids: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.append(batch["image_id"].clone())


@pytest.mark.parametrize("technique", TECHNIQUES + ["kd_student"])
def test_every_technique_gives_its_loss_the_context(tiny_arch, tmp_path, technique):
    probe = _ContextProbe()
    loss = DistillationLoss(student_loss=probe, similarity=0.0, feature=1.0) if technique == "kd_student" else probe
    module = _module(technique, tiny_arch, loss)
    batches = _Batches()
    module.configure_model()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[batches], use_distributed_sampler=False,
        **({"max_epochs": 1, "reload_dataloaders_every_n_epochs": 1} if technique == "ewc_incremental" else {}),
    )
    if technique == "ewc_incremental":
        dm = TaskStreamDataModule(train=SyntheticShapes(24, seed=0, image_size=16), task_groups=[["circle", "square", "triangle", "cross", "star"]],
                                  batch_size=8, train_augment=False, preprocessing=module.preprocessing)
    else:
        dm = ImageTextDataModule(train=SyntheticShapes(24, seed=0, image_size=16), batch_size=8,
                                 preprocessing=module.preprocessing, train_augment=False)
    trainer.fit(module, datamodule=dm)
    # One call per training step (the Fisher estimate, if any, comes after the last step).
    assert probe.steps[:3] == [0, 1, 2]
    for seen, batch_ids in zip(probe.ids, batches.ids):
        assert torch.equal(seen, batch_ids)
    assert "train/probe_loss" in trainer.callback_metrics
    assert not module.model.log_scale_parameter().requires_grad
