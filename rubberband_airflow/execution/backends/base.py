"""The interface every compute backend implements, and the ledger's bill."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

from rubberband_airflow.execution.storage import RunStorage


class ComputeBackend(ABC):
    """Launches, describes and terminates the instances of one run, keeping its ledger."""

    storage: RunStorage

    @abstractmethod
    def launch(self, batch: str, count: int) -> list[str]:
        """Start ``count`` instances for ``batch`` (for example "stage-2-batch-0"); a second call
        with the same batch returns the instances of the first instead of launching again."""

    @abstractmethod
    def describe(self, instances: list[str]) -> dict[str, str]:
        """State of each instance: pending, running or terminated."""

    @abstractmethod
    def terminate(self, instances: list[str]) -> None:
        """Terminate these instances (already terminated ones are fine) and record when."""

    def live(self) -> list[str]:
        """Instances of the run not yet terminated, oldest request first."""
        return [e["instance"] for e in self.storage.ledger() if e.get("terminated") is None]

    def terminate_all(self) -> list[str]:
        """Terminate every instance the run still has; returns their ids."""
        ids = self.live()
        if ids:
            self.terminate(ids)
        return ids


def billed_cost(ledger: list[dict[str, Any]], prices: dict[str, float], minimum_seconds: float = 60.0,
                increment_seconds: float = 1.0, now: float | None = None) -> float:
    """The bill of a ledger: each instance from running to termination (or ``now``), rounded up."""
    total = 0.0
    for e in ledger:
        running = e.get("running")
        end = e.get("terminated") if e.get("terminated") is not None else now
        if running is None or end is None or end <= running:
            continue
        seconds = max(minimum_seconds, math.ceil((end - running) / increment_seconds) * increment_seconds)
        total += prices[e["type"]] / 3600.0 * seconds
    return total
