"""Zero-shot classification: class embeddings from prompt templates, and top-k accuracy.

The text encoder is passed in as a callable so this file knows nothing about models or
tokenizers. Every rank builds the same classifier from the same prompts, so only the accuracy
counters cross processes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from mmkit import distributed as D

Template = str | Callable[[str], str]


def zero_shot_class_names(given: Sequence[str] | None, data_names: Sequence[str] | None, where: str) -> list[str]:
    """The class names of the zero-shot classifier's rows, in label order (row i scores label i).

    ``given`` (the ``zero_shot_classes`` setting): None takes the data's own names (a source's
    ``class_names``: string labels, an HF ``ClassLabel``, a shard set's class list); ``[]`` turns
    zero-shot off. A given list is matched to the data's names by name, so the order in which it
    is typed cannot pair a name with another class's label; names the data lacks, or data classes
    the list lacks, are an error naming both. Data without class names: the list as given.
    """
    if given is not None and len(given) == 0:
        return []
    if data_names is None:
        return list(given or [])
    if given is None:
        return list(data_names)
    cleaned = [str(name).strip() for name in given]
    if set(cleaned) != set(data_names) or len(cleaned) != len(data_names):
        unknown = [n for n in cleaned if n not in data_names]
        missing = [n for n in data_names if n not in cleaned]
        raise ValueError(
            f"zero_shot_classes {cleaned} do not match the class names of the {where} "
            f"({list(data_names)}, in label order): not in the data {unknown}, missing {missing}; "
            "leave zero_shot_classes out to use the data's names"
        )
    return list(data_names)  # the data's label order, whatever order the list was typed in


@torch.no_grad()
def build_zeroshot_classifier(
    class_names: Sequence[str],
    templates: Sequence[Template],
    encode_text: Callable[[list[str]], Tensor],
) -> Tensor:
    """(C, D) L2-normalised class embeddings: the renormalised mean of each class's prompt embeddings.

    Args:
        class_names: one name per class, in label order.
        templates: prompt templates, either format strings with one ``{}`` ("a photo of a {}.")
            or callables mapping a class name to a prompt.
        encode_text: maps a list of strings to a (len, D) tensor of text embeddings.
    """
    if not class_names or not templates:
        raise ValueError("need at least one class name and one template")
    rows = []
    for name in class_names:
        prompts = [t(name) if callable(t) else t.format(name) for t in templates]
        # Normalise each prompt first so no single prompt dominates the class direction.
        emb = F.normalize(encode_text(prompts).float(), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


class ZeroShotAccuracy(Metric):
    """Top-k accuracy of classifying image embeddings by their most similar class embedding.

    Rows labelled ``-1`` (no class) are skipped. Under DDP every rank gets the accuracy over the
    whole split. Keys: ``top{k}`` for each k in ``top_k`` with k ≤ number of classes (so top-5
    only with at least 5 classes); the caller adds its prefix (e.g. ``val/zeroshot_top1``).

    Args:
        top_k: the k of top-k accuracy.
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, top_k: Sequence[int] = (1, 5), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.top_k = tuple(top_k)
        self.add_state("correct", default=torch.zeros(len(self.top_k)), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("num_classes", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="max")

    def update(self, image_features: Tensor, labels: Tensor, classifier: Tensor) -> None:
        """Add (B, D) image embeddings with (B,) labels, scored against a (C, D) classifier."""
        num_classes = classifier.shape[0]
        labels = labels.reshape(-1).to(image_features.device)
        keep = labels != -1
        labels = labels[keep].long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"labels must be -1 or in [0, {num_classes}) for {num_classes} class names (zero_shot_classes), "
                f"got labels {int(labels.min())}..{int(labels.max())}"
            )
        # Normalising the images cannot change any image's class ranking, so it is skipped.
        logits = image_features[keep].float() @ classifier.float().to(image_features.device).T
        top = logits.topk(min(max(self.top_k), num_classes), dim=1).indices
        hits = top == labels[:, None]
        self.correct += torch.stack([hits[:, :k].any(1).sum() for k in self.top_k]).float()
        self.total += labels.numel()
        self.num_classes = torch.maximum(self.num_classes, torch.tensor(num_classes, device=self.device))

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        # Through mmkit.distributed, the project's one door to torch.distributed.
        if process_group is not None:
            raise NotImplementedError("ZeroShotAccuracy reduces over the default process group only")
        self.correct = D.all_reduce_sum(self.correct)
        self.total = D.all_reduce_sum(self.total)
        num_classes = max(D.gather_sizes(int(self.num_classes), self.device))
        self.num_classes = torch.tensor(num_classes, device=self.device)

    def compute(self) -> dict[str, Tensor]:
        acc = self.correct / self.total  # nan when no labelled rows were seen
        return {f"top{k}": acc[i] for i, k in enumerate(self.top_k) if k <= int(self.num_classes)}
