"""Teardown terminates first and sweeps by tags: a storage fault, a new attempt of a run, or another
Airflow deployment in the same account never leaves an instance running or adopts one."""

import fsspec

from rubberband_airflow.execution import prices
from rubberband_airflow.execution.backends.ec2 import EC2Backend
from rubberband_airflow.execution.runner import stop_instances
from rubberband_airflow.execution.storage import RunStorage
from tests.execution.conftest import agent_processes
from tests.execution.moto_cloud import MotoCloud, moto_cloud  # noqa: F401 (the fixture)

TYPE = "g5.xlarge"
RUN = "scheduled__2026-11-28T02:00:00+00:00"


def _backend(cloud: MotoCloud, name: str, attempt: int = 1, deployment: str = "default") -> EC2Backend:
    return EC2Backend(cloud.storage(name), TYPE, cloud.image_id, cloud.subnets, [cloud.security_group],
                      cloud.instance_profile, dag_id="tune_digits", run_id=RUN, slots=prices.lookup(TYPE).gpus,
                      trial_timeout=120, client=cloud.client("ec2"), attempt=attempt, deployment=deployment)


def _ids(cloud: MotoCloud, **tags: str) -> set[str]:
    return {i["InstanceId"] for i in cloud.instances(**tags)}


def test_a_new_attempt_or_another_deployment_never_adopts_a_batch_and_teardown_keeps_deployments_apart(moto_cloud):
    first = _backend(moto_cloud, f"tune_digits/{RUN}")
    second = _backend(moto_cloud, f"tune_digits/{RUN}.attempt-2", attempt=2)
    staging = _backend(moto_cloud, f"staging/tune_digits/{RUN}", deployment="staging")
    old = first.launch("stage-1-batch-0", 1)
    new = second.launch("stage-1-batch-0", 1)
    theirs = staging.launch("stage-1-batch-0", 1)
    assert len({*old, *new, *theirs}) == 3  # the same batch name, three batches
    assert len({b.client_token("stage-1-batch-0", moto_cloud.subnets[0]) for b in (first, second, staging)}) == 3
    assert second.launch("stage-1-batch-0", 1) == new  # a retry within the attempt finds its own batch
    assert _ids(moto_cloud, attempt="2") == set(new) and _ids(moto_cloud, deployment="staging") == set(theirs)

    # The second attempt's teardown: its own ledger, then the run's tags, which also finds what the
    # first attempt left; the other deployment's instance of the same DAG and run id stays.
    assert sorted(stop_instances(second.storage, second)) == sorted(new + old)
    assert _ids(moto_cloud, run_id=RUN) == set(theirs)
    assert stop_instances(staging.storage, staging) == theirs
    assert _ids(moto_cloud) == set()
    moto_cloud.hypervisor.sync()
    assert all(agent_processes(b.storage) == [] for b in (first, second, staging))


def test_teardown_terminates_every_instance_when_the_run_folder_is_gone(moto_cloud):
    backend = _backend(moto_cloud, f"tune_digits/{RUN}")
    ids = backend.launch("stage-1-batch-0", 2) + backend.launch("stage-2-batch-0", 1)
    fs = fsspec.filesystem("s3")
    fs.rm(backend.storage.root, recursive=True)  # the run's files deleted, ledger and all
    assert backend.live() == []
    assert sorted(stop_instances(backend.storage, backend)) == sorted(ids)  # found by the run's tags
    assert _ids(moto_cloud, run_id=RUN) == set()
    moto_cloud.hypervisor.sync()
    assert agent_processes(backend.storage) == []


class _StopFilesFail(RunStorage):
    """Run storage whose writes of stop files fail, as a store refusing writes would."""

    def write_bytes(self, data: bytes, *parts: str) -> None:
        if parts[-1] == "stop":
            raise PermissionError(f"injected: {self.path(*parts)} cannot be written")
        super().write_bytes(data, *parts)


def test_a_storage_error_writing_stop_files_does_not_keep_local_instances_running(local_backend, storage, caplog):
    backend = local_backend()
    ids = backend.launch("stage-1-batch-0", 2)
    assert stop_instances(_StopFilesFail(storage.uri), backend) == ids
    assert backend.live() == [] and all(e["terminated"] is not None for e in storage.ledger())
    assert agent_processes(storage) == []
    assert "could not write the stop file" in caplog.text


def test_local_teardown_ends_every_agent_when_the_run_folder_is_gone(local_backend, storage, tmp_path):
    """The run's files deleted, ledger and all: teardown finds the run's agents by their processes."""
    import shutil

    backend = local_backend()
    ids = backend.launch("stage-1-batch-0", 2)
    assert len(agent_processes(storage)) == 2
    shutil.rmtree(storage.root)
    assert backend.live() == []
    assert sorted(stop_instances(storage, backend)) == sorted(ids)
    assert agent_processes(storage) == []
