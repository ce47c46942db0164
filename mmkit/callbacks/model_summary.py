"""Lightning's model summary without the FLOPs it did not count.

Lightning counts FLOPs only for a module with an ``example_input_array``; mmkit's modules have
none (the input shapes come from the data), so its summary said "Total Flops: 0". This summary
leaves out the FLOPs column and that line when nothing was counted; the FLOPs of a training step
are counted by ``Throughput`` at the first batch (``train/tflops``, ``train/mfu``).
"""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary


class _DropLines(logging.Filter):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if self.marker in text:
            record.msg = "\n".join(line for line in text.split("\n") if self.marker not in line)
            record.args = ()
        return True


class ModelSummary(LightningModelSummary):
    """Lightning's text ``ModelSummary`` (same arguments); without a FLOPs count when it is zero."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        if total_flops:
            LightningModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                            total_training_modes, total_flops, **summarize_kwargs)
            return
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        # Lightning writes the table, its "Total Flops" line included, as one log record.
        logger = logging.getLogger(LightningModelSummary.__module__)
        drop = _DropLines("Total Flops")
        logger.addFilter(drop)
        try:
            LightningModelSummary.summarize(columns, total_parameters, trainable_parameters, model_size,
                                            total_training_modes, total_flops, **summarize_kwargs)
        finally:
            logger.removeFilter(drop)
