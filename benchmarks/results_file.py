"""Writing one benchmark's section of benchmarks/RESULTS.md, shared by every benchmark script."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the section that starts with ``heading`` (up to the next ``## ``) or append it;
    other sections are kept as they are."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    path.write_text(text)
