"""A run in flight at a stage barrier, as a re-plan starts from it (docs/planning-model.md section 7)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LiveInstance:
    """An instance live at the barrier; times are seconds from the run's start."""

    instance_type: str
    running_at_seconds: float  # when it started to bill (expected, if it is still pending)
    ready_at_seconds: float  # when it can take trials (expected, if it is still pending or booting)


@dataclass(frozen=True)
class Start:
    """The barrier after the ``done`` stages of the problem's SHA: when it is, what runs, what was spent."""

    elapsed_seconds: float  # E_done, the end of the last stage run
    spent_usd: float  # cost of what is over: terminated instances, data moved so far
    live: tuple[LiveInstance, ...]  # in request order, oldest first
    buy: tuple[str, ...] | None = None  # the markets new instances may be bought in; None: any
