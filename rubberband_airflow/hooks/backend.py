"""A run's compute backend as the Airflow side makes it: EC2 through the spec's AWS connection."""

from __future__ import annotations

import logging
import time
from typing import Any

from rubberband_airflow.execution import runner
from rubberband_airflow.execution.backends.base import SUPERSEDED, ComputeBackend
from rubberband_airflow.execution.backends.ec2 import DEFAULT_DEPLOYMENT, DEPLOYMENT_TAG, terminate_tagged
from rubberband_airflow.execution.runner import RunPlan
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.hooks.storage import run_storage
from rubberband_airflow.spec import EC2BackendSpec, TuningSpec, load_spec
from rubberband_airflow.tuning import SNAPSHOT, RunSnapshot, backend_for, read_snapshot, run_uri, storage_conn_id

log = logging.getLogger(__name__)


def deployment_name() -> str:
    """
    This Airflow deployment's name: ``[rubberband] deployment`` (or ``AIRFLOW__RUBBERBAND__DEPLOYMENT``).

    Every EC2 instance is tagged with it (``rubberband:deployment``), and a deployment's teardown
    and sweeper touch only instances with its own name: give two deployments that share an AWS
    account different names.
    """
    from airflow.sdk import conf

    return conf.get("rubberband", "deployment", fallback=DEFAULT_DEPLOYMENT) or DEFAULT_DEPLOYMENT


def ec2_client(spec: TuningSpec) -> Any:
    """
    A boto3 EC2 client through an EC2 spec's ``aws_conn_id`` and ``region`` (the amazon provider's ``EC2Hook``).

    :param spec: a tuning spec with an EC2 backend
    """
    from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

    assert isinstance(spec.backend, EC2BackendSpec)
    return EC2Hook(api_type="client_type", aws_conn_id=spec.backend.aws_conn_id, region_name=spec.backend.region).conn


def run_backend(spec: TuningSpec, storage: RunStorage, dag_id: str, run_id: str, instance_type: str,
                idle_timeout: float | None = None, attempt: int = 1, deployment: str | None = None) -> ComputeBackend:
    """
    The backend that runs one run's instances of ``instance_type``.

    An EC2 spec's instances are launched through the amazon provider's ``EC2Hook`` (client API)
    on the spec's ``aws_conn_id`` and ``region``; a local spec needs no connection.

    :param spec: the tuning spec
    :param storage: the run's storage, as the Airflow side reaches it
    :param dag_id: the tuning DAG's id (an EC2 tag of every instance)
    :param run_id: the DAG run's id (an EC2 tag of every instance)
    :param instance_type: the instance type the run's plan chose
    :param idle_timeout: seconds an agent waits with nothing to run before it exits
    :param attempt: the attempt of the DAG run (an EC2 tag of every instance)
    :param deployment: the Airflow deployment's name (an EC2 tag); by default this one's
    """
    client = ec2_client(spec) if isinstance(spec.backend, EC2BackendSpec) else None
    return backend_for(spec, storage, dag_id, run_id, instance_type, client, idle_timeout, attempt,
                       deployment or deployment_name())


def backend_of_run(spec_path: str, storage: RunStorage, dag_id: str, run_id: str) -> ComputeBackend | None:
    """
    The backend of a started run, as a sensor or trigger of the run makes it.

    It is the backend of the run's own copy of its spec (its snapshot, with its attempt and
    deployment; the spec file only for a run that has none) for the instance type of the plan in
    run storage (None before the run's plan is written).

    :param spec_path: the tuning spec's file
    :param storage: the run's storage
    :param dag_id: the tuning DAG's id
    :param run_id: the DAG run's id
    """
    plan = storage.read_json("plan.json")
    if not plan or not plan.get("instance_type"):
        return None
    try:
        snapshot: RunSnapshot | None = read_snapshot(storage)
    except FileNotFoundError:
        snapshot = None
    spec = snapshot.spec if snapshot else load_spec(spec_path)
    idle = RunPlan.from_json(plan).agent_idle_seconds(spec.trial_timeout) if plan.get("problem") else None
    return run_backend(spec, storage, dag_id, run_id, str(plan["instance_type"]), idle,
                       snapshot.attempt if snapshot else 1, snapshot.deployment if snapshot else None)


def retire_earlier_attempts(today: TuningSpec, dag_id: str, run_id: str, attempt: int) -> list[str]:
    """
    Stop the run's earlier attempts for good; returns the ids terminated.

    A run cleared while it ran has its tasks stopped by Airflow, not its instances, and its
    teardown is reset before it ran: each earlier attempt is marked superseded (its backends
    launch nothing more: ``backends.base.SUPERSEDED``), then torn down (``teardown_run``).

    :param today: the spec file as it reads today
    :param dag_id: the tuning DAG's id
    :param run_id: the DAG run's id
    :param attempt: the attempt that replaces them
    """
    ids: list[str] = []
    for earlier in range(1, attempt):
        uri = run_uri(today, dag_id, run_id, earlier)
        storage = run_storage(uri, storage_conn_id(today))
        if not storage.exists(SNAPSHOT):
            continue  # no such attempt (a clear of failed tasks continues one): nothing was launched for it
        storage.write_json({"by_attempt": attempt, "time": time.time()}, SUPERSEDED)
        ids += [i for i in teardown_run(uri, today, dag_id, run_id) if i not in ids]
    return ids


def teardown_run(uri: str, today: TuningSpec, dag_id: str, run_id: str) -> list[str]:
    """
    Terminate every instance of a run's attempt (its ledger), then, however that went, sweep EC2
    by the run's tags; returns the ids terminated.

    The run's snapshot gives the spec; should it be unreadable, today's spec gives the EC2
    connection to sweep with.

    :param uri: the attempt's storage URI (start_run's XCom)
    :param today: the spec file as it reads today
    :param dag_id: the tuning DAG's id
    :param run_id: the DAG run's id
    """
    storage = run_storage(uri, storage_conn_id(today))
    try:
        snapshot: RunSnapshot | None = read_snapshot(storage)
    except Exception:  # noqa: BLE001 - the tag sweep below must run whatever storage says
        log.exception("cannot read the run's snapshot at %s: sweeping by tags with today's spec", uri)
        snapshot = None
    spec = snapshot.spec if snapshot else today
    deployment = snapshot.deployment if snapshot else deployment_name()
    ids: list[str] = []
    try:
        plan = storage.read_json("plan.json")
        if plan is not None:  # else the run never started: nothing was launched
            backend = run_backend(spec, storage, dag_id, run_id, RunPlan.from_json(plan).plan.instance_type,
                                  attempt=snapshot.attempt if snapshot else 1, deployment=deployment)
            ids += runner.stop_instances(storage, backend)
    finally:
        if isinstance(spec.backend, EC2BackendSpec):
            tags = {DEPLOYMENT_TAG: deployment, "rubberband:dag_id": dag_id, "rubberband:run_id": run_id}
            ids += [i for i in terminate_tagged(ec2_client(spec), tags) if i not in ids]
        else:  # the run's agent processes on this machine, found by their command line, whatever storage says
            local = backend_for(spec, storage, dag_id, run_id, spec.backend.instance_type)
            ids += [i for i in local.terminate_all() if i not in ids]
    return ids
