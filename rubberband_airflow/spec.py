"""The tuning spec: one YAML file per tuning job, validated when the DAG file is parsed."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from rubberband_airflow.execution.backends.base import Market
from rubberband_airflow.execution.prices import TABLE as PRICE_TABLE
from rubberband_airflow.execution.results import Mode
from rubberband_airflow.execution.runner import TrialTimeout
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.problem import SHA, max_stages, parse_billing, parse_planner
from rubberband_airflow.planning.validation import Reader, describe, integer, label, number
from rubberband_airflow.search_space import validate as validate_space
from rubberband_airflow.trainable import computes


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
    # Slots may outnumber the machine's cores (or GPUs): only for a trainable that does not
    # compute (its module sets COMPUTES = False), such as the synthetic workload.
    oversubscribe: bool = False


@dataclass(frozen=True)
class EC2BackendSpec:
    # name, max_instances; optional price_per_hour, gpus, market ("spot" or "on-demand"), spot_price_per_hour
    # and interruptions_per_hour
    instance_types: tuple[dict[str, Any], ...]
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
    trial_timeout: TrialTimeout = TrialTimeout()
    seed: int = 0
    planner: dict[str, Any] = field(default_factory=dict)
    billing: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    tags: tuple[str, ...] = ()
    replan: bool = True

    @property
    def backend_type(self) -> BackendType:
        return BackendType.LOCAL if isinstance(self.backend, LocalBackendSpec) else BackendType.EC2

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON in the YAML's shape: ``parse_spec`` reads it back to an equal spec
        (a run's snapshot of its spec, ``spec.json``)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "path"}
        out["mode"] = str(self.mode)
        # A spec's SHA is a whole job's: ``done`` (a re-plan's stages already run) is not a spec field.
        out["sha"] = {k: v for k, v in asdict(self.sha).items() if v is not None and k != "done"}
        out["backend"] = {"type": str(self.backend_type), **asdict(self.backend)}
        out["trial_timeout"] = asdict(self.trial_timeout)
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


def _beside(location: str, spec_path: str) -> str:
    """A relative local path, as the spec file's folder sees it; a URL or an absolute path as it is."""
    if "://" in location or os.path.isabs(location) or "://" in spec_path:
        return location
    return str(Path(spec_path).resolve().parent / location)


def parse_spec(data: Any, path: str) -> TuningSpec:
    """Validate a spec's content; every error names the file and the field."""
    try:
        check_tree(data)
        return _parse(data, path)
    except ProblemError as e:
        raise SpecError(path, e.field, e.message) from None


# What a spec's YAML may hold at all, before any field is read: no document is this deep, this
# large (counting each use of an alias) or holds integers this long, and none refers to itself.
MAX_DEPTH = 16
MAX_NODES = 100_000
MAX_INT_BITS = 63


def check_tree(data: Any) -> None:
    """Reject YAML no field accepts and the field checks could not even describe: an alias to an
    enclosing node (a cycle), nesting over MAX_DEPTH, over MAX_NODES values, integers over 63 bits,
    a blank key (no dotted field name could show it)."""
    budget = [MAX_NODES]

    def walk(value: Any, where: str, depth: int, enclosing: set[int]) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ProblemError("yaml", f"the document is too large (more than {MAX_NODES} values, "
                               "counting each use of an alias)")
        _check_int(value, where)
        if not isinstance(value, (Mapping, list, tuple)):
            return
        if id(value) in enclosing:
            raise ProblemError(where or "yaml", "contains itself (a YAML alias to an enclosing node)")
        if depth >= MAX_DEPTH:
            raise ProblemError(where or "yaml", f"is nested too deeply (more than {MAX_DEPTH} levels)")
        enclosing.add(id(value))
        if isinstance(value, Mapping):
            for key, item in value.items():
                _check_int(key, where)
                if isinstance(key, str) and not key.strip():
                    raise ProblemError(where or "yaml", f"has a blank key {key!r}")
                walk(item, f"{where}.{label(key)}" if where else label(key), depth + 1, enclosing)
        else:
            for k, item in enumerate(value):
                walk(item, f"{where}[{k}]", depth + 1, enclosing)
        enclosing.discard(id(value))

    walk(data, "", 0, set())


def _check_int(value: Any, where: str) -> None:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ProblemError(where or "yaml", f"integer too large ({value.bit_length()} bits, at most {MAX_INT_BITS})")


# Airflow's own schedule presets (airflow.sdk.definitions.timetables._cron.CRON_PRESETS, and the two
# that are no cron); importing them would import Airflow's SDK at every spec load.
CRON_PRESETS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *",
                "@quarterly": "0 0 1 */3 *", "@yearly": "0 0 1 1 *"}
NON_CRON_PRESETS = ("@once", "@continuous")
TAG_MAX_LEN = 100  # Airflow's limit on a DAG tag
DAG_ID = re.compile(r"[\w.-]{1,250}")  # Airflow's DAG ids (validate_key): letters, digits, _ - ., 250 at most
TRAINABLE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)
MAX_INSTANCES = 4096  # the planning problem's limits (planning/problem.py)
MAX_GPUS = 1024


def _schedule(value: Any) -> str | None:
    """Null, a preset, or a cron expression croniter accepts, as Airflow requires, that ever fires."""
    if value is None:
        return None
    expected = "a cron expression such as '0 2 * * *', a preset such as '@daily', or null"
    if not isinstance(value, str):
        raise ProblemError("schedule", f"must be {expected}, got {describe(value)}")
    if value in NON_CRON_PRESETS:
        return value
    from croniter import CroniterBadDateError, CroniterError, croniter

    try:
        croniter(CRON_PRESETS.get(value, value), datetime(2026, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        raise ProblemError("schedule", f"{value!r} never fires (no date matches it)") from None
    except CroniterError as e:
        raise ProblemError("schedule", f"must be {expected}, got {value!r} ({e})") from None
    return value


def _parse(data: Any, path: str) -> TuningSpec:
    if not isinstance(data, Mapping):
        raise ProblemError("yaml", f"the document must be a mapping of spec fields (name, trainable, ...), "
                           f"got {describe(data)}")
    top = Reader(data, "")
    name = top.string("name")
    if not DAG_ID.fullmatch(name):
        raise ProblemError("name", f"must be a DAG id (letters, digits, _ - ., at most 250), got {name!r}")
    schedule = _schedule(top.raw("schedule", None))
    trainable = top.string("trainable")
    if not TRAINABLE.fullmatch(trainable):
        raise ProblemError("trainable", f"must look like 'package.module:function', got {trainable!r}")
    metric = top.string("metric")
    mode = top.raw("mode", "max")
    if not isinstance(mode, str) or mode not in tuple(Mode):
        raise ProblemError("mode", f"must be 'max' or 'min', got {describe(mode)}")
    space = validate_space(top.raw("search_space"), "search_space")
    r = Reader(top.raw("sha"), "sha")
    num_trials, eta = r.integer("num_trials", minimum=1, maximum=4096), r.integer("eta", minimum=2)
    sha = SHA(num_trials, eta, r.integer("min_epochs", minimum=1),
              r.integer("num_stages", None, minimum=1, maximum=max_stages(num_trials, eta), nullable=True))
    r.done()
    deadline = top.number("deadline_seconds", positive=True)
    backend = _backend(top.raw("backend"))
    if isinstance(backend, LocalBackendSpec) and backend.oversubscribe and computes(trainable):
        raise ProblemError("backend.oversubscribe", f"may be true only for a trainable that does not compute (its "
                           f"module sets COMPUTES = False, as rubberband_airflow.workloads.synthetic does); "
                           f"{trainable} computes, and would run slower than profiled on shared cores")
    storage = _expand(top.string("storage"))
    profile = _beside(_expand(top.string("profile")), path)
    spec = TuningSpec(
        path=path, name=name, schedule=schedule, trainable=trainable, metric=metric, mode=Mode(mode),
        search_space=space, sha=sha, deadline_seconds=deadline, backend=backend, storage=storage, profile=profile,
        stage_overhead_seconds=_optional_number(top, "stage_overhead_seconds"),
        trial_timeout=_trial_timeout(top),
        seed=top.integer("seed", 0, minimum=0),
        planner=_overrides(top.raw("planner", {}), "planner", parse_planner),
        billing=_overrides(top.raw("billing", {}), "billing", parse_billing),
        description=_description(top.raw("description", None)),
        tags=_tags(top.raw("tags", None)),
        replan=_boolean(top, "replan", default=True),
    )
    top.done()
    return spec


def _trial_timeout(top: Reader) -> TrialTimeout:
    """``trial_timeout: {factor, floor_seconds}``; an older spec's ``trial_timeout_seconds: X`` is
    read as ``{floor_seconds: X}`` with the default factor."""
    value, old = top.raw("trial_timeout", None), top.raw("trial_timeout_seconds", None)
    if old is not None:
        if value is not None:
            raise ProblemError("trial_timeout_seconds", "give trial_timeout (or the older trial_timeout_seconds), "
                               "not both")
        return TrialTimeout(floor_seconds=number(old, "trial_timeout_seconds", positive=True))
    if value is None:
        return TrialTimeout()
    r = Reader(value, "trial_timeout")
    default = TrialTimeout()
    timeout = TrialTimeout(factor=r.number("factor", default.factor, positive=True),
                           floor_seconds=r.number("floor_seconds", default.floor_seconds, positive=True))
    r.done()
    return timeout


def _optional_number(reader: Reader, key: str) -> float | None:
    value = reader.raw(key, None)
    return None if value is None else number(value, key, positive=False)


def _description(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProblemError("description", f"must be a string, got {describe(value)}")
    return value


def _tags(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ProblemError("tags", f"must be a list of strings, got {describe(value)}")
    for k, tag in enumerate(value):
        if not isinstance(tag, str) or not tag.strip():
            raise ProblemError(f"tags[{k}]", f"must be a non-empty string, got {describe(tag)}")
        if len(tag) > TAG_MAX_LEN:
            raise ProblemError(f"tags[{k}]", f"must be at most {TAG_MAX_LEN} characters (Airflow's limit), "
                               f"got {len(tag)}")
    return tuple(value)


_ABSENT: Any = object()


def _overrides(value: Any, where: str, parse: Callable[[Any, str], Any]) -> dict[str, Any]:
    """The planning problem's billing or planner settings a spec gives, checked as the planning
    problem checks them, so a bad one fails here rather than at plan time. (A run replaces the
    planner's seed by its own `seed`, as docs/user-guide.md says.)"""
    parse(value, where)
    return dict(value)

def _boolean(reader: Reader, key: str, default: bool = False) -> bool:
    value = reader.raw(key, default)
    if not isinstance(value, bool):
        raise ProblemError(reader.name(key), f"must be true or false, got {describe(value)}")
    return value


def _string_or_null(reader: Reader, key: str) -> str | None:
    value = reader.raw(key, None)
    return None if value is None else reader.string(key)


def _ids(reader: Reader, key: str) -> tuple[str, ...]:
    value = reader.raw(key)
    if not isinstance(value, list) or not value:
        raise ProblemError(reader.name(key), f"must be a non-empty list of ids, got {describe(value)}")
    for k, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ProblemError(f"{reader.name(key)}[{k}]", f"must be a non-empty string, got {describe(item)}")
    return tuple(value)


def _backend(value: Any) -> LocalBackendSpec | EC2BackendSpec:
    r = Reader(value, "backend")
    kind = r.raw("type")
    if kind == BackendType.LOCAL:
        local = LocalBackendSpec(instance_type=r.string("instance_type"),
                                 slots=r.integer("slots", minimum=1, maximum=MAX_GPUS),
                                 price_per_hour=r.number("price_per_hour", positive=True),
                                 max_instances=r.integer("max_instances", minimum=1, maximum=MAX_INSTANCES),
                                 pending_seconds=r.number("pending_seconds", 0.0),
                                 boot_seconds=r.number("boot_seconds", 0.0),
                                 oversubscribe=_boolean(r, "oversubscribe"))
        r.done()
        return local
    if kind == BackendType.EC2:
        types = _ec2_instance_types(r.raw("instance_types"))
        ec2 = EC2BackendSpec(instance_types=types, ami=r.string("ami"), subnets=_ids(r, "subnets"),
                             security_groups=_ids(r, "security_groups"), instance_profile=r.string("instance_profile"),
                             aws_conn_id=r.string("aws_conn_id", "aws_default"), region=_string_or_null(r, "region"),
                             key_name=_string_or_null(r, "key_name"))
        r.done()
        return ec2
    raise ProblemError("backend.type", f"must be 'local' or 'ec2', got {describe(kind)}")


def _ec2_instance_types(value: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not value:
        raise ProblemError("backend.instance_types", f"must be a non-empty list of {{name, max_instances}}, "
                           f"got {describe(value)}")
    types: list[dict[str, Any]] = []
    for k, t in enumerate(value):
        where = f"backend.instance_types[{k}]"
        tr = Reader(t, where)
        name = tr.string("name")
        if any(other["name"] == name for other in types):
            raise ProblemError(f"{where}.name", f"{name!r} is listed twice")
        out: dict[str, Any] = {"name": name,
                               "max_instances": tr.integer("max_instances", 16, minimum=1, maximum=MAX_INSTANCES)}
        if (price := tr.raw("price_per_hour", _ABSENT)) is not _ABSENT:
            out["price_per_hour"] = number(price, f"{where}.price_per_hour", positive=True)
        if (gpus := tr.raw("gpus", _ABSENT)) is not _ABSENT:
            out["gpus"] = integer(gpus, f"{where}.gpus", minimum=1, maximum=MAX_GPUS)
        if (market := tr.raw("market", _ABSENT)) is not _ABSENT:
            if market not in tuple(Market):
                raise ProblemError(f"{where}.market", f"must be 'spot' or 'on-demand', got {describe(market)}")
            out["market"] = market
        if (spot := tr.raw("spot_price_per_hour", _ABSENT)) is not _ABSENT:
            out["spot_price_per_hour"] = number(spot, f"{where}.spot_price_per_hour", positive=True)
        if (rate := tr.raw("interruptions_per_hour", _ABSENT)) is not _ABSENT:
            out["interruptions_per_hour"] = number(rate, f"{where}.interruptions_per_hour", positive=False,
                                                   at_most=60.0)
        if name not in PRICE_TABLE and not {"price_per_hour", "gpus"} <= set(out):
            raise ProblemError(where, f"{name!r} is not in the price table "
                               "(rubberband_airflow/execution/prices.py): give its gpus and price_per_hour")
        tr.done()
        types.append(out)
    return tuple(types)


def load_spec(path: str | Path) -> TuningSpec:
    """Read and validate one spec file."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(path, "file", f"cannot be read: {e}") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise SpecError(path, "yaml", "not valid YAML: nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - PyYAML raises ValueError, TypeError, AttributeError, ... besides YAMLError
        raise SpecError(path, "yaml", f"not valid YAML: {e}") from None
    return parse_spec(data, path)
