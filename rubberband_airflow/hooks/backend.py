"""A run's compute backend as the Airflow side makes it: EC2 through the spec's AWS connection."""

from __future__ import annotations

from rubberband_airflow.execution.backends.base import ComputeBackend
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.spec import EC2BackendSpec, TuningSpec, load_spec
from rubberband_airflow.tuning import backend_for


def run_backend(spec: TuningSpec, storage: RunStorage, dag_id: str, run_id: str, instance_type: str,
                idle_timeout: float | None = None) -> ComputeBackend:
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
    """
    client = None
    if isinstance(spec.backend, EC2BackendSpec):
        from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

        client = EC2Hook(api_type="client_type", aws_conn_id=spec.backend.aws_conn_id,
                         region_name=spec.backend.region).conn
    return backend_for(spec, storage, dag_id, run_id, instance_type, client, idle_timeout)


def backend_of_run(spec_path: str, storage: RunStorage, dag_id: str, run_id: str) -> ComputeBackend | None:
    """
    The backend of a started run, as a sensor or trigger of the run makes it.

    It is the spec's backend for the instance type of the plan in run storage (None before the
    run's plan is written).

    :param spec_path: the tuning spec's file
    :param storage: the run's storage
    :param dag_id: the tuning DAG's id
    :param run_id: the DAG run's id
    """
    plan = storage.read_json("plan.json")
    if not plan or not plan.get("instance_type"):
        return None
    return run_backend(load_spec(spec_path), storage, dag_id, run_id, str(plan["instance_type"]))
