"""The tuning spec: one YAML file per tuning job, validated when the DAG file is parsed."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Mapping

import yaml

from rubberband_airflow.execution.prices import TABLE as PRICE_TABLE
from rubberband_airflow.execution.results import Mode
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.problem import SHA, max_stages
from rubberband_airflow.planning.validation import Reader, number
from rubberband_airflow.search_space import validate as validate_space


class SpecError(ValueError):
    """A bad tuning spec: names the file and the field."""

    def __init__(self, path: str, field_name: str, message: str) -> None:
        self.path, self.field, self.message = path, field_name, message
        super().__init__(f"{path}: {field_name}: {message}")


class BackendType(StrEnum):
    """Where a spec's instances run: local processes or EC2."""

    LOCAL = "local"
    EC2 = "ec2"


@dataclass(frozen=True)
class LocalBackendSpec:
    instance_type: str
    slots: int
    price_per_hour: float
    max_instances: int
    pending_seconds: float = 0.0
    boot_seconds: float = 0.0


@dataclass(frozen=True)
class EC2BackendSpec:
    instance_types: tuple[dict[str, Any], ...]  # name, max_instances, optional price_per_hour/gpus
    ami: str
    subnets: tuple[str, ...]
    security_groups: tuple[str, ...]
    instance_profile: str
    aws_conn_id: str = "aws_default"
    region: str | None = None
    key_name: str | None = None


@dataclass(frozen=True)
class TuningSpec:
    path: str
    name: str
    schedule: str | None
    trainable: str
    metric: str
    mode: Mode
    search_space: dict[str, Any]
    sha: SHA
    deadline_seconds: float
    backend: LocalBackendSpec | EC2BackendSpec
    storage: str
    profile: str
    stage_overhead_seconds: float | None = None
    trial_timeout_seconds: float = 3600.0
    seed: int = 0
    planner: dict[str, Any] = field(default_factory=dict)
    billing: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    tags: tuple[str, ...] = ()

    @property
    def backend_type(self) -> BackendType:
        return BackendType.LOCAL if isinstance(self.backend, LocalBackendSpec) else BackendType.EC2

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON in the YAML's shape: ``parse_spec`` reads it back to an equal spec
        (a run's snapshot of its spec, ``spec.json``)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "path"}
        out["mode"] = str(self.mode)
        out["sha"] = {k: v for k, v in asdict(self.sha).items() if v is not None}
        out["backend"] = {"type": str(self.backend_type), **asdict(self.backend)}
        return _plain(out)


def _plain(value: Any) -> Any:
    """Tuples as lists and mappings as dicts, all the way down."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _expand(value: str) -> str:
    """Environment variables (``${AIRFLOW_HOME}``) in storage and profile locations."""
    return os.path.expandvars(value)


def parse_spec(data: Any, path: str) -> TuningSpec:
    """Validate a spec's content; every error names the file and the field."""
    try:
        return _parse(data, path)
    except ProblemError as e:
        raise SpecError(path, e.field, e.message) from None


def _parse(data: Any, path: str) -> TuningSpec:
    top = Reader(data, "")
    name = top.string("name")
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ProblemError("name", f"must be a DAG id (letters, digits, _ - .), got {name!r}")
    schedule = top.raw("schedule", None)
    if schedule is not None and not isinstance(schedule, str):
        raise ProblemError("schedule", f"must be a cron expression, preset such as '@daily', or null, got {schedule!r}")
    trainable = top.string("trainable")
    if ":" not in trainable:
        raise ProblemError("trainable", f"must look like 'package.module:function', got {trainable!r}")
    metric = top.string("metric")
    mode = top.raw("mode", "max")
    if mode not in tuple(Mode):
        raise ProblemError("mode", f"must be 'max' or 'min', got {mode!r}")
    space = validate_space(top.raw("search_space"), "search_space")
    r = Reader(top.raw("sha"), "sha")
    num_trials, eta = r.integer("num_trials", minimum=1, maximum=4096), r.integer("eta", minimum=2)
    sha = SHA(num_trials, eta, r.integer("min_epochs", minimum=1),
              r.integer("num_stages", None, minimum=1, maximum=max_stages(num_trials, eta), nullable=True))
    r.done()
    deadline = top.number("deadline_seconds", positive=True)
    backend = _backend(top.raw("backend"))
    storage = _expand(top.string("storage"))
    profile = _expand(top.string("profile"))
    spec = TuningSpec(
        path=path, name=name, schedule=schedule, trainable=trainable, metric=metric, mode=Mode(mode), search_space=space,
        sha=sha, deadline_seconds=deadline, backend=backend, storage=storage, profile=profile,
        stage_overhead_seconds=_optional_number(top, "stage_overhead_seconds"),
        trial_timeout_seconds=top.number("trial_timeout_seconds", 3600.0, positive=True),
        seed=top.integer("seed", 0, minimum=0),
        planner=_mapping(top.raw("planner", {}), "planner"),
        billing=_mapping(top.raw("billing", {}), "billing"),
        description=str(top.raw("description", "")),
        tags=tuple(str(t) for t in top.raw("tags", []) or []),
    )
    top.done()
    return spec


def _optional_number(reader: Reader, key: str) -> float | None:
    value = reader.raw(key, None)
    return None if value is None else number(value, key, positive=False)


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ProblemError(name, "must be a mapping")
    return dict(value)


def _backend(value: Any) -> LocalBackendSpec | EC2BackendSpec:
    r = Reader(value, "backend")
    kind = r.raw("type")
    if kind == BackendType.LOCAL:
        b = LocalBackendSpec(instance_type=r.string("instance_type"), slots=r.integer("slots", minimum=1),
                             price_per_hour=r.number("price_per_hour", positive=True),
                             max_instances=r.integer("max_instances", minimum=1),
                             pending_seconds=r.number("pending_seconds", 0.0), boot_seconds=r.number("boot_seconds", 0.0))
        r.done()
        return b
    if kind == BackendType.EC2:
        types = r.raw("instance_types")
        if not isinstance(types, list) or not types:
            raise ProblemError("backend.instance_types", "must be a non-empty list of {name, max_instances}")
        for k, t in enumerate(types):
            tr = Reader(t, f"backend.instance_types[{k}]")
            name = tr.string("name")
            tr.integer("max_instances", 16, minimum=1)
            for opt in ("price_per_hour", "gpus"):
                if opt in t:
                    tr.number(opt, positive=True)
            if name not in PRICE_TABLE and not {"price_per_hour", "gpus"} <= set(t):
                raise ProblemError(f"backend.instance_types[{k}]", f"{name!r} is not in the price table "
                                   "(rubberband_airflow/execution/prices.py): give its gpus and price_per_hour")
            tr.done()
        subnets = r.raw("subnets")
        groups = r.raw("security_groups")
        for key, val in (("subnets", subnets), ("security_groups", groups)):
            if not isinstance(val, list) or not val or not all(isinstance(v, str) for v in val):
                raise ProblemError(f"backend.{key}", "must be a non-empty list of ids")
        b = EC2BackendSpec(instance_types=tuple(dict(t) for t in types), ami=r.string("ami"), subnets=tuple(subnets),
                           security_groups=tuple(groups), instance_profile=r.string("instance_profile"),
                           aws_conn_id=str(r.raw("aws_conn_id", "aws_default")), region=r.raw("region", None),
                           key_name=r.raw("key_name", None))
        r.done()
        return b
    raise ProblemError("backend.type", f"must be 'local' or 'ec2', got {kind!r}")


def load_spec(path: str | Path) -> TuningSpec:
    """Read and validate one spec file."""
    path = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise SpecError(path, "yaml", f"not valid YAML: {e}") from None
    return parse_spec(data, path)
