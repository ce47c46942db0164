"""Logging values that are already the same on every rank."""

from __future__ import annotations

import re
import warnings
from typing import Any, Mapping

import lightning as L
from lightning.pytorch.utilities.warnings import PossibleUserWarning


def log_gathered(module: L.LightningModule, values: Mapping[str, Any], **kwargs: Any) -> None:
    """``module.log_dict(values, sync_dist=False, ...)`` for values computed over every rank's data
    (retrieval scores over the gathered split, summed counts): identical on every rank, so a
    ``sync_dist`` reduction would only cost a collective. Lightning still advises ``sync_dist=True``
    for each such epoch-level name under DDP; that advice is silenced for these names only."""
    for name in values:
        warnings.filterwarnings(
            "ignore", message=re.escape(f"It is recommended to use `self.log({name!r}, ..., sync_dist=True)`"),
            category=PossibleUserWarning)
    module.log_dict(dict(values), sync_dist=False, **kwargs)
