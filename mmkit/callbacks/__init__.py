"""Lightning callbacks: throughput, progress lines and bar, the end-of-run report, embedding export,
bad-sample tracking, standard benchmarks."""

from mmkit.callbacks.bad_samples import BadSampleCallback
from mmkit.callbacks.benchmarks import Benchmarks
from mmkit.callbacks.checkpointing import Preempted, StepCheckpoint
from mmkit.callbacks.embedding_writer import EmbeddingWriter
from mmkit.callbacks.model_summary import ModelSummary
from mmkit.callbacks.progress_bar import StepRichProgressBar, StepTQDMProgressBar
from mmkit.callbacks.progress_log import ProgressLog
from mmkit.callbacks.report import RunReport, write_report
from mmkit.callbacks.resume_state import ResumeState
from mmkit.callbacks.throughput import Throughput

__all__ = ["BadSampleCallback", "Benchmarks", "EmbeddingWriter", "ModelSummary", "RunReport", "Throughput", "write_report",
           "Preempted", "ProgressLog", "ResumeState", "StepCheckpoint", "StepRichProgressBar", "StepTQDMProgressBar"]
