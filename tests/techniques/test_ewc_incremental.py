"""EWCIncremental inside real Trainer fits on a SyntheticShapes task stream: the matrix and its
files, the penalty in the optimizer's gradients, baselines and online mode, resume from a real
checkpoint between tasks, and the recipe through the CLI. DDP, FSDP2 and DeepSpeed on 2 processes:
test_ewc_sharded.py."""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mmkit import EWCIncremental
from mmkit.cli import main
from mmkit.data import ImageTextDataModule, SyntheticShapes, TaskStreamDataModule
from mmkit.models import OpenCLIP

SHAPES3 = [["circle", "square"], ["triangle", "cross"], ["star"]]
CLASSES = ["circle", "square", "triangle", "cross", "star"]
RECIPE = Path(__file__).parents[2] / "recipes" / "ewc_incremental.yaml"


def _module(tiny_arch, **kw):
    torch.manual_seed(0)
    kw.setdefault("export_dir", "")
    kw.setdefault("warmup_steps", 1)
    kw.setdefault("fisher_samples", 6)
    kw.setdefault("fisher_batch_size", 4)
    return EWCIncremental(OpenCLIP(tiny_arch), **kw)


def _stream(module, groups=SHAPES3, epochs_per_task=1, size=30, batch_size=8):
    return TaskStreamDataModule(
        train=SyntheticShapes(size, seed=0, image_size=16), val=SyntheticShapes(15, seed=1, image_size=16),
        task_groups=groups, epochs_per_task=epochs_per_task, batch_size=batch_size, eval_batch_size=16,
        train_augment=False, preprocessing=module.preprocessing,
    )


def _trainer(tmp_path, max_epochs, callbacks=(), **kw):
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, reload_dataloaders_every_n_epochs=1,
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=tmp_path, callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        log_every_n_steps=kw.pop("log_every_n_steps", 1),  # _EWCLossPerEpoch reads train values after every step
        **kw,
    )


class _EWCLossPerEpoch(L.Callback):
    """Records train/ewc_loss and the learning rate each step used, per epoch."""

    def __init__(self):
        self.values: dict[int, list[float]] = {}
        self.lrs: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.setdefault(trainer.current_epoch, []).append(float(trainer.callback_metrics["train/ewc_loss"]))
        self.lrs.setdefault(trainer.current_epoch, []).append(float(trainer.callback_metrics["train/lr"]))


def test_stream_fit_fills_the_matrix_and_writes_its_files(tiny_arch, tmp_path):
    module = _module(tiny_arch, ewc_lambda=10.0, zero_shot_classes=CLASSES, warmup_steps=2, lr=1e-3)
    losses = _EWCLossPerEpoch()
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[losses])
    trainer.fit(module, datamodule=_stream(module))

    m = module.matrix
    assert m.task_names == ["circle+square", "triangle+cross", "star"]
    for score in ("R@1", "i2t_R@1", "t2i_R@1", "zeroshot_top1"):
        assert len(m.before[score]) == 3 and len(m.rows[score]) == 3, score
        assert all(0.0 <= v <= 1.0 for row in m.rows[score] for v in row), score
    assert m.rows["R@1"][1][0] == pytest.approx(0.5 * (m.rows["i2t_R@1"][1][0] + m.rows["t2i_R@1"][1][0]))

    # A Fisher and an anchor after tasks 0 and 1 (none after the last task: nothing would use it).
    assert module.penalty.tasks_consolidated == 2 and len(module.penalty.terms) == 2
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    for term in module.penalty.terms:
        assert set(term["fisher"]) == set(term["anchor"]) == trainable
        flat = torch.cat([f.flatten() for f in term["fisher"].values()])
        assert torch.isfinite(flat).all() and (flat >= 0).all() and flat.max() > 0
    assert max(losses.values[0]) == 0.0  # nothing consolidated during the first task
    # Later tasks pay the penalty once the weights leave the anchor (after their first step).
    assert losses.values[1][0] == pytest.approx(0.0, abs=1e-9) and len(losses.values[1]) > 1
    assert all(v > 0 for v in losses.values[1][1:] + losses.values[2])
    # The warmup restarts at every task: each task's first step runs at half the peak rate.
    assert [losses.lrs[e][0] for e in range(3)] == pytest.approx([5e-4] * 3)
    assert losses.lrs[1][1] == pytest.approx(1e-3)

    out = tmp_path / "continual"
    with open(out / "R_at_1.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["after", *m.task_names]
    assert [r[0] for r in rows[1:]] == ["before", "after circle+square", "after triangle+cross", "after star"]
    assert [float(x) for x in rows[-1][1:]] == pytest.approx(m.rows["R@1"][2], abs=1e-5)
    assert (out / "R_at_1.png").stat().st_size > 1000 and (out / "zeroshot_top1.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks_done"] == 3
    assert summary["summary"]["R@1"] == pytest.approx(m.summary("R@1"), nan_ok=True)
    logged = trainer.callback_metrics
    for key in ("continual/R@1_avg", "continual/R@1_bwt", "continual/R@1_forgetting", "continual/R@1_fwt",
                "continual/zeroshot_top1_task2", "continual/tasks_done"):
        assert key in logged, key
    assert logged["continual/R@1_avg"].item() == pytest.approx(sum(m.rows["R@1"][2]) / 3, abs=1e-6)


def test_penalty_gradient_is_added_to_the_data_gradient(tiny_arch):
    module = _module(tiny_arch, ewc_lambda=0.5)
    module.configure_model()
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    torch.manual_seed(1)
    anchor = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in params.items()}
    fisher = {n: torch.rand_like(p) for n, p in params.items()}
    module.penalty.consolidate(anchor, fisher)
    data_grad = {n: torch.randn_like(p) for n, p in params.items()}
    names = list(params)
    for i, n in enumerate(names):  # some parameters got no data gradient at all
        params[n].grad = data_grad[n].clone() if i % 2 else None
    value = module.parameter_penalty()["ewc_loss"]
    value.backward()  # as the training step does, together with the data loss (here already in .grad)
    expected_value = 0.0
    for i, n in enumerate(names):
        diff = params[n].detach() - anchor[n]
        expected = 0.5 * fisher[n] * diff + (data_grad[n] if i % 2 else 0)
        assert torch.allclose(params[n].grad, expected, atol=1e-6), n
        expected_value += float(0.25 * (fisher[n] * diff * diff).sum())
    assert value.item() == pytest.approx(expected_value, rel=1e-4)


def test_penalty_as_a_loss_has_the_analytic_gradient(tiny_arch):
    """The differentiable form every strategy back-propagates (``EWCPenalty.loss``) against the
    analytic value and gradient (``EWCPenalty.__call__``)."""
    module = _module(tiny_arch, ewc_lambda=0.5)
    module.configure_model()
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    torch.manual_seed(2)
    for _ in range(2):
        module.penalty.consolidate({n: p.detach() + 0.1 * torch.randn_like(p) for n, p in params.items()},
                                   {n: torch.rand_like(p) for n, p in params.items()})
    value, grads = module.penalty(params, 0.5)
    loss = module.penalty.loss(params, 0.5)
    auto = torch.autograd.grad(loss, list(params.values()))
    assert loss.item() == pytest.approx(value.item(), rel=1e-5) and value.item() > 0
    for (n, g), a in zip(grads.items(), auto):
        assert torch.allclose(a, g, rtol=1e-5, atol=1e-7), n


class _RecordFisher(EWCIncremental):
    """Keeps every raw Fisher estimate, to check how the penalty combines them."""

    def _estimate_fisher(self, task):
        fisher = super()._estimate_fisher(task)
        self.estimates = [*getattr(self, "estimates", []), {n: f.clone() for n, f in fisher.items()}]
        return fisher


class _ParamsAtEpochEnd(L.Callback):
    def __init__(self):
        self.params = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.params.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})


def test_online_mode_keeps_one_decayed_fisher_and_the_latest_anchor(tiny_arch, tmp_path):
    torch.manual_seed(0)
    module = _RecordFisher(OpenCLIP(tiny_arch), ewc_lambda=1.0, mode="online", gamma=0.5, warmup_steps=1,
                           fisher_estimator="per_batch", fisher_samples=8, fisher_batch_size=4, export_dir="",
                           evaluate_before=False)
    params = _ParamsAtEpochEnd()
    _trainer(tmp_path, max_epochs=3, callbacks=[params]).fit(module, datamodule=_stream(module, size=24))
    assert len(module.estimates) == 2 and len(module.penalty.terms) == 1
    term = module.penalty.terms[0]
    for n, f in term["fisher"].items():
        assert torch.allclose(f, 0.5 * module.estimates[0][n] + module.estimates[1][n]), n
        assert torch.equal(term["anchor"][n], params.params[1][n]), n  # weights at the end of task 1
    assert module.matrix.before == {} and len(module.matrix.rows["R@1"]) == 3


@pytest.mark.parametrize("setting", ["finetune", "l2"])
def test_baselines(setting, tiny_arch, tmp_path):
    kw = {"ewc_lambda": 0.0} if setting == "finetune" else {"ewc_lambda": 1.0, "importance": "uniform"}
    module = _module(tiny_arch, evaluate_before=False, **kw)
    losses, params = _EWCLossPerEpoch(), _ParamsAtEpochEnd()
    groups = [["circle", "square", "triangle"], ["cross", "star"]]
    _trainer(tmp_path, max_epochs=2, callbacks=[losses, params]).fit(
        module, datamodule=_stream(module, groups, size=20, batch_size=4))
    assert len(module.matrix.rows["R@1"]) == 2
    if setting == "finetune":
        assert module.penalty.terms == [] and set(losses.values[1]) == {0.0}
    else:
        (term,) = module.penalty.terms
        assert term["fisher"] is None
        for n, a in term["anchor"].items():
            assert torch.equal(a, params.params[0][n]), n
        assert len(losses.values[1]) > 1 and all(v > 0 for v in losses.values[1][1:])


class _StateAtTrainStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.terms = [{k: {n: t.clone() for n, t in v.items()} for k, v in term.items()}
                      for term in pl_module.penalty.terms]
        self.step = trainer.global_step


def test_resume_between_tasks_restores_fisher_anchors_and_matrix(tiny_arch, tmp_path):
    groups = [["circle", "square", "triangle"], ["cross", "star"]]
    ckpt_dir = tmp_path / "ckpt"
    first = _module(tiny_arch, ewc_lambda=5.0)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1)
    with pytest.warns(UserWarning, match="max_epochs is 1"):  # stopping after task 0 on purpose
        _trainer(tmp_path / "a", max_epochs=1, callbacks=[ckpt]).fit(
            first, datamodule=_stream(first, groups, size=20, batch_size=4))
    assert first.penalty.tasks_consolidated == 1  # training stopped after task 0
    saved = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)["ewc_incremental"]
    assert len(saved["penalty"]["terms"]) == 1 and saved["matrix"]["rows"]["R@1"] == first.matrix.rows["R@1"]

    second = _module(tiny_arch, ewc_lambda=5.0)
    state, losses = _StateAtTrainStart(), _EWCLossPerEpoch()
    _trainer(tmp_path / "b", max_epochs=2, callbacks=[state, losses]).fit(
        second, datamodule=_stream(second, groups, size=20, batch_size=4), ckpt_path=str(ckpt_dir / "last.ckpt"))
    (restored,) = state.terms
    (original,) = first.penalty.terms
    for key in ("fisher", "anchor"):
        assert set(restored[key]) == set(original[key])
        for n in original[key]:
            assert torch.equal(restored[key][n], original[key][n]), (key, n)
    # The second run trained task 1 only, under the restored penalty, and completed the matrix.
    assert state.step > 0 and set(losses.values) == {1} and len(losses.values[1]) > 1
    assert all(v > 0 for v in losses.values[1][1:])
    assert second.penalty.tasks_consolidated == 1
    assert second.matrix.before == first.matrix.before
    assert second.matrix.rows["R@1"][0] == first.matrix.rows["R@1"][0] and len(second.matrix.rows["R@1"]) == 2
    assert second._task == 1 and second._task_start_step == state.step  # schedule restarted for task 1


def test_needs_a_task_stream(tiny_arch, tmp_path):
    module = _module(tiny_arch)
    dm = ImageTextDataModule(train=SyntheticShapes(8, seed=0, image_size=16), batch_size=4,
                             preprocessing=module.preprocessing)
    with pytest.raises(TypeError, match="TaskStreamDataModule"):
        _trainer(tmp_path, max_epochs=1).fit(module, datamodule=dm)


@pytest.mark.slow
def test_recipe_runs_a_few_steps_through_the_cli(tmp_path, tiny_arch):
    main([
        "fit", "--config", str(RECIPE),
        f"--model.init_args.model.init_args.arch={tiny_arch}",
        "--model.init_args.model.init_args.image_size=16",
        "--model.init_args.fisher_samples=4",
        "--model.init_args.export_dir=",
        "--data.init_args.train.init_args.size=48",
        "--data.init_args.train.init_args.image_size=16",
        "--data.init_args.val.init_args.size=12",
        "--data.init_args.val.init_args.image_size=16",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
        "--trainer.max_steps=3",
        "--trainer.check_val_every_n_epoch=1",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks=[]",
    ])
    assert (tmp_path / "continual" / "R_at_1.csv").exists()  # the "before" row
    assert (tmp_path / "metrics.csv").exists()
