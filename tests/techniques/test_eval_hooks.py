"""The base module's evaluation as techniques use it: public hooks only, ``score_loader`` giving
what a validation pass logs, and EWCIncremental's per-task zero-shot scores going through the
technique's ``project`` hook like validation's (it once encoded the prompts without it)."""

import inspect

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import mmkit.techniques as techniques
from mmkit import CLIPPretrain, EWCIncremental
from mmkit.data import ImageTextDataModule, SyntheticShapes, TaskStreamDataModule
from mmkit.metrics.zeroshot import build_zeroshot_classifier
from mmkit.models import OpenCLIP
from mmkit.techniques.base import DualEncoderModule

SHAPES3 = [["circle", "square"], ["triangle", "cross"], ["star"]]


def test_no_technique_overrides_an_underscore_named_base_method():
    classes = [c for _, c in inspect.getmembers(techniques, inspect.isclass)
               if issubclass(c, DualEncoderModule) and c is not DualEncoderModule]
    assert {c.__name__ for c in classes} >= {"CLIPPretrain", "MetricAlign", "AlignGAN", "EWCIncremental", "KDStudent"}
    for cls in classes:
        private = [name for name in vars(cls)
                   if name.startswith("_") and not name.startswith("__") and hasattr(DualEncoderModule, name)]
        assert not private, f"{cls.__name__} overrides the base's {private}: add a public hook instead"


def test_score_loader_gives_the_scores_validation_logs(tiny_arch, tmp_path):
    torch.manual_seed(0)
    module = CLIPPretrain(OpenCLIP(tiny_arch), export_dir="")
    val = SyntheticShapes(40, seed=1, image_size=16)
    dm = ImageTextDataModule(train=None, val=val, batch_size=8, eval_batch_size=16, preprocessing=module.preprocessing)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    logged = trainer.validate(module, datamodule=dm, verbose=False)[0]

    module.train()  # score_loader puts the module in eval mode itself, and back afterwards
    scores = module.score_loader(dm.val_dataloader(), module.zero_shot_classifier(val.class_names))
    assert module.training and all(m.training for m in module.model.modules())
    assert {f"val/{k}" for k in scores} == set(logged) - {"val/loss"}
    for key, value in scores.items():
        assert float(value) == pytest.approx(logged[f"val/{key}"], abs=1e-6), key
    assert module.score_loader([]) == {}  # no sample on any rank: nothing to score


class _RotatedTextEWC(EWCIncremental):
    """EWC with a ``project`` hook that rotates the text features (as a technique with a text-side
    head would): zero-shot must encode its prompts through it, as validation does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3)))
        self.register_buffer("rotation", q)

    def project(self, outputs):
        if "text_features" in outputs:
            outputs = {**outputs, "text_features": outputs["text_features"] @ self.rotation}
        return outputs


class _ZeroShotReference(L.Callback):
    """Before the first step (the weights the ``before`` row was scored with): each task's
    zero-shot accuracy with the prompts encoded through ``project`` and without it."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step > 0:
            return
        dm, names = trainer.datamodule, trainer.datamodule.stream_val.class_names
        tokenize = module.preprocessing.tokenize
        module.eval()
        with torch.no_grad():
            self.classifier, self.accuracy = {}, {}
            for projected in (True, False):
                def encode(prompts, projected=projected):
                    features = module.model(None, tokenize(prompts))["text_features"]
                    return module.project({"text_features": features})["text_features"] if projected else features

                self.classifier[projected] = build_zeroshot_classifier(names, module.zero_shot_templates, encode)
                self.accuracy[projected] = [self._accuracy(module, dm.task_loader(t, "val"), self.classifier[projected])
                                            for t in range(dm.num_tasks)]
            self.from_base = module.zero_shot_classifier(names)
        module.train()

    @staticmethod
    def _accuracy(module, loader, classifier):
        hits = total = 0
        for b in loader:
            image = F.normalize(module(b["images"], b["texts"])["image_features"], dim=-1)
            hits += int(((image @ classifier.T).argmax(1) == b["label"]).sum())
            total += b["label"].numel()
        return hits / total


def test_ewc_zero_shot_encodes_prompts_through_the_project_hook(tiny_arch, tmp_path):
    torch.manual_seed(0)
    module = _RotatedTextEWC(OpenCLIP(tiny_arch), export_dir="", report_dir="", warmup_steps=1)
    dm = TaskStreamDataModule(
        train=SyntheticShapes(30, seed=0, image_size=16), val=SyntheticShapes(90, seed=1, image_size=16),
        task_groups=SHAPES3, batch_size=8, eval_batch_size=16, train_augment=False, preprocessing=module.preprocessing,
    )
    reference = _ZeroShotReference()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, reload_dataloaders_every_n_epochs=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[reference])
    trainer.fit(module, datamodule=dm)

    # The projection changes what zero-shot scores (else this test could not tell the two apart).
    assert reference.accuracy[True] != reference.accuracy[False]
    assert module.matrix.before["zeroshot_top1"] == pytest.approx(reference.accuracy[True])
    torch.testing.assert_close(reference.from_base, reference.classifier[True])


def test_an_all_bad_batch_can_still_take_part_in_a_sharded_forward(tiny_arch):
    """What a rank whose evaluation batch was all bad runs under FSDP2 / ZeRO-3 (every forward
    gathers parameters, a collective): the model cannot run zero rows, but it runs the one-row
    dummy of the empty batch's shapes."""
    from mmkit.models import OpenCLIP
    from mmkit.techniques.base import one_row_like

    model = OpenCLIP(tiny_arch).build()
    empty_images, empty_texts = torch.zeros(0, 3, 16, 16), torch.zeros(0, 8, dtype=torch.long)
    with pytest.raises(RuntimeError):
        model(empty_images, empty_texts)
    images, texts = one_row_like(empty_images, empty_texts)
    assert images.shape == (1, 3, 16, 16) and texts.shape == (1, 8) and texts.dtype == torch.long
    out = model(images, texts)
    assert out["image_features"].shape[0] == 1 and out["text_features"].shape[0] == 1
    images, texts = one_row_like(empty_images, {"input_ids": empty_texts, "attention_mask": empty_texts})
    assert set(texts) == {"input_ids", "attention_mask"} and texts["input_ids"].shape == (1, 8)
