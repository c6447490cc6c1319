"""Trial results: their states, the run's optimisation mode, and ranking trials by the metric.

One ranking serves promotion, the best trial of a run and the report: finished trials with a
finite metric, best first, ties broken by trial id.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class Mode(StrEnum):
    """Whether the metric is maximised or minimised."""

    MAX = "max"
    MIN = "min"


class TrialState(StrEnum):
    """A trial's outcome in a stage, as written to ``trials/<trial>/stage-<i>.json``."""

    DONE = "done"
    FAILED = "failed"


def trial_id(index: int) -> str:
    """The id of the trial with this index: ``trial-0007``."""
    return f"trial-{index:04d}"


def is_done(result: Mapping[str, Any] | None) -> bool:
    """True for a finished trial with a finite numeric metric."""
    if not result or result.get("state") != TrialState.DONE:
        return False
    metric = result.get("metric")
    return isinstance(metric, (int, float)) and not isinstance(metric, bool) and math.isfinite(metric)


def ranked(results: Mapping[str, Mapping[str, Any] | None], mode: Mode | str) -> list[str]:
    """The trials that finished, best metric first (ties: lower trial id first)."""
    sign = -1.0 if Mode(mode) is Mode.MAX else 1.0
    done = [(sign * float(r["metric"]), t) for t, r in results.items() if r is not None and is_done(r)]
    return [t for _, t in sorted(done)]


def best_trial(results: Mapping[str, Mapping[str, Any] | None], mode: Mode | str) -> str | None:
    """The best trial that finished, or None when none did."""
    order = ranked(results, mode)
    return order[0] if order else None
