import math

import pytest
import torch

from mmkit.metrics.zeroshot import ZeroShotAccuracy, build_zeroshot_classifier

CLASSES = ["cat", "dog", "car", "tree", "boat", "sky"]


def fake_encoder(scale_second_template=1.0):
    """Prompt → 2·e_class + e_template in 8 dims (classes on 0..5, templates on 6, 7)."""

    def encode_text(prompts):
        rows = []
        for p in prompts:
            v = torch.zeros(8)
            v[next(i for i, c in enumerate(CLASSES) if c in p)] = 2.0
            second = p.startswith("a drawing")
            v[7 if second else 6] = 1.0
            rows.append(v * (scale_second_template if second else 1.0))
        return torch.stack(rows)

    return encode_text


def test_classifier_is_mean_of_normalised_prompt_embeddings():
    templates = ["a photo of a {}.", "a drawing of a {}."]
    got = build_zeroshot_classifier(CLASSES, templates, fake_encoder())
    want = torch.zeros(6, 8)
    want[torch.arange(6), torch.arange(6)] = 2.0
    want[:, 6:] = 0.5
    want /= math.sqrt(4.5)
    torch.testing.assert_close(got, want)
    # Each prompt is normalised before averaging, so a template's raw scale does not matter.
    scaled = build_zeroshot_classifier(CLASSES, templates, fake_encoder(scale_second_template=10.0))
    torch.testing.assert_close(scaled, want)
    # Callable templates are accepted too.
    mixed = [lambda c: f"a photo of a {c}.", "a drawing of a {}."]
    lam = build_zeroshot_classifier(CLASSES, mixed, fake_encoder())
    torch.testing.assert_close(lam, want)


def test_accuracy_on_known_scores():
    classifier = torch.eye(6)  # image features below are then directly the class scores
    images = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 1: rank 2, top-5 hit only
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: rank 6, miss
            [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # label -1: skipped
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],  # label 3: top-1 hit
        ]
    )
    labels = torch.tensor([0, 1, 5, -1, 3])
    metric = ZeroShotAccuracy()
    metric.update(images[:2], labels[:2], classifier)
    metric.update(images[2:], labels[2:], classifier)
    got = metric.compute()
    assert got["top1"].item() == pytest.approx(0.5)
    assert got["top5"].item() == pytest.approx(0.75)


def test_top5_only_with_at_least_five_classes():
    metric = ZeroShotAccuracy()
    metric.update(torch.eye(3), torch.tensor([0, 1, 2]), torch.eye(3))
    assert metric.compute() == {"top1": torch.tensor(1.0)}


def test_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="labels"):
        ZeroShotAccuracy().update(torch.eye(3), torch.tensor([0, 1, 3]), torch.eye(3))


def test_zero_shot_class_names_follow_the_data_whatever_order_they_are_typed_in():
    from mmkit.metrics.zeroshot import zero_shot_class_names

    data = ["cat", "dog", "emu"]
    assert zero_shot_class_names(None, data, "val data") == data  # default: the data's own names
    assert zero_shot_class_names(["emu", "cat", " dog"], data, "val data") == data  # label order, not typed order
    assert zero_shot_class_names([], data, "val data") == []  # off
    assert zero_shot_class_names(["b", "a"], None, "val data") == ["b", "a"]  # integer labels: as given
    assert zero_shot_class_names(None, None, "val data") == []
    with pytest.raises(ValueError, match=r"not in the data \['cow'\], missing \['dog', 'emu'\]"):
        zero_shot_class_names(["cat", "cow"], data, "val data")
