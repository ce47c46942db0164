"""Evaluation metrics: retrieval Recall@K, zero-shot accuracy, modality gap."""

from mmkit.metrics.continual import ContinualMatrix, continual_summary
from mmkit.metrics.modality_gap import ModalityGap, modality_gap
from mmkit.metrics.retrieval import RetrievalMetrics, retrieval_metrics, retrieval_ranks
from mmkit.metrics.zeroshot import ZeroShotAccuracy, build_zeroshot_classifier

__all__ = [
    "ContinualMatrix",
    "continual_summary",
    "ModalityGap",
    "RetrievalMetrics",
    "ZeroShotAccuracy",
    "build_zeroshot_classifier",
    "modality_gap",
    "retrieval_metrics",
    "retrieval_ranks",
]
