"""AlignGAN inside a real Lightning Trainer: both players learn, the step accounting, the
gradient-reversal form, the plain baseline at adv_weight 0, exact chunked accumulation,
evaluation metrics against direct computations, checkpoint round trip, the recipe, and a real
2-process DDP fit."""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from mmkit import AlignGAN, CLIPPretrain
from mmkit.cli import main
from mmkit.data import ImageTextDataModule, SyntheticShapes
from mmkit.losses import AdversarialLoss
from mmkit.metrics import modality_gap
from mmkit.models import OpenCLIP

RECIPE = Path(__file__).parents[2] / "recipes" / "align_gan.yaml"
DDP_SCRIPT = Path(__file__).with_name("align_gan_ddp_script.py")


def _trainer(tmp_path, steps, callbacks=(), **kw):
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, use_distributed_sampler=False,
        callbacks=list(callbacks), num_sanity_val_steps=0, **kw,
    )


def _data(module, val=None, batch=8):
    return ImageTextDataModule(
        train=SyntheticShapes(64, seed=0, image_size=16), val=val, batch_size=batch, preprocessing=module.preprocessing
    )


def _fit(module, tmp_path, steps=2, val=None, callbacks=(), ckpt_path=None, batch=8, **kw):
    module.configure_model()
    torch.manual_seed(1)  # same data order and augmentation whatever the module built before
    trainer = _trainer(tmp_path, steps, callbacks, **kw)
    trainer.fit(module, datamodule=_data(module, val, batch), ckpt_path=ckpt_path)
    return trainer


def _module(tiny_arch, **kw):
    torch.manual_seed(0)
    kw.setdefault("export_dir", "")
    kw.setdefault("warmup_steps", 1)
    return AlignGAN(OpenCLIP(tiny_arch), **kw)


def _snapshot(module):
    return (
        {n: p.detach().clone() for n, p in module.model.named_parameters()},
        {n: p.detach().clone() for n, p in module.discriminator.named_parameters()},
    )


def _adam_steps(optimizer) -> set[int]:
    return {int(s["step"]) for s in optimizer.state.values()}


class _DiscriminatorGradsAfterStep(L.Callback):
    """Records whether D holds gradients after each training step (the encoder step must not
    leave any)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(any(p.grad is not None for p in pl_module.discriminator.parameters()))


@pytest.mark.parametrize("objective", ["bce", "wgan-gp", "hinge"])
def test_alternating_fit_updates_both_players_with_n_critic_discriminator_steps(tiny_arch, tmp_path, objective):
    module = _module(tiny_arch, objective=objective, n_critic=3, d_dropout=0.1)
    module.configure_model()
    enc_before, d_before = _snapshot(module)
    probe = _DiscriminatorGradsAfterStep()
    trainer = _fit(module, tmp_path, steps=2, callbacks=[probe])

    assert trainer.global_step == 2  # counts encoder steps only
    enc_opt, d_opt = trainer.optimizers
    assert _adam_steps(enc_opt) == {2} and _adam_steps(d_opt) == {3 * 2}
    assert {id(p) for g in enc_opt.param_groups for p in g["params"]}.isdisjoint(id(p) for p in module.discriminator.parameters())
    enc_after, d_after = _snapshot(module)
    assert all(not torch.equal(enc_before[n], p) for n, p in enc_after.items()), "every encoder parameter moves"
    # D's output bias cancels in E D(t) − E D(i) (wgan-gp; it does not enter the penalty) and in
    # the hinge loss while every margin is active (all scores within ±1, as at the start).
    output_bias = [n for n in d_after if n.endswith("bias")][-1]
    frozen = {output_bias} if objective in ("wgan-gp", "hinge") else set()
    assert {n for n, p in d_after.items() if torch.equal(d_before[n], p)} == frozen
    assert probe.seen == [False, False]
    m = trainer.callback_metrics
    for key in ("train/contrastive_loss", "train/adversarial_loss", "train/d_loss", "train/d_accuracy", "train/loss"):
        assert key in m and torch.isfinite(m[key]), key
    assert ("train/d_gp_loss" in m) == (objective == "wgan-gp")


def test_gradient_reversal_mode_fits_with_one_optimizer(tiny_arch, tmp_path):
    module = _module(tiny_arch, mode="gradient_reversal", adv_weight=0.5, grl_schedule="linear", d_lr=1e-2)
    module.configure_model()
    enc_before, d_before = _snapshot(module)
    trainer = _fit(module, tmp_path, steps=3)
    assert trainer.global_step == 3 and len(trainer.optimizers) == 1
    (opt,) = trainer.optimizers
    d_group = opt.param_groups[-1]
    assert {id(p) for p in d_group["params"]} == {id(p) for p in module.discriminator.parameters()}
    assert d_group["betas"] == (0.5, 0.999)
    enc_after, d_after = _snapshot(module)
    assert all(not torch.equal(enc_before[n], p) for n, p in enc_after.items())
    assert all(not torch.equal(d_before[n], p) for n, p in d_after.items())
    # The reversal weight ramps linearly to adv_weight over the 3 steps: the last step used 2/3.
    assert trainer.callback_metrics["train/grl_weight"].item() == pytest.approx(0.5 * 2 / 3)


def test_zero_adversarial_weight_is_the_plain_paired_baseline(tiny_arch, tmp_path):
    align = _module(tiny_arch, adv_weight=0.0, n_critic=2)
    _fit(align, tmp_path, steps=2)
    torch.manual_seed(0)
    clip = CLIPPretrain(OpenCLIP(tiny_arch), export_dir="", warmup_steps=1)
    _fit(clip, tmp_path, steps=2)
    for (name, a), (_, b) in zip(align.model.named_parameters(), clip.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_the_adversarial_term_changes_the_encoder_update(tiny_arch, tmp_path):
    # The converse of the baseline test: with adv_weight > 0 the encoders do feel D.
    a = _module(tiny_arch, adv_weight=1.0)
    _fit(a, tmp_path, steps=1)
    b = _module(tiny_arch, adv_weight=0.0)
    _fit(b, tmp_path, steps=1)
    assert any(not torch.allclose(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_pure_adversarial_setting_runs(tiny_arch, tmp_path):
    module = _module(tiny_arch, align_weight=0.0, adv_weight=1.0)
    trainer = _fit(module, tmp_path, steps=2)
    assert trainer.callback_metrics["train/contrastive_loss"].item() == 0.0
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(trainer.callback_metrics["train/adversarial_loss"].item())


def test_chunked_accumulation_takes_the_same_steps(tiny_arch, tmp_path):
    results = []
    for chunks in (1, 4):
        module = _module(tiny_arch, accumulate_chunks=chunks, n_critic=2, grad_clip_norm=None)
        _fit(module, tmp_path, steps=1, batch=16)
        results.append(_snapshot(module))
    (enc1, d1), (enc4, d4) = results
    for name in enc1:
        assert torch.allclose(enc1[name], enc4[name], atol=1e-5), name
    for name in d1:
        assert torch.allclose(d1[name], d4[name], atol=1e-5), name


def test_validation_logs_discriminator_accuracy_and_modality_gap(tiny_arch, tmp_path):
    module = _module(tiny_arch, objective="wgan-gp")
    val = SyntheticShapes(30, seed=1, image_size=16)
    trainer = _fit(module, tmp_path, steps=2, val=val, val_check_interval=2)
    m = trainer.callback_metrics
    for key in ("val/d_accuracy", "val/d_auc", "val/modality_gap", "val/i2t_R@1", "val/t2i_R@5", "val/loss"):
        assert key in m, sorted(m)

    # Reference: the trained model and D on the whole val split, computed directly.
    module.eval()
    dm = _data(module, val)
    dm.setup("validate")
    images, texts = [], []
    with torch.no_grad():
        for b in dm.val_dataloader():
            images.append(module.model.encode_image(b["images"]))
            texts.append(module.model.encode_text(b["texts"]))
        images, texts = torch.cat(images), torch.cat(texts)
        s_img, s_txt = module.discriminator(images), module.discriminator(texts)
    assert images.shape[0] == 30
    threshold = (s_img.mean() + s_txt.mean()) / 2  # wgan-gp: the midpoint of the mean critic values
    acc = ((s_img > threshold).sum() + (s_txt < threshold).sum()).item() / 60
    assert m["val/d_accuracy"].item() == pytest.approx(acc, abs=1e-6)
    auc = (s_img[:, None] > s_txt[None, :]).float().mean().item()  # no ties among float scores
    assert m["val/d_auc"].item() == pytest.approx(auc, abs=1e-6)
    assert m["val/modality_gap"].item() == pytest.approx(modality_gap(images, texts).item(), abs=1e-5)


class _NaNDiscriminatorLoss(AdversarialLoss):
    def __init__(self, bad_calls):
        super().__init__("bce")
        self.bad_calls, self.calls = set(bad_calls), 0

    def discriminator_terms(self, *args):
        out = super().discriminator_terms(*args)
        self.calls += 1
        if self.calls in self.bad_calls:
            out["d_loss"] = out["d_loss"] * float("nan")
        return out


def test_nonfinite_discriminator_loss_skips_the_step(tiny_arch, tmp_path):
    module = _module(tiny_arch)
    module.adversarial = _NaNDiscriminatorLoss({2})
    trainer = _fit(module, tmp_path, steps=3)
    assert module.nonfinite_steps == 1 and trainer.global_step == 3
    _, d_opt = trainer.optimizers
    assert _adam_steps(d_opt) == {3}  # the skipped batch took no D step
    assert all(torch.isfinite(p).all() for p in module.parameters())


class _StateAtTrainStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.d_state = {k: v.clone() for k, v in pl_module.discriminator.state_dict().items()}
        self.d_steps = _adam_steps(trainer.optimizers[1])


def test_checkpoint_holds_the_discriminator_and_both_optimizers_and_resumes(tiny_arch, tmp_path):
    module = _module(tiny_arch, n_critic=2)
    trainer = _fit(module, tmp_path, steps=2)
    path = tmp_path / "two_steps.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    d_keys = [k for k in ckpt["state_dict"] if k.startswith("discriminator.")]
    assert any(k.endswith("_u") for k in d_keys)  # spectral-norm power-iteration state too
    assert len(ckpt["optimizer_states"]) == 2
    assert {int(s["step"]) for s in ckpt["optimizer_states"][1]["state"].values()} == {4}

    resumed = _module(tiny_arch, n_critic=2)
    probe = _StateAtTrainStart()
    trainer = _fit(resumed, tmp_path, steps=3, ckpt_path=path, callbacks=[probe])
    for k, v in ckpt["state_dict"].items():
        if k.startswith("discriminator."):
            assert torch.equal(probe.d_state[k.removeprefix("discriminator.")], v), k
    assert probe.d_steps == {4}
    assert trainer.global_step == 3
    enc_opt, d_opt = trainer.optimizers
    assert _adam_steps(enc_opt) == {3} and _adam_steps(d_opt) == {6}


def test_recipe_runs_through_the_cli(tmp_path):
    run = tmp_path / "run"
    main([
        "fit", "--config", str(RECIPE),
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "20",
        "--data.init_args.num_workers", "0",
        "--data.init_args.val.init_args.size", "20", "--data.init_args.test.init_args.size", "20",
        "--model.init_args.model.init_args.image_size", "16",
        "--data.init_args.train.init_args.image_size", "16",
        "--data.init_args.val.init_args.image_size", "16",
        "--data.init_args.test.init_args.image_size", "16",
    ])
    text = (run / "metrics.csv").read_text()
    for key in ("train/d_loss", "val/d_accuracy", "val/modality_gap", "test/d_accuracy"):
        assert key in text, key
    ckpt = run / "checkpoints" / "last.ckpt"
    # The checkpoint (with D in it) serves `mmkit export`, which rebuilds D to load it.
    main(["export", "--config", str(RECIPE), "--ckpt_path", str(ckpt), "--out", str(tmp_path / "exported"),
          "--model.init_args.model.init_args.image_size", "16"])
    assert (tmp_path / "exported" / "open_clip_model.safetensors").is_file()


def _run_ddp_script(out: Path, devices: int, batch: int, mode: str) -> dict:
    if devices == 1:  # the reference needs no new process
        import align_gan_ddp_script

        align_gan_ddp_script.run(out, devices, batch, mode)
    else:
        cmd = [sys.executable, str(DDP_SCRIPT), str(out), str(devices), str(batch), mode]
        subprocess.run(cmd, check=True, timeout=600)
    return {r: torch.load(out / f"rank{r}.pt") for r in range(devices)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["alternating", "gradient_reversal"])
def test_ddp_fit_keeps_ranks_identical_and_equals_one_process(tmp_path, mode):
    """2 gloo processes with per-rank batch 4 under Lightning DDP, 2 encoder steps with 2 D
    steps each: D and the encoders are identical on both ranks and equal to one process with
    batch 8 (float64; BCE without dropout or penalty, so nothing random differs)."""
    ddp = _run_ddp_script(tmp_path / "ddp", 2, 4, mode)
    single = _run_ddp_script(tmp_path / "single", 1, 8, mode)[0]
    assert ddp[0]["world"] == 2 and single["world"] == 1
    for part in ("discriminator", "model"):
        ref = single[part]
        assert set(ddp[0][part]) == set(ref) and len(ref) > 3
        for name, value in ref.items():
            assert torch.equal(ddp[0][part][name], ddp[1][part][name]), f"{part}.{name} differs between ranks"
            assert torch.allclose(ddp[0][part][name], value, atol=1e-8, rtol=1e-6), f"{part}.{name}"
        moved = [n for n, v in ref.items() if not torch.equal(v, single["initial"][part][n])]
        assert moved, part
    if mode == "alternating":
        assert ddp[0]["d_steps"] == single["d_steps"] == {4}
    for key in ("val/d_accuracy", "val/d_auc", "val/modality_gap", "val/i2t_R@1"):
        assert ddp[0]["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-6), key
