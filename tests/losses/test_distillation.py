"""Distillation losses against reference computations written out here, and exactness across
2 real processes (loss and every gradient, including the learned projection's)."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import run_on_processes
from mmkit.losses import (
    ClipLoss,
    DistillationLoss,
    FeatureDistillLoss,
    InteractiveContrastiveLoss,
    SimilarityDistillLoss,
)


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _batch(n=6, ds=8, dt=8):
    return {
        "image_features": _unit(n, ds, seed=1),
        "text_features": _unit(n, ds, seed=2),
        "logit_scale": torch.tensor(9.0, dtype=torch.float64),
        "teacher_image_features": _unit(n, dt, seed=3),
        "teacher_text_features": _unit(n, dt, seed=4),
        "teacher_logit_scale": torch.tensor(20.0, dtype=torch.float64),
    }


def _softmax_rows(logits):
    e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _ref_similarity(b, tau):
    si, st, ti, tt = b["image_features"], b["text_features"], b["teacher_image_features"], b["teacher_text_features"]
    s, t = b["logit_scale"], b["teacher_logit_scale"]
    total = 0.0
    for student, teacher in ((si @ st.T, ti @ tt.T), (st @ si.T, tt @ ti.T)):
        q = _softmax_rows(s * student / tau)
        p = _softmax_rows(t * teacher / tau)
        # KL(p || q) per row, averaged over rows
        total = total + (p * (p.log() - q.log())).sum(dim=1).mean()
    return tau**2 * total / 2


def _ref_infonce(logits):
    n = logits.shape[0]
    log_probs = logits - logits.exp().sum(dim=1, keepdim=True).log()
    return -log_probs[torch.arange(n), torch.arange(n)].mean()


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_similarity_distillation_matches_reference_kl(tau):
    b = _batch()
    got = SimilarityDistillLoss(temperature=tau)(**b)["similarity_kd_loss"]
    assert torch.allclose(got, _ref_similarity(b, tau), atol=1e-10)
    # Identical similarity structure and temperature: nothing to distil.
    same = dict(b, teacher_image_features=b["image_features"], teacher_text_features=b["text_features"],
                teacher_logit_scale=b["logit_scale"])
    assert SimilarityDistillLoss(temperature=tau)(**same)["similarity_kd_loss"].abs() < 1e-12


def test_similarity_distillation_uses_fixed_teacher_scale_when_given():
    b = _batch()
    fixed = SimilarityDistillLoss(teacher_logit_scale=5.0)(**{**b, "teacher_logit_scale": None})["similarity_kd_loss"]
    ref = _ref_similarity({**b, "teacher_logit_scale": torch.tensor(5.0, dtype=torch.float64)}, 1.0)
    assert torch.allclose(fixed, ref, atol=1e-10)
    with pytest.raises(ValueError, match="teacher's logit scale"):
        SimilarityDistillLoss()(**{**b, "teacher_logit_scale": None})


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_feature_distillation_matches_reference(kind):
    b = _batch()
    got = FeatureDistillLoss(kind)(**b)["feature_kd_loss"]
    pairs = [(b["image_features"], b["teacher_image_features"]), (b["text_features"], b["teacher_text_features"])]
    if kind == "mse":
        ref = sum(((s - t) ** 2).sum(dim=1).mean() for s, t in pairs) / 2
    else:
        ref = sum((1 - F.cosine_similarity(s, t, dim=1)).mean() for s, t in pairs) / 2
    assert torch.allclose(got, ref, atol=1e-10)


def test_interactive_contrastive_matches_reference_infonce():
    b = _batch()
    got = InteractiveContrastiveLoss()(**b)["interactive_kd_loss"]
    s = b["logit_scale"]
    ref = (_ref_infonce(s * b["image_features"] @ b["teacher_text_features"].T)
           + _ref_infonce(s * b["text_features"] @ b["teacher_image_features"].T)) / 2
    assert torch.allclose(got, ref, atol=1e-10)


def test_combined_loss_weights_terms_and_zero_disables():
    b = _batch()
    loss = DistillationLoss(contrastive=0.5, similarity=2.0, feature=3.0, interactive=0.0, temperature=2.0)
    terms = loss(**b)
    assert set(terms) == {"contrastive_loss", "similarity_kd_loss", "feature_kd_loss"}
    assert torch.allclose(terms["contrastive_loss"], 0.5 * ClipLoss()(**b)["contrastive_loss"])
    assert torch.allclose(terms["similarity_kd_loss"], 2.0 * _ref_similarity(b, 2.0))
    assert torch.allclose(terms["feature_kd_loss"], 3.0 * FeatureDistillLoss()(**b)["feature_kd_loss"])
    with pytest.raises(ValueError, match="not all 0"):
        DistillationLoss(contrastive=0, similarity=0)


def test_learned_projection_when_widths_differ():
    b = _batch(ds=6, dt=8)
    loss = DistillationLoss(similarity=1.0, feature=1.0, interactive=1.0).double()
    with pytest.raises(ValueError, match="setup_dims"):
        loss(**b)
    loss.setup_dims(6, 8)
    loss.double()
    w = loss.projection.weight
    assert w.shape == (8, 6) and w.requires_grad and loss.projection.bias is None
    assert any(p is w for p in loss.parameters())  # picked up by the module's optimizer
    terms = loss(**b)
    proj = {"image_features": F.normalize(b["image_features"] @ w.T, dim=-1),
            "text_features": F.normalize(b["text_features"] @ w.T, dim=-1)}
    ref_feature = FeatureDistillLoss()(**{**b, **proj})["feature_kd_loss"]
    s = b["logit_scale"]
    ref_inter = (_ref_infonce(s * proj["image_features"] @ b["teacher_text_features"].T)
                 + _ref_infonce(s * proj["text_features"] @ b["teacher_image_features"].T)) / 2
    assert torch.allclose(terms["feature_kd_loss"], ref_feature, atol=1e-10)
    assert torch.allclose(terms["interactive_kd_loss"], ref_inter, atol=1e-10)
    # The similarity term compares similarity matrices: it needs no projection.
    assert torch.allclose(terms["similarity_kd_loss"], _ref_similarity(b, 1.0), atol=1e-10)
    sum(terms.values()).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    loss.setup_dims(6, 8)
    assert loss.projection.weight is w  # idempotent: a second configure_model keeps it


def test_no_projection_when_widths_match_or_no_term_needs_it():
    loss = DistillationLoss(feature=1.0)
    loss.setup_dims(8, 8)
    assert loss.projection is None
    loss = DistillationLoss(similarity=1.0)
    loss.setup_dims(6, 8)
    assert loss.projection is None


# -- exactness across ranks ----------------------------------------------------------------------
SIZES = (3, 2)  # uneven per-rank batches
N, D_IN, D_S, D_T = sum(SIZES), 10, 6, 8


def _student():
    torch.manual_seed(0)
    params = {
        "w_image": torch.nn.Parameter(torch.randn(D_S, D_IN, dtype=torch.float64)),
        "w_text": torch.nn.Parameter(torch.randn(D_S, D_IN, dtype=torch.float64)),
        "log_scale": torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64)),
    }
    loss = DistillationLoss(contrastive=1.0, similarity=1.0, feature=1.0, interactive=1.0, temperature=2.0)
    loss.setup_dims(D_S, D_T)
    return params, loss.double()


def _data():
    g = torch.Generator().manual_seed(7)
    return {
        "x_image": torch.randn(N, D_IN, generator=g, dtype=torch.float64),
        "x_text": torch.randn(N, D_IN, generator=g, dtype=torch.float64),
        "teacher_image_features": _unit(N, D_T, seed=8),
        "teacher_text_features": _unit(N, D_T, seed=9),
        "teacher_logit_scale": torch.tensor(30.0, dtype=torch.float64),
    }


def _loss_and_grads(rows: slice):
    params, loss_fn = _student()
    d = _data()
    out = loss_fn(
        image_features=F.normalize(d["x_image"][rows] @ params["w_image"].T, dim=-1),
        text_features=F.normalize(d["x_text"][rows] @ params["w_text"].T, dim=-1),
        logit_scale=params["log_scale"].exp(),
        teacher_image_features=d["teacher_image_features"][rows],
        teacher_text_features=d["teacher_text_features"][rows],
        teacher_logit_scale=d["teacher_logit_scale"],
    )
    total = sum(out.values())
    total.backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    grads["projection"] = loss_fn.projection.weight.grad.clone()
    return {k: v.detach() for k, v in out.items()}, grads


def _worker(rank, world, out_dir):
    lo = sum(SIZES[:rank])
    terms, grads = _loss_and_grads(slice(lo, lo + SIZES[rank]))
    for t in [*terms.values(), *grads.values()]:  # what DDP does: average over ranks
        dist.all_reduce(t)
        t /= world
    if rank == 0:
        torch.save({"terms": terms, "grads": grads}, Path(out_dir) / "kd.pt")


@pytest.mark.slow
def test_two_processes_equal_one_big_batch(tmp_path):
    run_on_processes(_worker, len(SIZES), str(tmp_path))
    got = torch.load(tmp_path / "kd.pt")
    ref_terms, ref_grads = _loss_and_grads(slice(0, N))
    assert set(got["terms"]) == {"contrastive_loss", "similarity_kd_loss", "feature_kd_loss", "interactive_kd_loss"}
    for k, ref in ref_terms.items():
        assert torch.allclose(got["terms"][k], ref, atol=1e-10), k
    for k, ref in ref_grads.items():
        assert ref.abs().max() > 1e-4, k  # the comparison means something
        assert torch.allclose(got["grads"][k], ref, atol=1e-10), k
