"""A run's compute backend as the Airflow side makes it: EC2 through the spec's AWS connection."""

from __future__ import annotations

from rubberband_airflow.execution.backends.base import ComputeBackend
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.spec import EC2BackendSpec, TuningSpec
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
