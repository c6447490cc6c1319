"""The interface every compute backend implements, and the ledger's bill."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import numpy as np

from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.billing import billed_seconds
from rubberband_airflow.planning.problem import SPOT_SUFFIX, Billing  # noqa: F401 (SPOT_SUFFIX: re-exported)


class Market(StrEnum):
    """How an instance is bought: on demand, or as spot capacity (cheaper, and may be interrupted)."""

    ON_DEMAND = "on-demand"
    SPOT = "spot"




def offer(name: str) -> tuple[str, Market | None]:
    """The instance type and market of a planning problem's instance type name (``g5.xlarge:spot``:
    spot; a plain name: the spec's market)."""
    if name.endswith(SPOT_SUFFIX):
        return name[:-len(SPOT_SUFFIX)], Market.SPOT
    return name, None


def offer_name(entry: Mapping[str, Any]) -> str:
    """The planning problem's name for what a ledger entry's instance is: its type, ``:spot`` added
    for a spot instance."""
    return str(entry["type"]) + (SPOT_SUFFIX if entry.get("market") == Market.SPOT else "")


SUPERSEDED = "superseded.json"  # in an attempt's storage: a later attempt of the run replaces it


class Superseded(RuntimeError):
    """The run was cleared while this attempt ran: a later attempt replaces it, and nothing more is
    launched for this one."""


def refuse_if_superseded(storage: RunStorage) -> None:
    """Raise ``Superseded`` when a later attempt of the run replaces this one (``SUPERSEDED``)."""
    record = storage.read_json(SUPERSEDED)
    if record is not None:
        raise Superseded(f"the run was cleared: attempt {record.get('by_attempt')} replaces this attempt, and "
                         "nothing more is launched for it")


class ComputeBackend(ABC):
    """Launches, describes and terminates the instances of one run, keeping its ledger."""

    storage: RunStorage

    @abstractmethod
    def launch(self, batch: str, count: int, market: Market | None = None) -> list[str]:
        """Start ``count`` instances for ``batch`` (for example "stage-2-batch-0") in ``market``
        (None: the backend's own default); a second call with the same batch returns the
        instances of the first instead of launching again."""

    @abstractmethod
    def describe(self, instances: list[str]) -> dict[str, str]:
        """State of each instance: pending, running or terminated."""

    @abstractmethod
    def terminate(self, instances: list[str]) -> None:
        """Terminate these instances (already terminated ones are fine) and record when."""

    def adopt(self) -> list[str]:
        """Instances of the run the cloud has and the ledger lacks (a launch whose ledger write or
        reply was lost) get their entries; returns them. A backend that cannot lose one finds none."""
        return []

    def live(self) -> list[str]:
        """Instances of the run not yet terminated, oldest request first."""
        return [e["instance"] for e in self.storage.ledger() if e.get("terminated") is None]

    def terminate_all(self) -> list[str]:
        """Terminate every instance the run still has; returns their ids."""
        ids = self.live()
        if ids:
            self.terminate(ids)
        return ids


def entry_price(entry: Mapping[str, Any], prices: Mapping[str, float]) -> float:
    """What a ledger entry's instance costs per hour: the price its entry records, else its offer's
    price in ``prices`` (``offer_name``), else its type's (the on-demand price)."""
    if entry.get("price_per_hour") is not None:
        return float(entry["price_per_hour"])
    name = offer_name(entry)
    return prices[name] if name in prices else prices[entry["type"]]


def billed_cost(ledger: list[dict[str, Any]], prices: dict[str, float], billing: Billing = Billing(),
                now: float | None = None) -> float:
    """The bill of a ledger: each instance from running to termination (or ``now``) at its price
    (``entry_price``), by the planner's rule."""
    priced = [(entry_price(e, prices), e["running"], e["terminated"] if e.get("terminated") is not None else now)
              for e in ledger if e.get("running") is not None]
    priced = [(p, r, t) for p, r, t in priced if t is not None]
    if not priced:
        return 0.0
    price, running, terminated = (np.array(x, dtype=float) for x in zip(*priced))
    seconds = billed_seconds(running, terminated, billing.minimum_seconds, billing.increment_seconds)
    return float((price / 3600.0 * seconds).sum())
