"""The allocation plan of docs/planning-model.md section 3: model and validation against a problem."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.problem import Problem
from rubberband_airflow.planning.validation import kind, number


@dataclass(frozen=True)
class StageAllocation:
    gpus_per_trial: int
    instances: int
    launch_after: float | None = None  # pre-warming: added instances requested this long after the last T


@dataclass(frozen=True)
class Plan:
    instance_type: str
    stages: tuple[StageAllocation, ...]

    @classmethod
    def of(cls, instance_type: str, stages: list[tuple[int, int]]) -> Plan:
        """Build from (gpus_per_trial, instances) pairs."""
        return cls(instance_type, tuple(StageAllocation(int(g), int(c)) for g, c in stages))

    def to_dict(self, problem: Problem | None = None) -> dict[str, Any]:
        """Plain JSON; with the problem, each stage also says its trials and epochs (and its market,
        on a spot instance type)."""
        spot = problem is not None and problem.instance_type(self.instance_type).market == "spot"
        stages = []
        for i, s in enumerate(self.stages, start=1):
            entry: dict[str, Any] = {"gpus_per_trial": s.gpus_per_trial, "instances": s.instances}
            if s.launch_after is not None:
                entry["launch_after_seconds"] = s.launch_after
            if problem is not None:
                entry["trials"] = problem.sha.trials(i)
                entry["epochs"] = problem.sha.epochs(i)
            if spot:
                entry["market"] = "spot"
            stages.append(entry)
        return {"instance_type": self.instance_type, "stages": stages}


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
        stages.append(StageAllocation(g, c, launch_after))
    return Plan(name, tuple(stages))
