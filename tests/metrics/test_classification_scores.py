"""classification_scores: top-k, mean per-class recall, and which k are reported."""

import pytest
import torch

from mmkit.metrics import classification_scores


def test_scores_by_hand():
    # 6 classes; labels 0,0,0,1,2 (classes 3-5 have no samples)
    logits = torch.tensor([
        [9, 1, 0, 0, 0, 0],  # class 0: right
        [1, 9, 0, 0, 0, 0],  # class 0: wrong (1st is 1), 0 is 2nd
        [0, 1, 2, 3, 4, 5],  # class 0: wrong, 0 is last (6th)
        [0, 9, 0, 0, 0, 0],  # class 1: right
        [9, 8, 7, 6, 5, 4],  # class 2: wrong, 2 is 3rd
    ], dtype=torch.float)
    labels = torch.tensor([0, 0, 0, 1, 2])
    got = classification_scores(logits, labels)
    assert got["top1"].item() == pytest.approx(2 / 5)
    assert got["top5"].item() == pytest.approx(4 / 5)
    # class 0: 1/3, class 1: 1, class 2: 0 -> mean over the 3 classes with samples
    assert got["mean_per_class_recall"].item() == pytest.approx((1 / 3 + 1 + 0) / 3)


def test_top_k_over_k_or_fewer_classes_is_left_out_and_bad_labels_are_named():
    logits = torch.randn(4, 5)
    assert set(classification_scores(logits, torch.tensor([0, 1, 2, 4]))) == {"top1", "mean_per_class_recall"}
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\), got 0..7"):
        classification_scores(logits, torch.tensor([0, 1, 2, 7]))
