"""The allocation plan of docs/planning-model.md section 3: model and validation against a problem."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.problem import MARKETS, Problem
from rubberband_airflow.planning.validation import kind, number


@dataclass(frozen=True)
class StageAllocation:
    gpus_per_trial: int
    instances: int
    launch_after: float | None = None  # pre-warming: added instances requested this long after the last T
    market: str | None = None  # the market its added instances are bought in; None: the plan's type's
    release: str | None = None  # a market whose live instances it terminates at its start (the other one)


@dataclass(frozen=True)
class Plan:
    instance_type: str
    stages: tuple[StageAllocation, ...]

    @classmethod
    def of(cls, instance_type: str, stages: list[tuple[int, int]]) -> Plan:
        """Build from (gpus_per_trial, instances) pairs."""
        return cls(instance_type, tuple(StageAllocation(int(g), int(c)) for g, c in stages))

    def to_dict(self, problem: Problem | None = None) -> dict[str, Any]:
        """Plain JSON; with the problem, each stage also says its trials and epochs, and its market
        where the plan buys spot capacity in any stage (without it: where the stage names one)."""
        own = problem.instance_type(self.instance_type).market if problem is not None else None
        every = own is not None and any((s.market or own) == "spot" for s in self.stages)
        stages = []
        for i, s in enumerate(self.stages, start=1):
            entry: dict[str, Any] = {"gpus_per_trial": s.gpus_per_trial, "instances": s.instances}
            if s.launch_after is not None:
                entry["launch_after_seconds"] = s.launch_after
            if problem is not None:
                entry["trials"] = problem.sha.trials(i)
                entry["epochs"] = problem.sha.epochs(i)
            if every or s.market is not None:
                entry["market"] = s.market or own
            if s.release is not None:
                entry["release"] = s.release
            stages.append(entry)
        return {"instance_type": self.instance_type, "stages": stages}

    def markets(self, problem: Problem) -> tuple[str, ...]:
        """Each stage's market: its own, or the plan's type's."""
        own = problem.instance_type(self.instance_type).market
        return tuple(s.market or own for s in self.stages)


def parse_plan(data: Any, problem: Problem) -> Plan:
    """Build a Plan from its JSON form and check it fits the problem; errors name the field."""
    if not isinstance(data, Mapping):
        raise ProblemError("plan", f"must be an object, got {kind(data)}")
    if "instance_type" not in data:
        raise ProblemError("plan.instance_type", "is required")
    name = data["instance_type"]
    if not isinstance(name, str):
        raise ProblemError("plan.instance_type", f"must be a string, got {kind(name)}")
    itype = next((t for t in problem.instance_types if t.name == name), None)
    if itype is None:
        raise ProblemError("plan.instance_type", f"{name!r} is not an instance type of the problem "
                           f"({', '.join(t.name for t in problem.instance_types)})")
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list):
        raise ProblemError("plan.stages", f"must be a list, got {kind(raw_stages)}" if "stages" in data
                           else "is required")
    if len(raw_stages) != problem.num_stages:
        raise ProblemError("plan.stages", f"must have one entry per stage ({problem.num_stages}), "
                           f"got {len(raw_stages)}")
    allowed = problem.gpu_options(itype)
    stages = []
    for i, raw in enumerate(raw_stages):
        where = f"plan.stages[{i}]"
        if not isinstance(raw, Mapping):
            raise ProblemError(where, f"must be an object, got {kind(raw)}")
        for key in ("gpus_per_trial", "instances"):
            value = raw.get(key)
            if key not in raw:
                raise ProblemError(f"{where}.{key}", "is required")
            if isinstance(value, bool) or not isinstance(value, int):
                raise ProblemError(f"{where}.{key}", f"must be an integer, got {kind(value)}")
        g, c = raw["gpus_per_trial"], raw["instances"]
        if g not in allowed:
            raise ProblemError(f"{where}.gpus_per_trial", f"must be a profiled GPU count that fits on one "
                               f"{name} ({', '.join(map(str, allowed))}), got {g}")
        if not 1 <= c <= itype.max_instances:
            raise ProblemError(f"{where}.instances", f"must be between 1 and max_instances "
                               f"({itype.max_instances}) of {name}, got {c}")
        launch_after = None
        if "launch_after_seconds" in raw:
            launch_after = number(raw["launch_after_seconds"], f"{where}.launch_after_seconds", positive=False)
            if i == 0:
                raise ProblemError(f"{where}.launch_after_seconds", "the first stage has no earlier stage "
                                   "to launch its instances during")
        market = None
        if "market" in raw:
            value = raw["market"]
            if value not in MARKETS:
                raise ProblemError(f"{where}.market", f"must be 'spot' or 'on-demand', got {kind(value)}")
            # A market the problem does not offer the type in is the executor's alone (its instances
            # are modelled as the plan's type's: an on-demand fallback, a plan that says spot).
            twin = problem.twin(itype)
            market = twin.market if twin is not None and value == twin.market else None
        release = None
        if "release" in raw:
            release = raw["release"]
            if release not in MARKETS:
                raise ProblemError(f"{where}.release", f"must be 'spot' or 'on-demand', got {kind(release)}")
            if release == (market or itype.market):
                raise ProblemError(f"{where}.release", f"the stage buys its instances {release}: it can only "
                                   f"release the other market's")
            if launch_after is not None:
                raise ProblemError(f"{where}.release", "a stage that releases a market's instances is not "
                                   "pre-warmed: leave out launch_after_seconds")
        stages.append(StageAllocation(g, c, launch_after, market, release))
    return Plan(name, tuple(stages))
