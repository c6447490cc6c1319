"""What a tuning run needs from its spec: the run's settings, its storage URI, its planning
problem and its backend. No Airflow here: the Airflow side reaches storage through its
connection (``rubberband_airflow.hooks.storage``) and hands the results in.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rubberband_airflow.execution import runner
from rubberband_airflow.execution.backends.base import SPOT_SUFFIX, ComputeBackend, Market, offer
from rubberband_airflow.execution.backends.local import LocalBackend, LocalInstanceType
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.problem import SHA
from rubberband_airflow.planning.profile import to_problem
from rubberband_airflow.report import newest_reports
from rubberband_airflow.spec import EC2BackendSpec, LocalBackendSpec, TuningSpec, parse_spec

# Spot interruptions per instance-hour the planner assumes where the spec gives none: about one
# interruption a day per instance, at the high end of what AWS's Spot Instance Advisor reports
# for GPU types ("<5%" to "5-10%" of instances interrupted a month is far less).
DEFAULT_INTERRUPTIONS_PER_HOUR = 0.05

# Run parameters a trigger form may override, with the spec's value as default.
OVERRIDABLE = ("deadline_seconds", "num_trials", "eta", "min_epochs", "instance_types", "max_instances", "seed")


def storage_conn_id(spec: TuningSpec) -> str | None:
    """The Airflow connection the Airflow side reaches the spec's storage with (the EC2 backend's)."""
    return spec.backend.aws_conn_id if isinstance(spec.backend, EC2BackendSpec) else None


@dataclass(frozen=True)
class RunSettings:
    """A run's settings: the spec's, with the trigger form's values applied."""

    deadline_seconds: float
    sha: SHA
    instance_types: list[str]
    max_instances: int | None
    seed: int


def dag_uri(spec: TuningSpec, dag_id: str | None = None) -> str:
    """Where a tuning DAG's runs live: ``<storage>/<dag_id>``."""
    return f"{spec.storage.rstrip('/')}/{dag_id or spec.name}"


def run_uri(spec: TuningSpec, dag_id: str, run_id: str, attempt: int = 1) -> str:
    """Where one attempt of a DAG run keeps its files: ``<storage>/<dag_id>/<run_id>`` for the
    first, ``<storage>/<dag_id>/<run_id>.attempt-<n>`` for the n-th (the run cleared n - 1 times)."""
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, got {attempt}")
    return f"{dag_uri(spec, dag_id)}/{_folder(run_id)}{'' if attempt == 1 else f'.attempt-{attempt}'}"


def latest_attempt(folders: Iterable[str], run_id: str) -> int:
    """The newest attempt of a DAG run among the folders of its DAG's storage (1 if none is there)."""
    first = _folder(run_id)
    found = [1] + [int(n) for f in folders if f.startswith(f"{first}.attempt-")
                   and (n := f[len(first) + len(".attempt-"):]).isdigit()]
    return max(found)


def _folder(run_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)


def settings(spec: TuningSpec, params: dict[str, Any] | None) -> RunSettings:
    """The spec's run settings with the trigger form's values (``params``) applied."""
    p = {k: v for k, v in (params or {}).items() if v is not None}
    types = instance_type_names(spec)
    chosen = p.get("instance_types") or types
    unknown = [t for t in chosen if t not in types]
    if unknown:
        raise ProblemError("params.instance_types", f"{unknown[0]!r} is not in the spec's backend ({', '.join(types)})")
    sha = SHA(num_trials=int(p.get("num_trials", spec.sha.num_trials)), eta=int(p.get("eta", spec.sha.eta)),
              min_epochs=int(p.get("min_epochs", spec.sha.min_epochs)), num_stages=spec.sha.num_stages)
    max_instances = p.get("max_instances")
    return RunSettings(deadline_seconds=float(p.get("deadline_seconds", spec.deadline_seconds)), sha=sha,
                       instance_types=list(chosen), max_instances=None if max_instances is None else int(max_instances),
                       seed=int(p.get("seed", spec.seed)))


def instance_type_names(spec: TuningSpec) -> list[str]:
    if isinstance(spec.backend, LocalBackendSpec):
        return [spec.backend.instance_type]
    return [t["name"] for t in spec.backend.instance_types]


def _instance_types(spec: TuningSpec, chosen: list[str], max_instances: int | None) -> list[dict[str, Any]]:
    b = spec.backend
    types: list[dict[str, Any]] = []
    if isinstance(b, LocalBackendSpec):
        # A computing trainable's instances share no core (or GPU); a sleeping one's may (spec.py checks which).
        limit = b.max_instances if b.oversubscribe else min(
            b.max_instances, LocalInstanceType(b.instance_type, b.slots).max_instances())
        # Pending and boot come from the profile, measured on this backend with the same injected latency.
        types.append({"name": b.instance_type, "gpus": b.slots, "price_per_hour": b.price_per_hour,
                      "max_instances": limit})
    else:
        from rubberband_airflow.execution.prices import lookup

        for t in b.instance_types:
            if t["name"] not in chosen:
                continue
            known = lookup(t["name"]) if "gpus" not in t or "price_per_hour" not in t else None
            on_demand = {"name": t["name"], "gpus": int(t.get("gpus", known.gpus if known else 1)),
                         "price_per_hour": float(t.get("price_per_hour", known.price_per_hour if known else 0)),
                         "max_instances": int(t.get("max_instances", 16))}
            market = t.get("market")
            if market != Market.SPOT:
                types.append(on_demand)
            if market == Market.SPOT or (market is None and "spot_price_per_hour" in t):
                types.append({**on_demand, "name": t["name"] + SPOT_SUFFIX, "market": "spot",
                              "price_per_hour": float(t.get("spot_price_per_hour", on_demand["price_per_hour"])),
                              "interruptions_per_hour": float(t.get("interruptions_per_hour",
                                                                    DEFAULT_INTERRUPTIONS_PER_HOUR))})
    if max_instances:
        for t in types:
            t["max_instances"] = min(t["max_instances"], int(max_instances))
    return types


def past_runs(root: RunStorage, limit: int | None = 5, exclude_run_id: str | None = None) -> list[dict[str, Any]]:
    """Reports of a DAG's latest finished runs (``root``: its folder), newest first; with
    ``exclude_run_id``, none of that DAG run's attempts."""
    return [rep for _, rep in newest_reports(root) if exclude_run_id is None
            or rep.get("run_id") != exclude_run_id][:limit]


def like_this_run(history: list[dict[str, Any]], num_trials: int, limit: int = 5) -> list[dict[str, Any]]:
    """The latest past runs (``limit``) a run of ``num_trials`` trials plans its overheads with: those
    of as many trials where there are any (the overheads grow with the trials started at once: a DAG
    triggered at several sizes), else all."""
    same = [rep for rep in history if len(rep.get("trials") or {}) == num_trials]
    return (same or history)[:limit]


def measured_stage_overhead(reports: list[dict[str, Any]]) -> float | None:
    """The orchestrator's time between stages (stage 2 on), averaged over past runs' reports."""
    values = [o for rep in reports for o in (rep.get("stage_overhead_seconds") or [])[1:] if o is not None and o >= 0]
    return sum(values) / len(values) if values else None


def measured_trial_overhead(reports: list[dict[str, Any]]) -> float | None:
    """The time a trial held its slot beyond its epochs in the deployment (process start, checkpoint
    restore and save, the agent's pause between trials), averaged over past runs' reports."""
    values = [float(u) for rep in reports if (u := rep.get("trial_overhead_seconds")) is not None]
    return sum(values) / len(values) if values else None


def trial_overhead(history: list[dict[str, Any]]) -> tuple[float | None, str]:
    """The trial overhead a run plans with and where it comes from: the mean of the DAG's past runs,
    else None (the profile's, measured without Airflow)."""
    if (measured := measured_trial_overhead(history)) is not None:
        return measured, "past runs"
    return None, "profile"


def measured_teardown(reports: list[dict[str, Any]]) -> float | None:
    """The time from a run's last result to its instances' termination, the median of past runs'
    reports (a night whose teardown waited for Airflow would otherwise weigh on 5 runs' costs)."""
    values = [float(e) for rep in reports if (e := rep.get("teardown_seconds")) is not None and e >= 0]
    return statistics.median(values) if values else None


def teardown(history: list[dict[str, Any]], calibration: list[dict[str, Any]]) -> tuple[float | None, str]:
    """The teardown a run plans with and where it comes from: measured in the DAG's past runs, else
    in the deployment's calibration runs, else None (0: the instances end with the last result)."""
    if (measured := measured_teardown(history)) is not None:
        return measured, "past runs"
    if (measured := measured_teardown(calibration)) is not None:
        return measured, "calibration"
    return None, "none"


CALIBRATION_DAG_ID = "rubberband_calibration"  # its runs, under a storage root, measure that deployment


def stage_overhead(spec: TuningSpec, history: list[dict[str, Any]],
                   calibration: list[dict[str, Any]]) -> tuple[float | None, str]:
    """The stage overhead a run plans with and where it comes from: the spec's, the mean of the
    DAG's past runs, else of the deployment's calibration runs, else None (the profile's estimate)."""
    if spec.stage_overhead_seconds is not None:
        return spec.stage_overhead_seconds, "spec"
    if (measured := measured_stage_overhead(history)) is not None:
        return measured, "past runs"
    if (measured := measured_stage_overhead(calibration)) is not None:
        return measured, "calibration"
    return None, "profile"


def calibration_runs(spec: TuningSpec, dag_id: str, history: list[dict[str, Any]],
                     read: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The calibration reports a run of ``dag_id`` plans with (``read`` reads them from the
    calibration DAG's folder under the same storage root): only where neither the spec nor the
    DAG's past runs give its stage overhead, or its past runs its teardown, and never for the
    calibration DAG itself."""
    if dag_id == CALIBRATION_DAG_ID or (stage_overhead(spec, history, [])[0] is not None
                                        and teardown(history, [])[0] is not None):
        return []
    return read()


def planning_problem(spec: TuningSpec, params: dict[str, Any] | None, profile: dict[str, Any],
                     history: list[dict[str, Any]] | None = None,
                     calibration: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The planning problem of one run: the profile, the spec, the trigger form's values and,
    where the spec does not fix it, the stage overhead measured in the DAG's past runs or, before
    its first, in the deployment's calibration runs (``stage_overhead``); the trial overhead
    measured in the DAG's past runs (``trial_overhead``); the teardown measured in its past runs or
    the calibration runs (``teardown``)."""
    s = settings(spec, params)
    sha = {"num_trials": s.sha.num_trials, "eta": s.sha.eta, "min_epochs": s.sha.min_epochs}
    if s.sha.num_stages is not None:
        sha["num_stages"] = s.sha.num_stages
    tuning: dict[str, Any] = {"sha": sha, "deadline_seconds": s.deadline_seconds,
                              "instance_types": _instance_types(spec, s.instance_types, s.max_instances)}
    if (h := stage_overhead(spec, history or [], calibration or [])[0]) is not None:
        tuning["stage_overhead_seconds"] = h
    if (u := trial_overhead(history or [])[0]) is not None:
        tuning["trial_overhead_seconds"] = u
    if (e := teardown(history or [], calibration or [])[0]) is not None:
        tuning["teardown_seconds"] = e
    if spec.billing:
        tuning["billing"] = spec.billing
    tuning["planner"] = {**spec.planner, "seed": s.seed}
    return to_problem(profile, tuning)


def backend_for(spec: TuningSpec, storage: RunStorage, dag_id: str, run_id: str, instance_type: str,
                ec2_client: Any = None, idle_timeout: float | None = None, attempt: int = 1,
                deployment: str | None = None) -> ComputeBackend:
    """The compute backend that runs this run's instances of ``instance_type``; an EC2 spec needs a
    boto3 EC2 client (the Airflow side makes it from the spec's connection: ``hooks.backend``), and
    tags its instances with the run's ``attempt`` and the Airflow ``deployment``. ``idle_timeout``
    is how long its agents wait with nothing to run (``RunPlan.agent_idle_seconds``)."""
    b = spec.backend
    if isinstance(b, LocalBackendSpec):
        itype = LocalInstanceType(b.instance_type, b.slots, b.pending_seconds, b.boot_seconds, b.price_per_hour)
        return LocalBackend(storage, itype, trial_timeout=spec.trial_timeout.floor_seconds, idle_timeout=idle_timeout)
    from rubberband_airflow.execution.backends.ec2 import EC2Backend

    instance_type, market = offer(instance_type)
    known = {t["name"]: t for t in _instance_types(spec, [instance_type], None)}
    if instance_type not in known and instance_type + SPOT_SUFFIX not in known:
        raise ProblemError("backend.instance_types", f"{instance_type!r}, which the run's plan uses, is not in the "
                           f"spec's backend ({', '.join(instance_type_names(spec))})")
    if ec2_client is None:
        raise ValueError("an EC2 backend needs a boto3 EC2 client")
    given = next(t for t in b.instance_types if t["name"] == instance_type)
    return EC2Backend(storage=storage, instance_type=instance_type, image_id=b.ami, subnets=list(b.subnets),
                      security_groups=list(b.security_groups), instance_profile=b.instance_profile,
                      key_name=b.key_name, dag_id=dag_id, run_id=run_id, slots=int(next(iter(known.values()))["gpus"]),
                      trial_timeout=spec.trial_timeout.floor_seconds, idle_timeout=idle_timeout, client=ec2_client,
                      attempt=attempt, **({"deployment": deployment} if deployment else {}),
                      market=market or Market(given.get("market", Market.ON_DEMAND)),
                      spot_price=given.get("spot_price_per_hour"), price=_on_demand_price(given))


def _on_demand_price(given: dict[str, Any]) -> float:
    """A spec instance type's on-demand hourly price: the spec's, else the price list's."""
    from rubberband_airflow.execution.prices import lookup

    return float(given["price_per_hour"]) if "price_per_hour" in given else lookup(given["name"]).price_per_hour


SNAPSHOT = "spec.json"  # a run's own copy of its spec, in its storage


@dataclass(frozen=True)
class RunSnapshot:
    """What ``start_run`` fixes for a run's attempt: the spec as loaded, the trigger form's values,
    the attempt and the deployment. Every later task reads it, never today's YAML."""

    spec: TuningSpec
    params: dict[str, Any]
    attempt: int
    deployment: str

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "spec_path": self.spec.path, "params": self.params,
                "attempt": self.attempt, "deployment": self.deployment}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> RunSnapshot:
        """Read a snapshot back (``where``, its location, names it in errors)."""
        return cls(parse_spec(data["spec"], where), dict(data.get("params") or {}), int(data["attempt"]),
                   str(data["deployment"]))


def write_snapshot(storage: RunStorage, snapshot: RunSnapshot) -> None:
    storage.write_json(snapshot.to_json(), SNAPSHOT)


def read_snapshot(storage: RunStorage) -> RunSnapshot:
    """A run's snapshot; FileNotFoundError if its ``start_run`` wrote none."""
    data = storage.read_json(SNAPSHOT)
    if data is None:
        raise FileNotFoundError(f"{storage.url(SNAPSHOT)} does not exist: the run's start_run did not write it")
    return RunSnapshot.from_json(data, storage.url(SNAPSHOT))


def carry_over_earlier_attempt(storage: RunStorage, today: TuningSpec, params: dict[str, Any], plan: dict[str, Any],
                               attempt: int, attempt_storage: Callable[[int], RunStorage]) -> dict[str, Any]:
    """Keep what the run's latest earlier attempt (``attempt_storage(k)``: attempt k's storage)
    finished when its spec, form values and plan are this attempt's (``runner.carry_over``); else
    record why nothing is kept (``carried.json``)."""
    for earlier_attempt in range(attempt - 1, 0, -1):
        earlier = attempt_storage(earlier_attempt)
        try:
            snapshot = read_snapshot(earlier)
        except FileNotFoundError:
            continue
        if _canonical(snapshot.spec.to_dict()) != _canonical(today.to_dict()):
            why = "the spec changed"
        elif _canonical(snapshot.params) != _canonical(params):
            why = "the trigger form's values changed"
        elif _canonical(earlier.read_json("plan.json")) != _canonical(plan):
            why = "the plan changed"
        else:
            return runner.carry_over(earlier, storage, earlier_attempt)
        record = {"from_attempt": earlier_attempt, "from": earlier.uri, "results": {},
                  "reason": f"nothing kept from attempt {earlier_attempt}: {why} since"}
        storage.write_json(record, "carried.json")
        return record
    record = {"from_attempt": None, "results": {}, "reason": "no earlier attempt of the run was found"}
    storage.write_json(record, "carried.json")
    return record


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
