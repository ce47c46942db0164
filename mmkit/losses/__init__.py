from mmkit.losses.adversarial import AdversarialLoss
from mmkit.losses.contrastive import ClipLoss, SigLipLoss
from mmkit.losses.distillation import (
    DistillationLoss,
    FeatureDistillLoss,
    InteractiveContrastiveLoss,
    SimilarityDistillLoss,
)
from mmkit.losses.ewc import EWCPenalty, fisher_sums, normalize_mean, reduce_fisher
from mmkit.losses.memory_queue import MemoryQueue
from mmkit.losses.protocol import LossSum, PairedLoss
from mmkit.losses.ranking import RankingLoss, TripletLoss

__all__ = [
    "AdversarialLoss",
    "ClipLoss",
    "DistillationLoss",
    "EWCPenalty",
    "FeatureDistillLoss",
    "InteractiveContrastiveLoss",
    "LossSum",
    "MemoryQueue",
    "PairedLoss",
    "RankingLoss",
    "SigLipLoss",
    "SimilarityDistillLoss",
    "TripletLoss",
    "fisher_sums",
    "normalize_mean",
    "reduce_fisher",
]
