"""Hinge ranking losses (RankingLoss / TripletLoss), negative selection and the memory queue,
each against a reference written here with explicit loops over anchors and negatives."""


import pytest
import torch
import torch.nn.functional as F

from mmkit.losses import MemoryQueue, RankingLoss, TripletLoss
from mmkit.losses.negative_mining import random_keys, select_negatives

B, DIM = 6, 5


def _features(seed=0, n=B, normalize=True):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    txt = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    return img.requires_grad_(), txt.requires_grad_()


def _dist(a, b, kind):
    if kind == "cosine":
        return 1 - torch.dot(a, b) / (a.norm() * b.norm())
    return (a - b).norm()


def _choose(anchor_dists, d_pos, negs, strategy, k, keys):
    """Indices of the chosen negatives for one anchor, by the definitions in the docstrings."""
    by_dist = sorted(negs, key=lambda j: anchor_dists[j].item())  # closest first
    if strategy == "all":
        return list(negs)
    if strategy == "hardest":
        return by_dist[:1]
    if strategy == "top_k":
        return by_dist[:k]
    if strategy == "semi_hard":
        farther = [j for j in by_dist if anchor_dists[j].item() > d_pos.item()]
        return farther[:1] if farther else by_dist[-1:]
    if strategy == "random":
        return sorted(negs, key=lambda j: -keys[j].item())[:k]
    raise AssertionError(strategy)


def reference(img, txt, *, margin=0.2, distance="cosine", strategy="all", k=1, reduction="sum",
              directions="both", ids=None, memory=None, step=0, seed=0):
    """Loss and statistics by loops: per anchor, the distances to every candidate, the chosen
    negatives, one hinge per chosen negative."""
    n = img.shape[0]
    ids = list(range(n)) if ids is None else [int(i) for i in ids]
    mem_img, mem_txt, mem_ids = memory if memory is not None else (img[:0], txt[:0], [])
    runs = []
    if directions in ("both", "image_to_text"):
        runs.append((0, img, torch.cat([txt, mem_txt])))
    if directions in ("both", "text_to_image"):
        runs.append((1, txt, torch.cat([img, mem_img])))
    cand_ids = ids + [int(i) for i in mem_ids]
    total, count, active, pos_sum, neg_sum, gap_sum, anchors = 0.0, 0, 0, 0.0, 0.0, 0.0, 0
    for direction, anc, cands in runs:
        keys = random_keys(seed, step, direction, 0, n, cands.shape[0]) if strategy == "random" else None
        for a in range(n):
            dists = [_dist(anc[a], cands[j], distance) for j in range(cands.shape[0])]
            d_pos = dists[a]
            negs = [j for j in range(cands.shape[0]) if j != a and cand_ids[j] != ids[a]]
            chosen = _choose(dists, d_pos, negs, strategy, k, None if keys is None else keys[a])
            pos_sum += (1 - d_pos).item() if distance == "cosine" else d_pos.item()
            anchors += 1
            for j in chosen:
                h = torch.clamp(margin + d_pos - dists[j], min=0)
                total = total + h
                count += 1
                active += int(h > 0)
                neg_sum += (1 - dists[j]).item() if distance == "cosine" else dists[j].item()
                gap_sum += (dists[j] - d_pos).item()
    loss = total / (n if reduction == "sum" else count)
    unit = "sim" if distance == "cosine" else "dist"
    stats = {"active": active / count, f"pos_{unit}": pos_sum / anchors, f"neg_{unit}": neg_sum / count, "gap": gap_sum / count}
    return loss, stats


STRATEGIES = ["all", "hardest", "semi_hard", "top_k", "random"]


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_statistics_and_gradients_match_the_loop_reference(strategy, distance):
    kw = dict(margin=0.3, distance=distance, strategy=strategy, k=2)
    loss_fn = RankingLoss(margin=0.3, distance=distance, negatives=strategy, num_negatives=2)
    img, txt = _features(1, normalize=distance == "cosine")
    out = loss_fn(image_features=img, text_features=txt, step=5)
    ref, ref_stats = reference(img, txt, step=5, **kw)
    assert out["ranking_loss"].item() == pytest.approx(ref.item(), abs=1e-10)
    g = torch.autograd.grad(out["ranking_loss"], (img, txt))
    g_ref = torch.autograd.grad(ref, (img, txt))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-10)
    assert any(x.abs().max() > 1e-3 for x in g)
    for key, value in ref_stats.items():
        assert out[f"ranking_{key}"].item() == pytest.approx(value, abs=1e-6), key
    assert set(out) == {"ranking_loss"} | {f"ranking_{k}" for k in ref_stats}
    assert all(not v.requires_grad for k, v in out.items() if not k.endswith("_loss"))


@pytest.mark.parametrize("directions", ["image_to_text", "text_to_image"])
def test_one_direction_only(directions):
    img, txt = _features(2)
    out = RankingLoss(negatives="hardest", directions=directions)(image_features=img, text_features=txt)
    ref, _ = reference(img, txt, strategy="hardest", directions=directions)
    assert out["ranking_loss"].item() == pytest.approx(ref.item(), abs=1e-10)


def test_vsepp_max_violation_is_the_largest_hinge_per_anchor():
    # VSE++'s definition, written as a matrix computation rather than a selection.
    img, txt = _features(3)
    margin = 0.2
    s = img @ txt.T
    pos = s.diag()
    cost_t = (margin - pos[:, None] + s).clamp(min=0).fill_diagonal_(0)  # image anchors vs texts
    cost_i = (margin - pos[None, :] + s).clamp(min=0).fill_diagonal_(0)  # text anchors vs images
    expected = (cost_t.max(1).values.sum() + cost_i.max(0).values.sum()) / B
    sum_of_hinges = (cost_t.sum() + cost_i.sum()) / B
    out_max = RankingLoss(margin=margin, negatives="hardest")(image_features=img, text_features=txt)
    out_sum = RankingLoss(margin=margin, negatives="all")(image_features=img, text_features=txt)
    assert out_max["ranking_loss"].item() == pytest.approx(expected.item(), abs=1e-12)
    assert out_sum["ranking_loss"].item() == pytest.approx(sum_of_hinges.item(), abs=1e-12)


def test_triplet_defaults_are_euclidean_semi_hard_mean_over_triplets():
    img, txt = _features(4)
    loss_fn = TripletLoss(margin=0.5)
    out = loss_fn(image_features=img, text_features=txt)
    ref, stats = reference(img, txt, margin=0.5, distance="euclidean", strategy="semi_hard", reduction="mean")
    assert out["triplet_loss"].item() == pytest.approx(ref.item(), abs=1e-10)
    assert out["triplet_active"].item() == pytest.approx(stats["active"])
    # mean over the 2·B·k triplets vs (VSE) sum over negatives and directions, mean over B anchors
    top = TripletLoss(negatives="top_k", num_negatives=3, distance="cosine")(image_features=img, text_features=txt)
    top_sum = RankingLoss(negatives="top_k", num_negatives=3)(image_features=img, text_features=txt)
    assert top_sum["ranking_loss"].item() == pytest.approx(2 * 3 * top["triplet_loss"].item(), abs=1e-10)


def test_selection_by_hand_on_a_known_case():
    # One anchor, its positive (column 0, score 0.5) and four candidates at chosen scores.
    scores = torch.tensor([[0.5, 0.9, 0.45, 0.1, 0.3]])
    valid = torch.tensor([[False, True, True, True, True]])
    pos = torch.tensor([0.5])
    pick = lambda s, k=1: select_negatives(scores, pos, valid, s, k)[0].nonzero().flatten().tolist()  # noqa: E731
    assert pick("all") == [1, 2, 3, 4]
    assert pick("hardest") == [1]
    assert pick("top_k", 2) == [1, 2]
    assert pick("top_k", 10) == [1, 2, 3, 4]  # fewer valid negatives than k
    assert pick("semi_hard") == [2]  # the closest candidate still farther than the positive
    # No candidate farther than the positive: semi-hard falls back to the least hard one.
    close = select_negatives(torch.tensor([[0.5, 0.9, 0.7]]), pos, torch.tensor([[False, True, True]]), "semi_hard")
    assert close[0].tolist() == [False, False, True]
    # A single pair has no negative at all: nothing is selected and the loss is zero.
    img, txt = _features(0, n=1)
    out = RankingLoss(negatives="hardest")(image_features=img, text_features=txt)
    assert out["ranking_loss"].item() == 0.0 and out["ranking_active"].item() == 0.0


def test_other_captions_of_the_same_image_are_never_negatives():
    img, txt = _features(5)
    # rows 0 and 1 are two captions of one image (same image embedding, same id)
    img = img.detach().clone()
    img[1] = img[0]
    txt = txt.detach().clone()
    txt[0] = img[0]  # a well-aligned pair...
    txt[1] = img[0] + 0.05 * txt[1]  # ...and a near-identical second caption: hardest if allowed
    txt = F.normalize(txt, dim=-1)
    ids = torch.tensor([7, 7, 1, 2, 3, 4])
    out = RankingLoss(negatives="hardest")(image_features=img, text_features=txt, image_ids=ids)
    ref, _ = reference(img, txt, strategy="hardest", ids=ids)
    wrong, _ = reference(img, txt, strategy="hardest")
    assert out["ranking_loss"].item() == pytest.approx(ref.item(), abs=1e-10)
    assert abs(ref.item() - wrong.item()) > 1e-3  # the exclusion changes the result


def test_sum_warmup_switches_to_max_violation_at_the_given_step():
    img, txt = _features(6)
    loss_fn = RankingLoss(negatives="hardest", sum_warmup_steps=3)
    sum_ref, _ = reference(img, txt, strategy="all")
    max_ref, _ = reference(img, txt, strategy="hardest")
    got = [loss_fn(image_features=img, text_features=txt, step=s)["ranking_loss"].item() for s in range(6)]
    assert got[:3] == pytest.approx([sum_ref.item()] * 3, abs=1e-10)
    assert got[3:] == pytest.approx([max_ref.item()] * 3, abs=1e-10)
    assert [loss_fn.strategy_at(s) for s in (0, 2, 3, 100)] == ["all", "all", "hardest", "hardest"]
    with pytest.raises(ValueError, match="needs the training step"):
        loss_fn(image_features=img, text_features=txt)


def test_random_negatives_are_seeded_valid_and_change_with_the_step():
    img, txt = _features(7, n=10)
    loss_fn = RankingLoss(negatives="random", num_negatives=3, seed=11)
    a = loss_fn(image_features=img, text_features=txt, step=4)["ranking_loss"].item()
    b = loss_fn(image_features=img, text_features=txt, step=4)["ranking_loss"].item()
    c = loss_fn(image_features=img, text_features=txt, step=5)["ranking_loss"].item()
    ref, stats = reference(img, txt, strategy="random", k=3, step=4, seed=11)
    assert a == b == pytest.approx(ref.item(), abs=1e-10)
    assert a != c
    # every anchor got exactly k negatives, none of them its positive
    keys = random_keys(11, 4, 0, 0, 10, 10)
    valid = ~torch.eye(10, dtype=torch.bool)
    sel = select_negatives(torch.zeros(10, 10), torch.zeros(10), valid, "random", 3, keys)
    assert sel.sum(1).tolist() == [3] * 10 and not sel.diagonal().any()


def test_random_keys_are_uniform_and_each_rank_computes_its_own_rows():
    keys = random_keys(5, 2, 1, 0, 200, 300)
    assert torch.equal(random_keys(5, 2, 1, 37, 20, 300), keys[37:57])  # rows depend on the global row only
    assert 0.0 <= keys.min() and keys.max() < 1.0
    assert abs(keys.mean().item() - 0.5) < 0.01 and abs(keys.var().item() - 1 / 12) < 0.005
    assert not torch.equal(keys, random_keys(5, 3, 1, 0, 200, 300))  # a new draw every step
    # Over many steps every valid negative is picked about equally often.
    valid = ~torch.eye(8, dtype=torch.bool)
    counts = sum(select_negatives(torch.zeros(8, 8), torch.zeros(8), valid, "random", 2,
                                  random_keys(0, s, 0, 0, 8, 8)).double() for s in range(700))
    assert counts.diagonal().sum() == 0
    assert torch.allclose(counts[valid], torch.full((56,), 200.0, dtype=torch.float64), rtol=0.25)


def test_weight_scales_the_loss_only():
    img, txt = _features(8)
    one = RankingLoss()(image_features=img, text_features=txt)
    half = RankingLoss(weight=0.5)(image_features=img, text_features=txt)
    assert half["ranking_loss"].item() == pytest.approx(0.5 * one["ranking_loss"].item())
    assert half["ranking_active"].item() == one["ranking_active"].item()


def test_learned_mlp_similarity_is_rejected():
    img, txt = _features(9)
    with pytest.raises(ValueError, match="cosine"):
        RankingLoss()(image_features=img, text_features=txt, pair_logits=lambda a, b: a @ b.T)


# -- memory queue ----------------------------------------------------------------------------
def test_memory_queue_keeps_the_last_rows_oldest_first():
    q = MemoryQueue(5)
    assert len(q) == 0
    rows = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 3)
    q.enqueue(rows[:3], -rows[:3], torch.arange(3))
    img, txt, ids = q.entries()
    assert img[:, 0].tolist() == [0, 1, 2] and txt[:, 0].tolist() == [0, -1, -2] and ids.tolist() == [0, 1, 2]
    q.enqueue(rows[3:6], -rows[3:6], torch.arange(3, 6))
    img, txt, ids = q.entries()
    assert img[:, 0].tolist() == [1, 2, 3, 4, 5] and ids.tolist() == [1, 2, 3, 4, 5] and len(q) == 5
    q.enqueue(rows[:8], -rows[:8], torch.arange(8))  # larger than the queue: its last 5 rows
    img, txt, ids = q.entries()
    assert img[:, 0].tolist() == [3, 4, 5, 6, 7] and txt[:, 0].tolist() == [-3, -4, -5, -6, -7]


def test_memory_adds_past_negatives_in_training_only():
    loss_fn = RankingLoss(negatives="hardest", memory_size=4)
    img0, txt0 = _features(10, n=3)
    img1, txt1 = _features(11, n=3)
    ids0, ids1 = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 2])  # id 2 recurs: its old copy is no negative
    loss_fn(image_features=img0, text_features=txt0, image_ids=ids0)  # empty queue: then holds batch 0
    mem = loss_fn.memory.entries()
    assert torch.equal(mem[0], img0.detach().float()) and torch.equal(mem[2], ids0)
    out = loss_fn(image_features=img1, text_features=txt1, image_ids=ids1)
    memory = (mem[0].double(), mem[1].double(), mem[2])
    ref, _ = reference(img1, txt1, strategy="hardest", ids=ids1, memory=memory)
    no_mem, _ = reference(img1, txt1, strategy="hardest", ids=ids1)
    assert out["ranking_loss"].item() == pytest.approx(ref.item(), abs=1e-6)
    assert abs(ref.item() - no_mem.item()) > 1e-3
    g = torch.autograd.grad(out["ranking_loss"], (img1, txt1))
    g_ref = torch.autograd.grad(ref, (img1, txt1))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, g_ref))
    assert loss_fn.memory.entries()[2].tolist() == [2, 3, 4, 2]  # 1 row of batch 0 + batch 1

    # Evaluation: the queue is neither used nor updated.
    loss_fn.eval()
    before = [t.clone() for t in loss_fn.memory.entries()]
    out_eval = loss_fn(image_features=img1, text_features=txt1, image_ids=ids1)
    assert out_eval["ranking_loss"].item() == pytest.approx(no_mem.item(), abs=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(before, loss_fn.memory.entries()))


def test_memory_skips_non_finite_batches():
    loss_fn = RankingLoss(memory_size=4)
    img, txt = _features(12, n=2)
    loss_fn(image_features=img * float("nan"), text_features=txt)
    assert len(loss_fn.memory) == 0


def test_memory_queue_round_trips_through_a_checkpoint(tmp_path):
    loss_fn = RankingLoss(memory_size=4)
    for seed in range(3):  # 6 rows through a queue of 4: wrapped around
        img, txt = _features(seed, n=2)
        loss_fn(image_features=img, text_features=txt, image_ids=torch.tensor([seed, seed + 10]))
    torch.save(loss_fn.state_dict(), tmp_path / "ckpt.pt")
    assert {"memory.image", "memory.text", "memory.image_id", "memory.ptr", "memory.count"} <= set(loss_fn.state_dict())

    fresh = RankingLoss(memory_size=4)  # width unknown until loaded
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    for a, b in zip(loss_fn.memory.entries(), fresh.memory.entries()):
        assert torch.equal(a, b)
    # and the restored queue continues exactly where the saved one would have
    img, txt = _features(9, n=2)
    for fn in (loss_fn, fresh):
        fn(image_features=img, text_features=txt, image_ids=torch.tensor([0, 1]))
    for a, b in zip(loss_fn.memory.entries(), fresh.memory.entries()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="holds 4 rows"):
        RankingLoss(memory_size=3).load_state_dict(loss_fn.state_dict())
