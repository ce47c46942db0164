"""The one check every tabular source runs: the configured columns exist.

A typo in a column name is the most common config mistake; failing at construction with the
columns that do exist turns a confusing KeyError deep inside a worker into a one-line fix.
"""

from __future__ import annotations

from collections.abc import Iterable


def require_columns(where: str, present: Iterable[str], **wanted: str | None) -> None:
    """Raise ValueError if any wanted column (given as role=name, None = not used) is missing."""
    present = list(present)
    for role, name in wanted.items():
        if name is not None and name not in present:
            raise ValueError(
                f"{where}: {role} {name!r} not found; columns present: {', '.join(map(repr, present)) or '(none)'}"
            )
