"""CLIPPretrain inside a real Lightning Trainer: optimisation step, exact chunked accumulation,
non-finite-loss handling, temperature clamp, evaluation, prediction and export."""

import math

import lightning as L
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from mmkit import CLIPPretrain
from mmkit.callbacks.embedding_writer import EmbeddingWriter
from mmkit.data import ImageTextDataModule, SyntheticShapes
from mmkit.losses import ClipLoss
from mmkit.models import OpenCLIP
from mmkit.techniques import NonFiniteLossError
from mmkit.training.optim import fused_adamw_supported, param_groups, warmup_cosine, warmup_cosine_factor


def _fit(module, tmp_path, steps=2, batch=8, train_size=64, val=None, callbacks=(), **trainer_kw):
    torch.manual_seed(0)
    dm = ImageTextDataModule(
        train=SyntheticShapes(train_size, seed=0, image_size=16),
        val=val,
        batch_size=batch,
        preprocessing=module.preprocessing,
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        use_distributed_sampler=False, callbacks=list(callbacks), num_sanity_val_steps=0, **trainer_kw,
    )
    trainer.fit(module, datamodule=dm)
    return trainer, dm


def _module(tiny_arch, **kw):
    torch.manual_seed(0)
    kw.setdefault("export_dir", "")
    return CLIPPretrain(OpenCLIP(tiny_arch), **kw)


def test_training_steps_change_every_trainable_parameter(tiny_arch, tmp_path):
    module = _module(tiny_arch, warmup_steps=1)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer, _ = _fit(module, tmp_path, steps=3)
    assert trainer.global_step == 3
    changed = [n for n, p in module.model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)
    assert "train/loss" in trainer.callback_metrics and "train/temperature" in trainer.callback_metrics


class _GradRecorder(L.Callback):
    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}


def test_accumulate_chunks_gives_the_full_batch_gradient(tiny_arch, tmp_path):
    recorded = []
    for chunks in (1, 4):
        rec = _GradRecorder()
        _fit(_module(tiny_arch, accumulate_chunks=chunks, grad_clip_norm=None), tmp_path, steps=1, batch=16, callbacks=[rec])
        recorded.append(rec.grads)
    full, chunked = recorded
    assert set(full) == set(chunked) and full
    for name in full:
        assert torch.allclose(full[name], chunked[name], atol=1e-5, rtol=1e-4), name


class _NaNOnSteps(ClipLoss):
    def __init__(self, bad_steps):
        super().__init__()
        self.bad_steps, self.calls = set(bad_steps), 0

    def forward(self, **kw):
        out = super().forward(**kw)
        self.calls += 1
        if self.calls in self.bad_steps:
            out["contrastive_loss"] = out["contrastive_loss"] * float("nan")
        return out


def test_nonfinite_step_is_skipped_and_counted(tiny_arch, tmp_path):
    module = CLIPPretrain(OpenCLIP(tiny_arch), loss=_NaNOnSteps({2}), export_dir="")
    trainer, _ = _fit(module, tmp_path, steps=3)
    assert module.nonfinite_steps == 1
    # The skipped step did not count as an optimizer step.
    assert trainer.global_step == 3 and module.loss[0].calls == 4  # every technique holds its loss in a LossSum
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def test_consecutive_nonfinite_steps_stop_training_with_a_clear_message(tiny_arch, tmp_path):
    module = CLIPPretrain(OpenCLIP(tiny_arch), loss=_NaNOnSteps({1, 2, 3}), max_consecutive_nonfinite=3, export_dir="")
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps.*contrastive_loss"):
        _fit(module, tmp_path, steps=5)


def test_temperature_is_clamped_like_clip(tiny_arch, tmp_path):
    module = _module(tiny_arch)
    module.configure_model()
    with torch.no_grad():
        module.model.clip.logit_scale.fill_(math.log(1000.0))
    _fit(module, tmp_path, steps=1)
    assert module.model.clip.logit_scale.exp().item() <= 100.0 + 1e-4


def test_weight_decay_groups_exempt_norms_biases_embeddings_and_temperature(tiny_arch):
    model = OpenCLIP(tiny_arch).build()
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "clip.logit_scale" in no_decay_names
    assert "clip.token_embedding.weight" in no_decay_names
    assert "clip.positional_embedding" in no_decay_names
    assert any("ln_final" in n for n in no_decay_names) and any(n.endswith(".bias") for n in no_decay_names)
    assert decay_names and all(p.ndim >= 2 for p in decay["params"])
    assert not decay_names & no_decay_names
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0


def test_locked_parameters_never_reach_the_optimizer(tiny_arch):
    model = OpenCLIP(tiny_arch, lock_text=True).build()
    groups = param_groups(model, 0.1)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert id(model.clip.token_embedding.weight) not in in_optimizer
    assert id(model.clip.visual.conv1.weight) in in_optimizer


def test_optimizer_is_torchs_fused_adamw_with_the_same_update(tiny_arch, tmp_path):
    module = _module(tiny_arch, warmup_steps=1, weight_decay=0.1)
    recorder = _GradRecorder()
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer, _ = _fit(module, tmp_path, steps=1, callbacks=[recorder])
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    # The same step with torch's default (unfused) AdamW from the recorded gradients.
    ref = {n: p.clone().requires_grad_() for n, p in before.items()}
    named = dict(module.model.named_parameters())
    ref_groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [ref[n] for n, p in named.items() if any(p is q for q in g["params"])]}
                  for g in param_groups(module.model, 0.1)]
    ref_opt = torch.optim.AdamW(ref_groups, lr=module.lr, betas=module.betas, eps=module.eps, fused=False)
    for n, p in ref.items():
        p.grad = recorder.grads[n]
    ref_opt.step()
    for n, p in module.model.named_parameters():
        assert torch.allclose(p.detach(), ref[n].detach(), rtol=1e-5, atol=1e-7), n


def test_fused_adamw_only_where_torch_has_the_kernel():
    on_cpu = torch.nn.Linear(2, 2)
    assert fused_adamw_supported(param_groups(on_cpu, 0.1)) is True
    on_meta = torch.nn.Linear(2, 2, device="meta")
    assert fused_adamw_supported(param_groups(on_meta, 0.1)) is None  # torch's default then
    assert fused_adamw_supported([{"params": []}]) is None


def test_warmup_then_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_warmup_cosine_factor_holds_the_end_and_without_a_length_the_peak():
    # The one formula of both schedules (the base's, and EWCIncremental's restarted per task).
    assert warmup_cosine_factor(2, 4, 14, 0.1) == pytest.approx(0.75)
    assert warmup_cosine_factor(14, 4, 14, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(30, 4, 14, 0.1) == pytest.approx(0.1)
    assert [warmup_cosine_factor(s, 4, math.inf, 0.1) for s in (0, 3, 4, 10_000)] == pytest.approx([0.25, 1, 1, 1])


def test_validation_logs_retrieval_and_zero_shot_metrics(tiny_arch, tmp_path):
    module = _module(tiny_arch, zero_shot_classes=["circle", "square", "triangle", "cross", "star"])
    trainer, _ = _fit(module, tmp_path, steps=2, val=SyntheticShapes(40, seed=1, image_size=16), val_check_interval=2)
    m = trainer.callback_metrics
    for key in ("val/i2t_R@1", "val/t2i_R@5", "val/i2t_medr", "val/loss", "val/zeroshot_top1", "val/zeroshot_top5"):
        assert key in m, sorted(m)
    assert 0.0 <= m["val/i2t_R@1"] <= 1.0 and m["val/i2t_medr"] >= 1


def test_bf16_mixed_precision_step_runs(tiny_arch, tmp_path):
    # With clipping: Lightning's mixed-precision plugin refuses to clip for a fused optimizer, so
    # mmkit clips itself there (the global norm ends at the limit).
    module = _module(tiny_arch, grad_clip_norm=1e-3)
    recorder = _GradRecorder()
    trainer, _ = _fit(module, tmp_path, steps=2, precision="bf16-mixed", callbacks=[recorder])
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.optimizers[0].defaults["fused"] is True
    norm = torch.stack([g.norm() for g in recorder.grads.values()]).norm().item()
    assert norm == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("tile_size", [None, 3])
def test_bf16_mixed_keeps_an_fp32_temperature_clamped_exactly_with_plain_and_tiled_loss(tiny_arch, tile_size, tmp_path):
    """Under bf16 autocast the temperature stays an fp32 parameter and the clamp lands on ln(max)
    exactly; the tiled loss (tiles of 3 over batches of 8: uneven tiles) trains to finite values."""
    module = _module(tiny_arch, loss=ClipLoss(tile_size=tile_size), max_logit_scale=100.0)
    module.configure_model()
    with torch.no_grad():
        module.model.log_scale_parameter().fill_(math.log(200.0))  # above the clamp: the step must bring it back
    trainer, _ = _fit(module, tmp_path, steps=1, precision="bf16-mixed")  # later steps may move it below the clamp
    scale = module.model.log_scale_parameter()
    assert scale.dtype == torch.float32 and scale.item() == torch.tensor(math.log(100.0)).item()
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_export_loads_back_in_open_clip_with_identical_embeddings(tiny_arch, tmp_path):
    module = _module(tiny_arch, export_dir=str(tmp_path / "export"))
    _fit(module, tmp_path, steps=1)
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    loaded.eval()
    module.model.eval()
    images = torch.randn(3, 3, 16, 16)
    texts = module.preprocessing.tokenize(["a red circle", "a blue star", "a green square"])
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), module.model.clip.encode_image(images), atol=1e-6)
        assert torch.allclose(loaded.encode_text(texts), module.model.clip.encode_text(texts), atol=1e-6)


def test_predict_writes_embeddings(tiny_arch, tmp_path):
    module = _module(tiny_arch)
    module.configure_model()
    dm = ImageTextDataModule(predict=SyntheticShapes(20, seed=3, image_size=16), batch_size=8, preprocessing=module.preprocessing)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        callbacks=[EmbeddingWriter(str(tmp_path / "emb"))], default_root_dir=tmp_path)
    trainer.predict(module, datamodule=dm, return_predictions=False)
    out = load_file(str(tmp_path / "emb" / "embeddings_rank0.safetensors"))
    assert out["image_features"].shape == (20, 16) and out["text_features"].shape == (20, 16)
    assert out["index"].tolist() == list(range(20))
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(20), atol=1e-5)


def test_logged_learning_rate_is_the_one_the_step_used(tiny_arch, tmp_path):
    module = _module(tiny_arch, warmup_steps=4, lr=1.0e-3)
    trainer, _ = _fit(module, tmp_path, steps=1)
    # Step 0 of a 4-step linear warmup runs at 1/4 of the peak rate.
    assert trainer.callback_metrics["train/lr"].item() == pytest.approx(0.25e-3)
