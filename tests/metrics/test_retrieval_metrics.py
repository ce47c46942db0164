import statistics

import pytest
import torch

from mmkit.metrics.retrieval import RetrievalMetrics, retrieval_metrics, retrieval_ranks


def brute_force(image_features, text_features, image_id, ks=(1, 5, 10)):
    """Independent reference: float64, one query at a time, argsort positions."""
    img = torch.nn.functional.normalize(image_features.double(), dim=-1)
    txt = torch.nn.functional.normalize(text_features.double(), dim=-1)
    ids = image_id.tolist()
    unique_ids = sorted(set(ids))
    gallery = torch.stack([img[ids.index(i)] for i in unique_ids])
    t2i = []
    for t in range(txt.shape[0]):
        order = torch.argsort(gallery @ txt[t], descending=True).tolist()
        t2i.append(order.index(unique_ids.index(ids[t])) + 1)
    i2t = []
    for g, i in enumerate(unique_ids):
        order = torch.argsort(txt @ gallery[g], descending=True).tolist()
        i2t.append(min(order.index(t) for t in range(len(ids)) if ids[t] == i) + 1)
    out = {}
    for name, ranks in (("i2t", torch.tensor(i2t)), ("t2i", torch.tensor(t2i))):
        for k in ks:
            out[f"{name}_R@{k}"] = (ranks <= k).double().mean().item()
        out[f"{name}_medr"] = statistics.median(ranks.tolist())
    return out


def assert_matches(got, want):
    for key, value in want.items():
        assert got[key].item() == pytest.approx(value, abs=1e-6), key


def random_split(n_images, captions_per_image, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, dim, generator=g)
    counts = captions_per_image if isinstance(captions_per_image, list) else [captions_per_image] * n_images
    image_id = torch.repeat_interleave(torch.arange(n_images), torch.tensor(counts))
    # Captions sit near their image so ranks spread over 1..N instead of being uniform noise.
    texts = images[image_id] + 4.0 * torch.randn(len(image_id), dim, generator=g)
    perm = torch.randperm(len(image_id), generator=g)
    # Non-contiguous ids exercise the id → gallery-row mapping.
    return images[image_id][perm], texts[perm], (image_id * 7 + 3)[perm]


@pytest.mark.parametrize("captions", [1, 5, "mixed"])
def test_matches_brute_force(captions):
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(1, 5, (40,), generator=g).tolist() if captions == "mixed" else captions
    img, txt, ids = random_split(40, counts)
    got = retrieval_metrics(img, txt, ids)
    assert_matches(got, brute_force(img, txt, ids))
    assert 0 < got["t2i_R@1"] < 1 and got["t2i_medr"] > 1  # the data is not trivially easy


def test_identity_embeddings_are_perfect():
    e = torch.eye(6)
    got = retrieval_metrics(e, e, torch.arange(6))
    assert all(got[f"{d}_R@{k}"] == 1 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert got["i2t_medr"] == 1 and got["t2i_medr"] == 1 and got["rsum"] == 6


def test_constructed_ranks_with_several_captions_and_a_tie():
    images = torch.eye(3)
    # Row t = caption t's score against each image; captions 1 and 3 both describe image 1.
    texts = torch.tensor([[0.5, 0.35, 0.2], [0.4, 0.3, 0.1], [0.3, 0.2, 0.1], [0.1, 0.2, 0.3]])
    owner = torch.tensor([0, 1, 2, 1])
    for chunk in (1, 2, 1024):
        i2t, t2i = retrieval_ranks(images, texts, owner, chunk_size=chunk)
        assert t2i.tolist() == [1, 2, 3, 2]
        # image 1: best caption scores 0.3, beaten by caption 0 (0.35) only -> 2;
        # image 2: caption 2 scores 0.1, tied by caption 1 (ties count against) and beaten by 0, 3 -> 4.
        assert i2t.tolist() == [1, 2, 4]


def test_constructed_metrics():
    # The same geometry through the full path: unit-norm captions via a padding dimension.
    scores = torch.tensor([[0.5, 0.35, 0.2], [0.4, 0.3, 0.1], [0.3, 0.2, 0.15], [0.1, 0.2, 0.3]])
    texts = torch.cat([scores, (1 - scores.pow(2).sum(1, keepdim=True)).sqrt()], 1)
    images = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)
    owner = torch.tensor([0, 1, 2, 1])
    got = retrieval_metrics(images[owner], texts, owner, ks=(1, 2))
    # t2i ranks [1, 2, 3, 2]; i2t ranks [1, 2, 3] (image 2's caption at 0.15 is below 0.2 and 0.3).
    assert got["t2i_R@1"] == pytest.approx(0.25) and got["t2i_R@2"] == pytest.approx(0.75)
    assert got["t2i_medr"] == 2
    assert got["i2t_R@1"] == pytest.approx(1 / 3) and got["i2t_R@2"] == pytest.approx(2 / 3)
    assert got["i2t_medr"] == 2


def test_collapsed_embeddings_get_the_worst_rank():
    got = retrieval_metrics(torch.ones(5, 4), torch.ones(5, 4), torch.arange(5))
    assert got["t2i_R@1"] == 0 and got["t2i_medr"] == 5 and got["i2t_medr"] == 5


def test_chunked_equals_unchunked():
    img, txt, ids = random_split(50, [1, 2, 3, 4, 5] * 10, seed=3)
    full = retrieval_metrics(img, txt, ids, chunk_size=10_000)
    for chunk in (1, 7, 64):
        assert retrieval_metrics(img, txt, ids, chunk_size=chunk) == full


def test_metric_accumulates_batches_in_any_order():
    img, txt, ids = random_split(30, 3, seed=4)
    want = retrieval_metrics(img, txt, ids)
    metric = RetrievalMetrics()
    for part in torch.randperm(len(ids)).split(11):
        metric.update(img[part] * 3.0, txt[part], ids[part].tolist())  # scale: update normalises
    assert metric.compute() == want
    metric.reset()
    metric.update(torch.eye(4), torch.eye(4), torch.arange(4))
    assert metric.compute()["t2i_R@1"] == 1


def test_duplicate_rows_are_counted_once_by_index():
    img, txt, ids = random_split(20, 2, seed=5)
    want = retrieval_metrics(img, txt, ids)
    index = torch.arange(len(ids))
    pad = torch.tensor([0, 1, 2, 3, 5])  # what DistributedSampler repeats to even out ranks
    metric = RetrievalMetrics()
    metric.update(img, txt, ids, index=index)
    metric.update(img[pad], txt[pad], ids[pad], index=index[pad])
    assert metric.compute() == want
    # Without the index the padded rows would be counted twice.
    rows = torch.cat([index, pad])
    doubled = retrieval_metrics(img[rows], txt[rows], ids[rows])
    assert doubled != want


def test_index_must_be_given_always_or_never():
    metric = RetrievalMetrics()
    metric.update(torch.eye(2), torch.eye(2), [0, 1], index=[0, 1])
    metric.update(torch.eye(2), torch.eye(2), [2, 3])
    with pytest.raises(ValueError, match="index"):
        metric.compute()
