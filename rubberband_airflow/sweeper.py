"""The sweeper: a DAG that terminates EC2 instances of tuning runs that have ended.

Each run's teardown terminates its instances however the run ends. The sweeper is the net
behind it, for runs whose teardown never ran: a DAG run deleted from Airflow, or marked
success while its stages still ran. Every few minutes it lists the billable instances tagged
with this Airflow deployment's name (``rubberband:deployment``, see
``rubberband_airflow.hooks.backend.deployment_name``) in each AWS connection and region the EC2
specs of a dags folder use, asks Airflow for the state of each one's run, and terminates those
whose run has finished or no longer exists: also those of a spec since renamed or deleted (its
DAG's runs no longer exist). A spec that cannot be read is logged and skipped; the others are
swept all the same.

    # dags/rubberband_sweeper.py
    from pathlib import Path
    from rubberband_airflow.sweeper import sweeper_dag
    dag = sweeper_dag(Path(__file__).parent)
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, TaskInstance, get_current_context, task

from rubberband_airflow.execution.backends.ec2 import (
    BILLABLE_STATES,
    DEPLOYMENT_TAG,
    tagged_instances,
    terminate_instances,
)
from rubberband_airflow.hooks.backend import deployment_name
from rubberband_airflow.spec import EC2BackendSpec, load_spec

log = logging.getLogger(__name__)

ENDED = ("success", "failed")  # Airflow's run states after which a run launches nothing


def ended_runs_instances(instances: list[dict[str, Any]], run_state: Callable[[str, str], str | None]) -> list[str]:
    """Ids of the instances whose run (by their ``rubberband:`` tags) has ended or does not exist.

    ``run_state(dag_id, run_id)`` is Airflow's state of the run ("success", "failed", or "ended" for
    either; anything else is active), or None where there is no such run.
    """
    by_run: dict[tuple[str, str], list[str]] = defaultdict(list)
    for inst in instances:
        tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
        if "rubberband:dag_id" in tags and "rubberband:run_id" in tags:
            by_run[tags["rubberband:dag_id"], tags["rubberband:run_id"]].append(inst["InstanceId"])
    doomed = []
    for (dag_id, run_id), ids in sorted(by_run.items()):
        state = run_state(dag_id, run_id)
        if state is None or state in ("ended", *ENDED):
            doomed += ids
    return doomed


def ec2_accounts(dags_folder: str | Path) -> list[tuple[str, str | None]]:
    """The (AWS connection, region) pairs the EC2 specs in a folder use; a file that does not load
    (whatever it raises) is logged and skipped."""
    out: set[tuple[str, str | None]] = set()
    for path in sorted(Path(dags_folder).glob("*.yaml")):
        try:
            spec = load_spec(path)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the sweep of the others
            log.warning("skipping %s, not a tuning spec that loads (its DAG shows the import error): %s", path, e)
            continue
        if isinstance(spec.backend, EC2BackendSpec):
            out.add((spec.backend.aws_conn_id, spec.backend.region))
    return sorted(out, key=lambda cr: (cr[0], cr[1] or ""))


def airflow_run_state(ti: TaskInstance) -> Callable[[str, str], str | None]:
    """A ``run_state`` for ``ended_runs_instances`` that asks Airflow through the running task ``ti``."""

    def run_state(dag_id: str, run_id: str) -> str | None:
        """"ended" or "active" as Airflow has the run, or None where it has no such run."""
        if ti.get_dr_count(dag_id=dag_id, run_ids=[run_id]) == 0:
            return None
        ended = ti.get_dr_count(dag_id=dag_id, run_ids=[run_id], states=list(ENDED))
        return "ended" if ended else "active"

    return run_state


def sweeper_dag(dags_folder: str | Path, schedule: str = "*/15 * * * *") -> DAG:
    """The sweeper DAG (``rubberband_sweeper``) for the accounts and regions of the EC2 tuning specs in
    ``dags_folder``."""
    folder = str(dags_folder)

    @task
    def sweep() -> list[str]:
        """Terminate this deployment's instances of ended or deleted tuning runs; returns their ids."""
        from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

        run_state = airflow_run_state(get_current_context()["ti"])
        mine = {DEPLOYMENT_TAG: deployment_name()}
        terminated = []
        for conn_id, region in ec2_accounts(folder):
            ec2 = EC2Hook(api_type="client_type", aws_conn_id=conn_id, region_name=region).conn
            doomed = ended_runs_instances(tagged_instances(ec2, BILLABLE_STATES, mine), run_state)
            terminate_instances(ec2, doomed)
            terminated += doomed
        log.info("terminated %d instance(s) of ended tuning runs of deployment %r: %s", len(terminated),
                 mine[DEPLOYMENT_TAG], terminated)
        return terminated

    with DAG(dag_id="rubberband_sweeper", schedule=schedule, start_date=datetime(2026, 1, 1, tzinfo=UTC),
             catchup=False, max_active_runs=1, tags=["rubberband"],
             description="Terminate EC2 instances of tuning runs that have ended (the net behind teardown)") as dag:
        sweep()
    return dag
