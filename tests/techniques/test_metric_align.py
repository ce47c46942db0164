"""MetricAlign inside a real Lightning Trainer: learning, exact chunked accumulation, the
projection head in training and evaluation, the embedding-norm penalty, checkpointed memory
queue, real DDP against one process, and the recipe through the CLI.

Also the script that the DDP test runs (Lightning's ddp launcher re-runs it for rank 1):
    python tests/techniques/test_metric_align.py OUT_DIR DEVICES PER_RANK_BATCH
"""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from mmkit import MetricAlign
from mmkit.data import ImageTextDataModule, SyntheticShapes
from mmkit.losses import ClipLoss, RankingLoss, TripletLoss
from mmkit.models import OpenCLIP

ARCH = str(Path(__file__).parents[1] / "models" / "tiny_test_arch.json")
RECIPE = Path(__file__).parents[2] / "recipes" / "metric_align.yaml"


def _trainer(tmp_path, steps, callbacks=(), **kw):
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        use_distributed_sampler=False, callbacks=list(callbacks), num_sanity_val_steps=0, **kw,
    )


def _fit(module, tmp_path, steps=2, batch=8, train_size=64, val=None, callbacks=(), augment=True, ckpt_path=None,
         **trainer_kw):
    torch.manual_seed(0)
    dm = ImageTextDataModule(train=SyntheticShapes(train_size, seed=0, image_size=16), val=val, batch_size=batch,
                             preprocessing=module.preprocessing, train_augment=augment)
    trainer = _trainer(tmp_path, steps, callbacks, **trainer_kw)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, dm


def _module(**kw):
    torch.manual_seed(0)
    kw.setdefault("export_dir", "")
    return MetricAlign(OpenCLIP(ARCH), **kw)


def _fixed_batch(module, n=16):
    dm = ImageTextDataModule(train=SyntheticShapes(n, seed=0, image_size=16), batch_size=n,
                             preprocessing=module.preprocessing, train_augment=False)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_fit_lowers_the_loss_and_trains_every_parameter_but_the_unused_temperature(tmp_path):
    module = _module(loss=RankingLoss(negatives="hardest", sum_warmup_steps=4), warmup_steps=1, lr=2e-3,
                     projection_head=True, head_dropout=0.0)
    module.configure_model()
    batch = _fixed_batch(module)

    def loss_on_batch():
        module.eval()
        with torch.no_grad():
            loss = module.compute_loss(module(batch["images"], batch["texts"]), batch)["ranking_loss"].item()
        module.train()  # Lightning keeps the modes it finds at the start of fit
        return loss

    before_loss = loss_on_batch()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer, _ = _fit(module, tmp_path, steps=12, batch=16, train_size=16, augment=False)
    assert trainer.global_step == 12
    assert loss_on_batch() < 0.7 * before_loss
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}
    assert "model.clip.logit_scale" not in changed and not module.model.clip.logit_scale.requires_grad
    assert changed == set(before) - {"model.clip.logit_scale"}
    assert any(n.startswith("image_head.") for n in changed) and any(n.startswith("text_head.") for n in changed)
    m = trainer.callback_metrics
    for key in ("train/ranking_loss", "train/ranking_active", "train/ranking_pos_sim", "train/ranking_neg_sim", "train/ranking_gap"):
        assert key in m, sorted(m)
    assert 0.0 <= m["train/ranking_active"] <= 1.0


class _GradRecorder(L.Callback):
    """Gradients of every parameter at the optimizer step ``at``."""

    def __init__(self, at=0):
        self.at, self.grads = at, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def test_accumulate_chunks_gives_the_full_batch_gradient(tmp_path):
    # Second step: the memory queue holds the first batch; head, hardest negatives and the
    # embedding-norm penalty are all in the graph.
    recorded = []
    for chunks in (1, 4):
        rec = _GradRecorder(at=1)
        loss = [RankingLoss(negatives="hardest", memory_size=24), TripletLoss(distance="euclidean", weight=0.5)]
        module = _module(loss=loss, accumulate_chunks=chunks, grad_clip_norm=None, projection_head=True,
                         head_hidden_dim=8, head_dropout=0.0, normalize=False, embedding_l2=0.1)
        _fit(module, tmp_path, steps=2, batch=16, callbacks=[rec])
        recorded.append(rec.grads)
    full, chunked = recorded
    assert set(full) == set(chunked) and any(n.startswith("image_head.") for n in full) and len(full) > 10
    for name in full:
        assert torch.allclose(full[name], chunked[name], atol=1e-5, rtol=1e-4), name


def test_projection_head_is_used_in_evaluation_with_dropout_off(tmp_path):
    module = _module(projection_head=True, head_dropout=0.5, warmup_steps=1, lr=1e-2)
    trainer, _ = _fit(module, tmp_path, steps=2, val=SyntheticShapes(20, seed=1, image_size=16), val_check_interval=2)
    assert "val/i2t_R@1" in trainer.callback_metrics and "val/loss" in trainer.callback_metrics
    batch = _fixed_batch(module, 8)
    module.eval()
    with torch.no_grad():
        a, b = module(batch["images"], batch["texts"]), module(batch["images"], batch["texts"])
        raw = module.model(batch["images"], batch["texts"])
        pred = module.predict_step(batch, 0)
    assert torch.equal(a["image_features"], b["image_features"])  # dropout is off
    assert not torch.allclose(a["image_features"], raw["image_features"], atol=1e-4)  # the trained head acts
    assert torch.allclose(pred["image_features"], a["image_features"].float())
    assert torch.allclose(pred["text_features"], a["text_features"].float())
    assert torch.allclose(a["text_features"].norm(dim=-1), torch.ones(8, dtype=a["text_features"].dtype), atol=1e-5)


def test_embedding_norm_penalty_is_the_mean_squared_norm():
    module = _module(projection_head=True, normalize=False, embedding_l2=0.3, head_dropout=0.0)
    module.configure_model()
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g) * 2
    terms = module.compute_loss({"image_features": img, "text_features": txt}, {"image_id": torch.arange(4)})
    expected = 0.3 * sum(float((v ** 2).sum()) for v in list(img) + list(txt)) / 8
    assert terms["embedding_norm_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["embedding_norm"].item() == pytest.approx(torch.cat([img, txt]).norm(dim=-1).mean().item(), rel=1e-5)


def test_invalid_settings_fail_at_construction():
    with pytest.raises(ValueError, match="projection_head"):
        _module(normalize=False)
    with pytest.raises(ValueError, match="normalize=False"):
        _module(projection_head=True, embedding_l2=0.1)
    with pytest.raises(ValueError, match="distinct names"):
        _module(loss=[RankingLoss(), RankingLoss(negatives="hardest")])


def test_combined_losses_sum_and_clip_loss_keeps_its_temperature(tmp_path):
    module = _module(loss=[RankingLoss(negatives="hardest"), ClipLoss()], warmup_steps=1)
    module.configure_model()
    assert module.model.clip.logit_scale.requires_grad  # ClipLoss reads it: not frozen
    trainer, _ = _fit(module, tmp_path, steps=1)
    m = trainer.callback_metrics
    assert m["train/loss"].item() == pytest.approx((m["train/ranking_loss"] + m["train/contrastive_loss"]).item(), rel=1e-5)


def test_memory_queue_and_head_round_trip_through_a_lightning_checkpoint(tmp_path):
    module = _module(loss=RankingLoss(memory_size=20), projection_head=True)
    trainer, _ = _fit(module, tmp_path, steps=3)  # 3 batches of 8 through a queue of 20: wrapped
    queue = module.loss[0].memory
    assert len(queue) == 20 and int(queue.ptr) == 4
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"]
    assert "loss.0.memory.image" in state and "image_head.net.weight" in state

    fresh = _module(loss=RankingLoss(memory_size=20), projection_head=True)
    fresh.configure_model()
    fresh.load_state_dict(state)
    for a, b in zip(queue.entries(), fresh.loss[0].memory.entries()):
        assert torch.equal(a, b)
    assert torch.equal(fresh.image_head.net.weight, module.image_head.net.weight)

    # Resuming the fit restores the queue too, and it moves on from there.
    resumed = _module(loss=RankingLoss(memory_size=20), projection_head=True)
    trainer2, _ = _fit(resumed, tmp_path, steps=4, ckpt_path=str(tmp_path / "m.ckpt"))
    assert trainer2.global_step == 4 and len(resumed.loss[0].memory) == 20
    assert int(resumed.loss[0].memory.ptr) == 12


# -- DDP ---------------------------------------------------------------------------------------
class _SaveStep(L.Callback):
    """Rank 0's gradients (after DDP's all-reduce) at optimizer step 1 (memory queue in use)."""

    def __init__(self, out: Path):
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 1 and trainer.global_rank == 0:
            grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save(grads, self.out / "grads.pt")


def _ddp_main(out: Path, devices: int, batch: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = MetricAlign(OpenCLIP(ARCH), loss=RankingLoss(negatives="hardest", memory_size=16),
                         projection_head=True, head_dropout=0.0, warmup_steps=1, grad_clip_norm=None, export_dir="")
    module.configure_model()  # the same initial weights on every rank and in the 1-process run
    dm = ImageTextDataModule(train=SyntheticShapes(64, seed=0, image_size=16), val=SyntheticShapes(10, seed=1, image_size=16),
                             batch_size=batch, eval_batch_size=3, train_augment=False)
    dm.set_preprocessing(module.preprocessing)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", precision="64-true",
        max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[_SaveStep(out)], default_root_dir=out,
    )
    trainer.fit(module, datamodule=dm)
    entries = [t.clone() for t in module.loss[0].memory.entries()]
    torch.save(entries, out / f"memory_rank{trainer.global_rank}.pt")
    if trainer.global_rank == 0:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
        torch.save({"metrics": metrics, "world": trainer.world_size}, out / "metrics.pt")


@pytest.mark.slow
def test_lightning_ddp_equals_one_process_with_the_double_batch(tmp_path):
    def run(name, devices, batch):
        subprocess.run([sys.executable, __file__, str(tmp_path / name), str(devices), str(batch)], check=True, timeout=600)
        return torch.load(tmp_path / name / "grads.pt"), torch.load(tmp_path / name / "metrics.pt")

    ddp_grads, ddp = run("ddp", 2, 4)
    ref_grads, ref = run("single", 1, 8)
    assert ddp["world"] == 2 and ref["world"] == 1
    assert set(ddp_grads) == set(ref_grads) and "image_head.net.weight" in ref_grads
    assert "model.clip.logit_scale" not in ref_grads
    for name, g in ref_grads.items():
        assert torch.allclose(ddp_grads[name], g, atol=1e-10, rtol=0), name
    # Statistics are global (train/ranking_loss is rank 0's share, as for every exact loss).
    for key in ("train/ranking_active", "train/ranking_neg_sim", "train/ranking_gap", "val/i2t_R@1", "val/t2i_R@5"):
        assert ddp["metrics"][key] == pytest.approx(ref["metrics"][key], abs=1e-9), key
    # The queue: bit-identical on both ranks, and (to float64 rounding: the towers ran on batches
    # of 4 instead of 8) the single process's queue.
    queues = [torch.load(tmp_path / "ddp" / f"memory_rank{rank}.pt") for rank in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*queues))
    single_queue = torch.load(tmp_path / "single" / "memory_rank0.pt")
    assert len(single_queue[0]) == 16
    for a, b in zip(queues[0], single_queue):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


# -- recipe --------------------------------------------------------------------------------
def test_recipe_runs_three_steps_through_the_cli(tmp_path):
    from mmkit.cli import main

    run = tmp_path / "run"
    main([
        "fit", "--config", str(RECIPE),
        "--model.init_args.model.init_args.arch", ARCH, "--model.init_args.model.init_args.image_size", "16",
        "--model.init_args.loss.init_args.sum_warmup_steps", "2",
        "--data.init_args.train.init_args.size", "48", "--data.init_args.train.init_args.image_size", "16",
        "--data.init_args.val.init_args.size", "16", "--data.init_args.val.init_args.image_size", "16",
        "--data.init_args.test.init_args.size", "16", "--data.init_args.test.init_args.image_size", "16",
        "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "8", "--data.init_args.num_workers", "0",
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
    ])
    csv_text = (run / "metrics.csv").read_text()
    assert "train/ranking_loss" in csv_text and "val/i2t_R@1" in csv_text and "test/t2i_R@1" in csv_text


def test_recipe_accepts_a_list_of_losses(tmp_path, capsys):
    from mmkit.cli import main
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"]["init_args"]["loss"] = [
        {"class_path": "mmkit.losses.RankingLoss", "init_args": {"negatives": "hardest"}},
        {"class_path": "mmkit.losses.TripletLoss", "init_args": {"weight": 0.5}},
    ]
    combined = tmp_path / "combined.yaml"
    combined.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(combined), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["loss"]
    assert [c["class_path"] for c in cfg] == ["mmkit.losses.RankingLoss", "mmkit.losses.TripletLoss"]
    assert cfg[1]["init_args"]["negatives"] == "semi_hard" and cfg[1]["init_args"]["weight"] == 0.5


if __name__ == "__main__":
    _ddp_main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
