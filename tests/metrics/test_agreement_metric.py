import pytest
import torch
import torch.nn.functional as F

from mmkit.metrics.agreement import TopOneAgreement


def _direct(student, teacher, image_id):
    """Each image's best caption and each caption's best image over all rows, in each model's own space."""
    gallery = [image_id.tolist().index(i) for i in sorted(set(image_id.tolist()))]
    agree = total = 0
    sims = []
    for m in (student, teacher):
        img, txt = F.normalize(m["image_features"][gallery], dim=-1), F.normalize(m["text_features"], dim=-1)
        sims.append(img @ txt.T)  # [G, N]
    s, t = sims
    for g in range(s.shape[0]):
        agree += int(s[g].argmax() == t[g].argmax())
    for n in range(s.shape[1]):
        agree += int(s[:, n].argmax() == t[:, n].argmax())
    total = s.shape[0] + s.shape[1]
    return agree / total


def test_agreement_over_the_split_equals_a_direct_count_however_the_rows_are_batched():
    g = torch.Generator().manual_seed(0)
    n = 10
    student = {"image_features": torch.randn(n, 8, generator=g), "text_features": torch.randn(n, 8, generator=g)}
    teacher = {"image_features": torch.randn(n, 12, generator=g), "text_features": torch.randn(n, 12, generator=g)}
    image_id = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7])  # images 0 and 3 have two captions
    student["image_features"][1] = student["image_features"][0]
    student["image_features"][5] = student["image_features"][4]
    teacher["image_features"][1] = teacher["image_features"][0]
    teacher["image_features"][5] = teacher["image_features"][4]
    expected = _direct(student, teacher, image_id)
    assert 0 < expected < 1  # the check can fail either way
    for batches in ([slice(0, 10)], [slice(0, 6), slice(6, 10)], [slice(0, 3), slice(3, 7), slice(7, 10)]):
        metric = TopOneAgreement()
        for b in batches:
            metric.update({k: v[b] for k, v in student.items()}, {k: v[b] for k, v in teacher.items()},
                          image_id[b], torch.arange(n)[b])
        assert metric.compute().item() == pytest.approx(expected), batches


def test_rows_repeated_as_padding_count_once():
    g = torch.Generator().manual_seed(1)
    feats = {"image_features": torch.randn(6, 8, generator=g), "text_features": torch.randn(6, 8, generator=g)}
    teacher = {"image_features": torch.randn(6, 8, generator=g), "text_features": torch.randn(6, 8, generator=g)}
    once = TopOneAgreement()
    once.update(feats, teacher, torch.arange(6), torch.arange(6))
    padded = TopOneAgreement()
    padded.update(feats, teacher, torch.arange(6), torch.arange(6))
    padded.update({k: v[:2] for k, v in feats.items()}, {k: v[:2] for k, v in teacher.items()}, torch.arange(2), torch.arange(2))
    assert padded.compute().item() == once.compute().item()


def test_a_student_equal_to_its_teacher_agrees_everywhere():
    features = {"image_features": torch.randn(5, 8), "text_features": torch.randn(5, 8)}
    metric = TopOneAgreement()
    metric.update(features, {k: 3 * v for k, v in features.items()}, torch.arange(5))  # the scale does not matter
    assert metric.compute().item() == 1.0
