"""Two real processes (gloo on localhost) with uneven shards must reproduce one process on all rows."""

import os

import pytest
import torch
from dist_utils import run_on_processes

from mmkit.metrics import ModalityGap, RetrievalMetrics, ZeroShotAccuracy, modality_gap, retrieval_metrics

pytestmark = pytest.mark.slow


def make_data():
    g = torch.Generator().manual_seed(0)
    n_images, captions = 6, 2
    image_id = torch.arange(n_images).repeat_interleave(captions)
    images = torch.randn(n_images, 8, generator=g)[image_id]
    texts = images + 2.0 * torch.randn(len(image_id), 8, generator=g)
    # Shuffle so an image's captions land on different ranks; rank 0 gets 7 rows, rank 1 gets 5.
    perm = torch.randperm(len(image_id), generator=g)
    labels = torch.tensor([0, 1, 2, -1, 4, 5, 3, 2, -1, 1, 0, 4])
    return images[perm], texts[perm], image_id[perm], labels, torch.randn(6, 8, generator=g)


SHARDS = [slice(0, 7), slice(7, 12)]


def worker(rank, world, out_dir):
    img, txt, ids, labels, classifier = make_data()
    mine = SHARDS[rank]
    index = torch.arange(len(ids))
    results = {}

    uneven = RetrievalMetrics()
    uneven.update(img[mine], txt[mine], ids[mine])
    results["uneven"] = uneven.compute()

    # DistributedSampler-style padding: rank 1 repeats two of rank 0's rows to reach 7.
    padded = RetrievalMetrics()
    rows = torch.arange(12)[mine] if rank == 0 else torch.cat([torch.arange(7, 12), torch.tensor([0, 1])])
    padded.update(img[rows], txt[rows], ids[rows], index=index[rows])
    results["padded"] = padded.compute()

    # A rank that saw nothing still joins the gather.
    lopsided = RetrievalMetrics()
    if rank == 0:
        lopsided.update(img, txt, ids)
    results["lopsided"] = lopsided.compute()

    zs = ZeroShotAccuracy()
    zs.update(img[mine], labels[mine], classifier)
    results["zeroshot"] = zs.compute()

    gap = ModalityGap()
    if rank == 1:
        gap.update(img, txt)
    results["gap"] = gap.compute()
    # compute() must leave the local state local, so accumulation can continue.
    results["local_rows"] = sum(len(x) for x in uneven.image_features)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_processes_match_one(tmp_path):
    run_on_processes(worker, 2, str(tmp_path))

    img, txt, ids, labels, classifier = make_data()
    want_retrieval = retrieval_metrics(img, txt, ids)
    ref_zs = ZeroShotAccuracy()
    ref_zs.update(img, labels, classifier)
    want_zs = ref_zs.compute()
    want_gap = modality_gap(img, txt)

    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for case in ("uneven", "padded", "lopsided"):
            assert got[case].keys() == want_retrieval.keys()
            for key, value in want_retrieval.items():
                assert got[case][key].item() == pytest.approx(value.item()), (rank, case, key)
        assert got["zeroshot"].keys() == want_zs.keys()
        for key, value in want_zs.items():
            assert got["zeroshot"][key].item() == pytest.approx(value.item())
        assert got["gap"].item() == pytest.approx(want_gap.item(), abs=1e-6)
        assert got["local_rows"] == (7 if rank == 0 else 5)
    # The reference itself must not be trivial, or the comparison proves little.
    assert 0 < want_retrieval["t2i_R@1"] < 1
