"""EWC: Fisher estimates against direct computations on a tiny model, the penalty's value and
gradient against autograd of the explicit formula, online decay, state round trip."""

import pytest
import torch
from torch import nn

from mmkit.losses import ClipLoss
from mmkit.losses.ewc import EWCPenalty, fisher_sums, normalize_mean, reduce_fisher


class TwoLayer(nn.Module):
    """A 2-layer 'dual encoder': images and texts are feature vectors; one shared temperature."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        self.text = nn.Linear(6, 3)
        self.logit_scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, images, texts):
        return {"image_features": self.image(images), "text_features": self.text(texts),
                "logit_scale": self.logit_scale.exp()}


def squared_distance(image_features, text_features, **_):
    """A loss that is a mean of per-sample terms (so per-sample gradients are textbook ones)."""
    return {"dist_loss": (image_features - text_features).pow(2).sum(1).mean(), "stat": torch.tensor(3.0)}


def _data(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 6, generator=g, dtype=torch.float64)


def _batches(images, texts, size):
    return [(images[i : i + size], texts[i : i + size]) for i in range(0, len(images), size)]


def _params(model):
    return dict(model.named_parameters())


def test_per_batch_fisher_is_the_mean_squared_batch_gradient():
    model = TwoLayer().double()
    images, texts = _data(10)
    sums, count = fisher_sums(_params(model), _batches(images, texts, 4), model, squared_distance, 10, "per_batch")
    fisher = reduce_fisher(sums, count)
    assert count == 3  # batches of 4, 4, 2
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for im, tx in _batches(images, texts, 4):
        model.zero_grad()
        out = model(im, tx)
        (out["image_features"] - out["text_features"]).pow(2).sum(1).mean().backward()
        for n, p in model.named_parameters():
            ref[n] += (p.grad if p.grad is not None else torch.zeros_like(p)) ** 2 / 3
    for n in ref:
        assert torch.allclose(fisher[n], ref[n].float(), rtol=1e-5, atol=1e-9), n


def test_per_sample_fisher_of_a_decomposable_loss_is_the_textbook_one():
    model = TwoLayer().double()
    images, texts = _data(9)
    sums, count = fisher_sums(_params(model), _batches(images, texts, 4), model, squared_distance, 9, "per_sample")
    fisher = reduce_fisher(sums, count)
    assert count == 9
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(9):  # each sample's own loss term, one at a time
        model.zero_grad()
        out = model(images[i : i + 1], texts[i : i + 1])
        (out["image_features"] - out["text_features"]).pow(2).sum().backward()
        for n, p in model.named_parameters():
            ref[n] += (p.grad if p.grad is not None else torch.zeros_like(p)) ** 2 / 9
    for n in ref:
        assert torch.allclose(fisher[n], ref[n].float(), rtol=1e-5, atol=1e-9), n


def test_per_sample_infonce_gradients_follow_their_definition():
    """g_i = B · ∇θ L(f_i(θ), others fixed, s fixed) + ∇θ L(features fixed, s(θ)), computed here by
    masking which features depend on θ; mean_i g_i is the batch gradient."""
    model = TwoLayer().double()
    images, texts = _data(5)
    loss = ClipLoss()
    params = _params(model)
    sums, count = fisher_sums(params, [(images, texts)], model, loss, 5, "per_sample")
    fisher = reduce_fisher(sums, count)

    out = model(images, texts)
    fixed = {k: v.detach() for k, v in out.items()}
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    mean_g = {n: torch.zeros_like(p) for n, p in params.items()}
    scale_grad = torch.autograd.grad(loss(**{**fixed, "logit_scale": out["logit_scale"]})["contrastive_loss"],
                                     list(params.values()), allow_unused=True)
    for i in range(5):
        mask = torch.zeros(5, 1, dtype=torch.float64)
        mask[i] = 1.0
        live = {k: fixed[k] + mask * (out[k] - fixed[k]) for k in ("image_features", "text_features")}
        total = loss(**live, logit_scale=fixed["logit_scale"])["contrastive_loss"]
        grads = torch.autograd.grad(total, list(params.values()), retain_graph=True, allow_unused=True)
        for (n, p), g, s in zip(params.items(), grads, scale_grad):
            g_i = (5 * g if g is not None else torch.zeros_like(p)) + (s if s is not None else 0)
            ref[n] += g_i**2 / 5
            mean_g[n] += g_i / 5
    for n in ref:
        assert torch.allclose(fisher[n], ref[n].float(), rtol=1e-5, atol=1e-10), n
    # The shares add up to the batch gradient.
    batch_grad = torch.autograd.grad(loss(**model(images, texts))["contrastive_loss"], list(params.values()))
    for (n, _), g in zip(params.items(), batch_grad):
        assert torch.allclose(mean_g[n], g, atol=1e-12), n
    assert fisher["logit_scale"] > 0


def test_max_samples_cuts_the_last_batch():
    model = TwoLayer().double()
    images, texts = _data(10)
    sums7, count7 = fisher_sums(_params(model), _batches(images, texts, 4), model, squared_distance, 7, "per_sample")
    sums_ref, _ = fisher_sums(_params(model), [(images[:7], texts[:7])], model, squared_distance, 99, "per_sample")
    assert count7 == 7
    for n in sums7:
        assert torch.allclose(sums7[n], sums_ref[n], rtol=1e-6), n


def test_penalty_is_zero_at_the_anchor_and_its_gradient_matches_autograd():
    torch.manual_seed(3)
    shapes = {"w": (3, 2), "b": (2,)}
    anchors = [{n: torch.randn(s, dtype=torch.float64) for n, s in shapes.items()} for _ in range(2)]
    fishers = [{n: torch.rand(s, dtype=torch.float64) for n, s in shapes.items()} for _ in range(2)]
    lam = 0.7
    penalty = EWCPenalty("separate")
    penalty.consolidate(anchors[0], fishers[0])
    value, grads = penalty(dict(anchors[0]), lam)
    assert value.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads.values())

    penalty.consolidate(anchors[1], fishers[1])
    theta = {n: torch.randn(s, dtype=torch.float64, requires_grad=True) for n, s in shapes.items()}
    value, grads = penalty({n: t.detach() for n, t in theta.items()}, lam)
    explicit = sum(lam / 2 * (f[n] * (theta[n] - a[n]) ** 2).sum() for a, f in zip(anchors, fishers) for n in shapes)
    auto = torch.autograd.grad(explicit, list(theta.values()))
    assert value.item() == pytest.approx(explicit.item(), rel=1e-6)
    for (n, _), g in zip(theta.items(), auto):
        assert torch.allclose(grads[n], g, rtol=1e-12), n
        # and the closed form λ Σ_t F_t (θ − θ*_t)
        closed = sum(lam * f[n] * (theta[n].detach() - a[n]) for a, f in zip(anchors, fishers))
        assert torch.allclose(grads[n], closed, rtol=1e-12)
    assert penalty(dict(theta), 0.0)[1] == {}  # λ = 0: plain fine-tuning


def test_uniform_importance_is_l2_to_the_anchor():
    anchor = {"w": torch.tensor([1.0, -2.0])}
    penalty = EWCPenalty("separate")
    penalty.consolidate(anchor, None)
    value, grads = penalty({"w": torch.tensor([2.0, 0.0])}, 2.0)
    assert value.item() == pytest.approx(0.5 * 2.0 * (1.0 + 4.0))
    assert torch.equal(grads["w"], torch.tensor([2.0, 4.0]))


def test_online_mode_keeps_one_decayed_fisher_and_the_latest_anchor():
    penalty = EWCPenalty("online", gamma=0.5)
    f1, f2, f3 = (torch.tensor([4.0, 2.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 8.0]))
    a1, a2, a3 = (torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([2.0, 3.0]))
    penalty.consolidate({"w": a1}, {"w": f1})
    penalty.consolidate({"w": a2}, {"w": f2})
    assert len(penalty.terms) == 1
    assert torch.equal(penalty.terms[0]["fisher"]["w"], 0.5 * f1 + f2)
    penalty.consolidate({"w": a3}, {"w": f3})
    assert torch.equal(penalty.terms[0]["fisher"]["w"], 0.5 * (0.5 * f1 + f2) + f3)  # [1.5, 8.5]
    assert torch.equal(penalty.terms[0]["anchor"]["w"], a3) and penalty.tasks_consolidated == 3
    value, grads = penalty({"w": torch.tensor([3.0, 3.0])}, 1.0)
    assert torch.allclose(grads["w"], torch.tensor([1.5, 0.0]))  # F · (θ − θ*) = [1.5·1, 8.5·0]
    assert value.item() == pytest.approx(0.75)  # ½ · 1.5 · 1²


def test_state_round_trip_and_mode_check():
    penalty = EWCPenalty("separate")
    penalty.consolidate({"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)})
    penalty.consolidate({"w": torch.zeros(2)}, None)
    restored = EWCPenalty("separate")
    restored.load_state_dict(penalty.state_dict())
    theta = {"w": torch.tensor([0.5, 2.0])}
    assert torch.equal(restored(theta, 1.0)[0], penalty(theta, 1.0)[0])
    with pytest.raises(ValueError, match="separate"):
        EWCPenalty("online").load_state_dict(penalty.state_dict())


def test_normalised_fisher_has_mean_one():
    fisher = normalize_mean({"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[2.0]])})  # mean 2
    assert torch.allclose(fisher["a"], torch.tensor([0.5, 1.5])) and torch.allclose(fisher["b"], torch.tensor([[1.0]]))
