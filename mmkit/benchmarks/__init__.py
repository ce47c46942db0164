"""Standard benchmarks: zero-shot classification and image–text retrieval, during training
(``mmkit.callbacks.Benchmarks``) and on any model without training (``mmkit benchmark``)."""

from mmkit.benchmarks.encoding import BenchmarkEncoder
from mmkit.benchmarks.suite import flat_metrics, load_benchmarks, run_benchmarks
from mmkit.benchmarks.tasks import Benchmark, Retrieval, ZeroShotClassification

__all__ = ["Benchmark", "BenchmarkEncoder", "Retrieval", "ZeroShotClassification", "flat_metrics",
           "load_benchmarks", "run_benchmarks"]
