"""Reading JSON-like input with checks: every error is a ProblemError naming the dotted field.

Used by the planning problem, the plan and the tuning spec alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from rubberband_airflow.planning.errors import ProblemError

MISSING: Any = object()  # "no default": the key is required


class Reader:
    """Reads one JSON object, checking keys and types; every error names the dotted field."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ProblemError(path or "problem", f"must be an object, got {kind(data)}")
        self.data = data
        self.path = path
        self.seen: set[str] = set()

    def name(self, key: str) -> str:
        """The dotted name of a key of this object."""
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str, default: Any = MISSING) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is MISSING:
                raise ProblemError(self.name(key), "is required")
            return default
        return self.data[key]

    def integer(self, key: str, default: Any = MISSING, *, minimum: int, maximum: int | None = None,
                nullable: bool = False) -> Any:
        value = self.raw(key, default)
        if value is None and nullable:
            return None
        return integer(value, self.name(key), minimum=minimum, maximum=maximum)

    def number(self, key: str, default: Any = MISSING, *, positive: bool = False,
               at_most: float | None = None) -> float:
        return number(self.raw(key, default), self.name(key), positive=positive, at_most=at_most)

    def string(self, key: str, default: Any = MISSING) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str) or not value.strip():
            raise ProblemError(self.name(key), f"must be a non-empty string, got {kind(value)}")
        return value

    def done(self) -> None:
        """Reject keys that were never read."""
        unknown = sorted(set(map(str, self.data)) - self.seen)
        if unknown:
            raise ProblemError(self.name(unknown[0]), f"unknown key (allowed: {', '.join(sorted(self.seen))})")


def kind(value: Any) -> str:
    """What a value is, for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def describe(value: Any) -> str:
    """``kind``, also for an integer too long to print (Python prints at most 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return kind(value)


def label(key: Any) -> str:
    """A mapping key as it appears in a dotted field name, whatever its type."""
    if isinstance(key, int) and not isinstance(key, bool) and key.bit_length() > 64:
        return f"<integer of {key.bit_length()} bits>"
    return str(key)


def integer(value: Any, name: str, *, minimum: int, maximum: int | None = None) -> int:
    """An integer (not a boolean) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProblemError(name, f"must be an integer, got {describe(value)}")
    if value < minimum:
        raise ProblemError(name, f"must be at least {minimum}, got {describe(value)}")
    if maximum is not None and value > maximum:
        raise ProblemError(name, f"must be at most {maximum}, got {describe(value)}")
    return value


def number(value: Any, name: str, *, positive: bool, at_most: float | None = None) -> float:
    """A finite number (positive, or else not negative), at most ``at_most``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProblemError(name, f"must be a number, got {kind(value)}")
    if isinstance(value, int) and abs(value) > 10**15:
        raise ProblemError(name, f"is too large (more than 1e15), got a {len(str(abs(value)))}-digit number")
    if not math.isfinite(value):
        raise ProblemError(name, f"must be finite, got {value!r}")
    if positive and value <= 0:
        raise ProblemError(name, f"must be positive, got {value!r}")
    if not positive and value < 0:
        raise ProblemError(name, f"must not be negative, got {value!r}")
    if at_most is not None and value > at_most:
        raise ProblemError(name, f"must be at most {at_most:g}, got {value!r}")
    return float(value)


def gpu_count(key: Any, name: str) -> int:
    """A GPU count given as a key: a positive power of two."""
    text = str(key)
    if isinstance(key, bool) or not re.fullmatch(r"[0-9]{1,6}", text):
        raise ProblemError(name, f"GPU count must be a positive integer, got {key!r}")
    g = int(text)
    if g < 1 or g & (g - 1):
        raise ProblemError(name, f"GPU count must be a power of two (1, 2, 4, ...), got {g}")
    return g
