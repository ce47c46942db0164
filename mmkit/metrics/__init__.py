"""Evaluation metrics: retrieval Recall@K, zero-shot accuracy, classification scores, modality gap,
teacher agreement."""

from mmkit.metrics.agreement import TopOneAgreement
from mmkit.metrics.classification import classification_scores
from mmkit.metrics.continual import ContinualMatrix, continual_summary
from mmkit.metrics.modality_gap import ModalityGap, modality_gap
from mmkit.metrics.retrieval import RetrievalMetrics, retrieval_metrics, retrieval_ranks
from mmkit.metrics.zeroshot import ZeroShotAccuracy, build_zeroshot_classifier

__all__ = [
    "ContinualMatrix",
    "ModalityGap",
    "RetrievalMetrics",
    "TopOneAgreement",
    "ZeroShotAccuracy",
    "build_zeroshot_classifier",
    "classification_scores",
    "continual_summary",
    "modality_gap",
    "retrieval_metrics",
    "retrieval_ranks",
]
