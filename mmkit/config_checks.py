"""Range checks of numeric settings, run at construction so a bad value fails before training.

Each configurable class declares the valid range of its numeric settings in a class attribute
``setting_ranges`` ({name: Range}) and calls ``check_settings(self, locals(), Cls.setting_ranges)``
at the top of its ``__init__``. A value outside its range raises a ValueError naming the class,
the setting, its valid range and the value given, e.g.
``CLIPPretrain: grad_clip_norm must be > 0 or null (no clipping), got -1``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """The valid values of one numeric setting.

    Args:
        gt, ge, lt, le: bounds (strict or inclusive); None: unbounded on that side.
        integer: the value must be an integer.
        none: None is accepted and means this (shown in the message); None: not accepted.
        also: other accepted values outside the bounds, as (value, meaning) pairs (e.g. -1: keep all).
        length: the setting is a sequence of this many values, each in the range.
        each: the setting is a sequence (of any length) of values, each in the range.
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    integer: bool = False
    none: str | None = None
    also: tuple[tuple[Any, str], ...] = ()
    length: int | None = None
    each: bool = False

    def contains(self, value: Any) -> bool:
        """Whether one scalar value is a finite number (an integer if ``integer``) within the bounds."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return False
        return not (
            (self.gt is not None and not value > self.gt)
            or (self.ge is not None and not value >= self.ge)
            or (self.lt is not None and not value < self.lt)
            or (self.le is not None and not value <= self.le)
        )

    def bounds(self) -> str:
        """The bounds as text: ``> 0``, ``in [0, 1)``, ``<= 1``; empty when unbounded."""
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if low and high:
            return f"in {low[0]}{_fmt(low[1])}, {_fmt(high[0])}{high[1]}"
        if low:
            return (">= " if low[0] == "[" else "> ") + _fmt(low[1])
        if high:
            return ("<= " if high[1] == "]" else "< ") + _fmt(high[0])
        return ""

    def describe(self, value: Any = None) -> str:
        """What the message says the setting must be, worded for the (wrong) ``value`` given."""
        bounds = self.bounds()
        scalar = value
        if self.length is not None or self.each:
            scalar = next((v for v in value if not self.contains(v)), None) if _is_sequence(value) else value
        kind = ""
        if scalar is not None and not self.contains(scalar):
            if isinstance(scalar, bool) or not isinstance(scalar, numbers.Real):
                kind = "an integer" if self.integer else "a number"
            elif self.integer and not isinstance(scalar, numbers.Integral):
                kind = "an integer"
            elif not math.isfinite(scalar):
                kind = "a finite integer" if self.integer else "a finite number"
        if not bounds and not kind:
            kind = "an integer" if self.integer else "a finite number"
        text = " ".join(p for p in (kind, bounds) if p)
        if self.length is not None:
            text = f"{self.length} values each {text}"
        elif self.each:
            text = f"a list of values each {text}"
        for special, meaning in self.also:
            text += f" or {special} ({meaning})"
        if self.none is not None:
            text += f" or null ({self.none})" if self.none else " or null"
        return text

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none is not None
        if any(_same(value, special) for special, _ in self.also):
            return not self.integer or isinstance(value, numbers.Integral)
        if self.length is not None or self.each:
            if not _is_sequence(value) or (self.length is not None and len(value) != self.length):
                return False
            return all(self.contains(v) for v in value)
        return self.contains(value)


def check_range(owner: Any, name: str, value: Any, spec: Range | None = None, **bounds: Any) -> None:
    """Raise ValueError unless ``value`` is in ``spec`` (or ``Range(**bounds)``). ``owner`` is the
    configured object (its class names the message) or a class name."""
    spec = spec if spec is not None else Range(**bounds)
    if not spec.accepts(value):
        who = owner if isinstance(owner, str) else type(owner).__name__
        raise ValueError(f"{who}: {name} must be {spec.describe(value)}, got {_show(value)}")


def check_settings(owner: Any, values: Mapping[str, Any], ranges: Mapping[str, Range]) -> None:
    """``check_range`` for every setting of ``ranges``; ``values`` is typically ``locals()`` at the
    top of ``__init__`` (a name missing from it is a bug in the declaration: KeyError)."""
    for name, spec in ranges.items():
        check_range(owner, name, values[name], spec)


def ranges_of(cls: type) -> dict[str, Range]:
    """The ranges a class checks, its own and its bases' (a subclass's declaration wins)."""
    merged: dict[str, Range] = {}
    for klass in reversed(cls.__mro__):
        merged.update(vars(klass).get("setting_ranges", {}))
    return merged


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _same(value: Any, special: Any) -> bool:
    return type(value) is not bool and isinstance(value, numbers.Real) and value == special


def _fmt(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else format(bound, "g")


def _show(value: Any) -> str:
    if hasattr(value, "item") and not _is_sequence(value):  # numpy / torch scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            pass
    if _is_sequence(value):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)
