"""Adds up the bad-sample counts that batches carry and enforces a tolerance.

A few unreadable files in a web-scale dataset are normal; a large fraction means a broken mount,
a wrong ``image_root`` or a wrong column, and training on the remainder silently wastes a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class BadDataError(RuntimeError):
    """Too large a fraction of the data could not be used."""


class BadSampleTracker:
    """Counts samples seen and skipped over the batches given to ``update``.

    Args:
        max_reasons: How many skip reasons to keep (the first ones seen).
    """

    def __init__(self, max_reasons: int = 10) -> None:
        self.max_reasons = max_reasons
        self.reset()

    def reset(self) -> None:
        self.seen = 0  # samples attempted: the good ones in batches plus the skipped ones
        self.skipped = 0
        self.reasons: list[str] = []

    def update(self, batch: Mapping[str, Any]) -> None:
        skipped = int(batch.get("num_skipped", 0))
        self.add(seen=len(batch["index"]) + skipped, skipped=skipped, reasons=batch.get("skipped", ()))

    def add(self, seen: int, skipped: int, reasons=()) -> None:
        """Add raw counts (e.g. totals reduced over ranks)."""
        self.seen += seen
        self.skipped += skipped
        room = self.max_reasons - len(self.reasons)
        if room > 0:
            self.reasons.extend(list(reasons)[:room])

    @property
    def fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def check(self, max_bad_fraction: float, min_samples: int = 100, what: str = "samples", whole_split: bool = False) -> None:
        """Raise BadDataError if more than ``max_bad_fraction`` of at least ``min_samples`` seen
        samples were skipped (the minimum avoids failing on a noisy first batch). ``whole_split``:
        the counts cover a whole evaluation split, which also fails when every sample was skipped,
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
