"""Adds up the bad-sample counts that batches carry and enforces a tolerance.

A few unreadable files in a web-scale dataset are normal; a large fraction means a broken mount,
a wrong ``image_root`` or a wrong column, and training on the remainder silently wastes a run.

Counts are of distinct rows (by the ``index`` a sample carries), not of visits: a loader meets a
row again in every epoch, when it pads ranks to equal sizes and after a resume, and "6 of 192
samples skipped" for a 160-row file would misreport both numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


class BadDataError(RuntimeError):
    """Too large a fraction of the data could not be used."""


class RowSet:
    """A set of row indices, kept as bitmaps of 4096 rows: one bit per row met (a 400-million-row
    dataset costs 50 MB, where a Python set would take tens of GB), sparse index ranges (shard
    number × stride + position) cost only the blocks they touch."""

    _SHIFT = 12
    _MASK = (1 << _SHIFT) - 1

    def __init__(self) -> None:
        self._blocks: dict[int, np.ndarray] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, indices: Iterable[int] | np.ndarray) -> None:
        idx = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
        if not idx.size:
            return
        blocks, offsets = idx >> self._SHIFT, idx & self._MASK
        starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
        for block, part in zip(blocks[starts].tolist(), np.split(offsets, starts[1:])):
            bits = self._blocks.get(block)
            if bits is None:
                bits = self._blocks[block] = np.zeros((self._MASK + 1) // 8, dtype=np.uint8)
            byte, mask = part >> 3, (1 << (part & 7)).astype(np.uint8)
            self._count += int(np.count_nonzero((bits[byte] & mask) == 0))  # indices are unique: no double count
            np.bitwise_or.at(bits, byte, mask)

    def indices(self) -> np.ndarray:
        """The members, sorted."""
        parts = [np.flatnonzero(np.unpackbits(bits, bitorder="little")) + (block << self._SHIFT)
                 for block, bits in sorted(self._blocks.items())]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


class BadSampleTracker:
    """Counts the distinct rows met and skipped over the batches given to ``update``.

    A skipped sample whose source gave no index (``BadSample.index`` None) cannot be recognised
    when met again: each such visit counts as a row of its own.

    Args:
        max_reasons: How many skip reasons to keep (the first ones seen).
    """

    def __init__(self, max_reasons: int = 10) -> None:
        self.max_reasons = max_reasons
        self.reset()

    def reset(self) -> None:
        self.rows = RowSet()  # every row met: the good ones in batches and the skipped ones
        self.bad_rows = RowSet()
        self.unindexed = 0  # skipped samples without an index
        self.reasons: list[str] = []
        # Batches' index tensors not yet added: read when a count is wanted, so that a tensor
        # already on the GPU costs one device-to-host copy per check, not a sync per step.
        self._pending: list[Any] = []

    @property
    def seen(self) -> int:
        """Distinct rows met."""
        self._add_pending()
        return len(self.rows) + self.unindexed

    @property
    def skipped(self) -> int:
        """Distinct rows skipped."""
        return len(self.bad_rows) + self.unindexed

    def update(self, batch: Mapping[str, Any], offset: int = 0) -> None:
        """Add a collated batch; ``offset`` is added to its row indices (sources that each start at
        0, e.g. the tasks of a task stream, stay distinct)."""
        if "skipped_index" in batch:
            skipped = list(batch["skipped_index"])
        else:  # a collate function of another kind: counts only
            skipped = [None] * int(batch.get("num_skipped", 0))
        bad = [i + offset for i in skipped if i is not None]
        self._pending.append(batch["index"] + offset if offset else batch["index"])
        if len(self._pending) >= 64:  # a long evaluation pass: do not hold on to every batch's tensor
            self._add_pending()
        self.add(rows=bad, bad_rows=bad, unindexed=len(skipped) - len(bad), reasons=batch.get("skipped", ()))

    def _add_pending(self) -> None:
        if not self._pending:
            return
        parts = [p.detach().reshape(-1).cpu().numpy() if hasattr(p, "detach") else np.asarray(p).reshape(-1)
                 for p in self._pending]
        self._pending = []
        self.rows.add(np.concatenate(parts) if parts else [])

    def add(self, rows: Iterable[int], bad_rows: Iterable[int], unindexed: int = 0, reasons: Iterable[str] = ()) -> None:
        """Add rows met (good and bad), rows skipped (a subset of ``rows``), skipped samples without
        an index, and reasons; e.g. what another rank met (``export``)."""
        self.rows.add(np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64))
        self.bad_rows.add(np.asarray(list(bad_rows) if not isinstance(bad_rows, np.ndarray) else bad_rows, dtype=np.int64))
        self.unindexed += int(unindexed)
        room = self.max_reasons - len(self.reasons)
        if room > 0:
            self.reasons.extend(list(reasons)[:room])

    def export(self) -> dict[str, Any]:
        """What ``add`` takes, to send to other ranks (indices as compact arrays)."""
        self._add_pending()
        return {"rows": self.rows.indices(), "bad_rows": self.bad_rows.indices(), "unindexed": self.unindexed,
                "reasons": list(self.reasons)}

    @property
    def fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def summary(self, when: str = "") -> str:
        """E.g. "6 of 160 rows skipped (3.75%)", or with ``when="so far"`` "... skipped so far (3.75%)"."""
        return f"{self.skipped} of {self.seen} rows skipped {when + ' ' if when else ''}({self.fraction:.2%})"

    def check(self, max_bad_fraction: float, min_samples: int = 100, what: str = "rows", whole_split: bool = False) -> None:
        """Raise BadDataError if more than ``max_bad_fraction`` of at least ``min_samples`` rows
        met were skipped (the minimum avoids failing on a noisy first batch). ``whole_split``:
        the counts cover a whole evaluation split, which also fails when every row was skipped,
        however few (its metrics would come from nothing)."""
        everything = whole_split and self.seen > 0 and self.skipped == self.seen
        if not everything and (self.seen < min_samples or self.fraction <= max_bad_fraction):
            return
        first = "\n  ".join(self.reasons) or "(no reasons recorded)"
        raise BadDataError(
            f"{self.fraction:.1%} of {what} were skipped as bad data, above the limit of {max_bad_fraction:.1%} "
            f"({self.skipped} of {self.seen} {what}). First reasons:\n  {first}\n"
            "Fix the data or paths, or raise max_bad_fraction."
        )
