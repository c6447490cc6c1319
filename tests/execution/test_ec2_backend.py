"""The ec2 backend against moto's server over HTTP, with agents booted from the instances' user data."""

import base64
import time

import pytest
from botocore.exceptions import ReadTimeoutError

from rubberband_airflow.execution import prices
from rubberband_airflow.execution.backends import ec2
from rubberband_airflow.execution.backends.ec2 import CapacityError, EC2Backend, LaunchError
from rubberband_airflow.execution.runner import RunPlan, RunSpec, run_sha, scale, start_run
from rubberband_airflow.search_space import sample
from rubberband_airflow.workloads import digits
from tests.execution.conftest import agent_processes, plan_json
from tests.execution.moto_cloud import MotoCloud, moto_cloud  # noqa: F401 (the fixture)

SPEC = RunSpec("rubberband_airflow.workloads.digits:train", "accuracy", "max", seed=3)
TYPE = "g5.xlarge"  # one GPU: one slot, as this machine has two cores


def _backend(cloud: MotoCloud, storage, run_id: str = "manual__2025-07-01T00:00:00+00:00",
             subnets: list[str] | None = None, client=None, **options) -> EC2Backend:
    """``options``: the backend's keyword options (``market``, ``spot_price``)."""
    return EC2Backend(storage, TYPE, cloud.image_id, subnets or cloud.subnets, [cloud.security_group],
                      cloud.instance_profile, dag_id="tune_digits", run_id=run_id,
                      slots=prices.lookup(TYPE).gpus, trial_timeout=120, client=client or cloud.client("ec2"),
                      **options)


def test_two_stage_job_runs_on_ec2_and_leaves_nothing_running(moto_cloud):
    storage = moto_cloud.storage("tune_digits/run-1")
    backend = _backend(moto_cloud, storage)
    plan = plan_json(TYPE, 1, [(1, 2), (1, 1)], num_trials=4, eta=2, min_epochs=3)
    configs = sample(digits.SEARCH_SPACE, 4, seed=11)
    out = run_sha(storage, backend, SPEC, configs, plan, stage_timeout=300)

    first, second = out["stages"]
    assert first["failed"] == [] and second["failed"] == [], out["stages"]
    assert len(first["promoted"]) == 2 and second["trials"] == first["promoted"]
    best = out["best"]
    assert best["trial"] in first["promoted"] and best["metric"] > 0.8
    assert [m["epoch"] for m in storage.metrics(best["trial"])] == [1, 2, 3, 4, 5, 6]

    ledger = out["ledger"]
    assert len(ledger) == 2 and all(e["type"] == TYPE and e["slots"] == 1 for e in ledger)
    for e in ledger:
        assert e["instance"].startswith("i-")
        assert e["requested"] <= e["running"] <= e["ready"] <= e["terminated"]
    older, newer = ledger
    assert newer["terminated"] < older["terminated"]  # LIFO scale-in at stage 2
    assert moto_cloud.instances(dag_id="tune_digits", run_id=backend.run_id) == []
    moto_cloud.hypervisor.sync()  # EC2 has terminated them: their agents go down
    assert agent_processes(storage) == []


def test_launching_the_same_batch_twice_leaves_one_batch(moto_cloud):
    storage = moto_cloud.storage("tune_digits/run-2")
    backend = _backend(moto_cloud, storage)
    first = backend.launch("stage-1", 2)
    again = backend.launch("stage-1", 2)
    assert first == again and len(first) == 2
    assert len(moto_cloud.instances(dag_id="tune_digits", run_id=backend.run_id, batch="stage-1")) == 2
    assert sorted(backend.live()) == sorted(first)
    backend.terminate_all()
    assert moto_cloud.instances(run_id=backend.run_id) == [] and backend.live() == []
    moto_cloud.hypervisor.sync()
    assert agent_processes(storage) == []


def test_instances_require_imdsv2_and_user_data_holds_no_hyperparameter(moto_cloud):
    storage = moto_cloud.storage("tune_digits/run-3")
    config = {"lr": 0.0123456789, "momentum": 0.8765432, "width": 96, "dropout": 0.3141, "batch_size": 48,
              "weight_decay": 0.000271828}
    start_run(storage, SPEC, [config], {"instance_type": TYPE, "stages": []}, 1)
    backend = _backend(moto_cloud, storage)
    [instance] = backend.launch("stage-1", 1)

    client = moto_cloud.client("ec2")
    [described] = client.describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"]
    assert described["MetadataOptions"]["HttpTokens"] == "required"
    assert described["MetadataOptions"]["HttpEndpoint"] == "enabled"
    assert described["IamInstanceProfile"]["Arn"] == moto_cloud.instance_profile
    assert described["SubnetId"] == moto_cloud.subnets[0]
    tags = {t["Key"]: t["Value"] for t in described["Tags"]}
    assert tags["rubberband:dag_id"] == "tune_digits" and tags["rubberband:run_id"] == backend.run_id
    assert tags["rubberband:batch"] == "stage-1" and tags["rubberband:run"] == storage.uri
    volumes = client.describe_volumes(Filters=[{"Name": "tag:rubberband:run_id", "Values": [backend.run_id]}])
    assert len(volumes["Volumes"]) >= 1

    value = client.describe_instance_attribute(InstanceId=instance, Attribute="userData")["UserData"]["Value"]
    user_data = base64.b64decode(value).decode()
    assert user_data.startswith("#!/bin/bash\n")
    assert f"--run {storage.uri} --instance imds --slots 1 --trial-timeout 120 --idle-timeout 240" in user_data
    for key, v in config.items():  # neither a hyperparameter's value nor its name
        assert str(v) not in user_data and repr(v) not in user_data and key not in user_data
    assert "testing" not in user_data  # no credential either

    # The agent the user data started found its instance id through IMDSv2 and reported in.
    deadline = time.time() + 60
    while storage.heartbeat(instance) is None and time.time() < deadline:
        time.sleep(0.2)
    assert storage.heartbeat(instance)["instance"] == instance
    backend.terminate_all()
    moto_cloud.hypervisor.sync()
    assert agent_processes(storage) == []


def test_an_instance_whose_agent_exits_powers_off_and_is_recorded_gone(moto_cloud):
    storage = moto_cloud.storage("tune_digits/run-8")
    backend = _backend(moto_cloud, storage)
    [instance] = backend.launch("stage-1", 1)
    deadline = time.time() + 60
    while storage.heartbeat(instance) is None and time.time() < deadline:
        time.sleep(0.2)
    assert backend.describe([instance]) == {instance: "running"}
    storage.write_bytes(b"", "instances", instance, "stop")  # the agent exits; the user data powers off
    while backend.describe([instance])[instance] != "terminated" and time.time() < deadline:
        time.sleep(0.2)
    [entry] = storage.ledger()
    assert entry["running"] <= entry["ready"] <= entry["terminated"] and backend.live() == []
    assert moto_cloud.instances(run_id=backend.run_id) == [] and agent_processes(storage) == []


def test_terminate_run_sweeps_the_runs_instances_without_the_ledger(moto_cloud):
    storage = moto_cloud.storage("tune_digits/run-4")
    backend = _backend(moto_cloud, storage)
    other = _backend(moto_cloud, moto_cloud.storage("tune_digits/run-5"), run_id="scheduled__2025-07-02")
    ours = backend.launch("stage-1", 2) + backend.launch("stage-2", 1)
    theirs = other.launch("stage-1", 1)
    for instance in ours:
        storage.delete("ledger", f"{instance}.json")
    assert backend.live() == []

    assert sorted(backend.terminate_run()) == sorted(ours)
    assert moto_cloud.instances(run_id=backend.run_id) == []
    assert [i["InstanceId"] for i in moto_cloud.instances(run_id=other.run_id)] == theirs  # another run's stay
    other.terminate_all()
    moto_cloud.hypervisor.sync()
    assert agent_processes(storage) == [] and agent_processes(other.storage) == []


def test_a_refused_launch_names_the_subnet_and_the_error_and_launches_nothing(moto_cloud):
    storage = moto_cloud.storage("tune_digits/run-6")
    missing = "subnet-0123456789abcdef0"
    backend = _backend(moto_cloud, storage, subnets=[missing, moto_cloud.subnets[0]])
    with pytest.raises(LaunchError, match=rf"2 {TYPE} .* subnet {missing}: InvalidSubnetID.NotFound") as e:
        backend.launch("stage-1", 2)
    assert not isinstance(e.value, CapacityError)  # not a capacity error: the next subnet is not tried
    assert moto_cloud.instances(run_id=backend.run_id) == [] and storage.ledger() == []


def test_retryable_launch_errors_move_on_to_the_next_subnet(moto_cloud, monkeypatch):
    """moto never reports InsufficientInstanceCapacity; the fallback is exercised with a real moto
    error (a missing subnet) made retryable, which is what capacity errors are."""
    monkeypatch.setattr(ec2, "RETRYABLE_LAUNCH_ERRORS", ec2.RETRYABLE_LAUNCH_ERRORS | {"InvalidSubnetID.NotFound"})
    storage = moto_cloud.storage("tune_digits/run-7")
    missing = ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]
    backend = _backend(moto_cloud, storage, subnets=[missing[0], moto_cloud.subnets[1]])
    ids = backend.launch("stage-1", 2)
    assert {i["SubnetId"] for i in moto_cloud.instances(run_id=backend.run_id)} == {moto_cloud.subnets[1]}
    assert len(ids) == 2
    backend.terminate_all()

    nowhere = _backend(moto_cloud, storage, subnets=missing)
    with pytest.raises(CapacityError, match=rf"no capacity for 1 {TYPE} .* subnets {missing[0]}, {missing[1]}"):
        nowhere.launch("stage-2", 1)
    moto_cloud.hypervisor.sync()
    assert agent_processes(storage) == []


def test_a_stage_whose_launch_reply_was_lost_is_retried_without_losing_or_doubling_instances(moto_cloud):
    """A stage of three batches: EC2 launched the second but its reply never came (a read timeout),
    so the start failed with that batch unrecorded and the third never asked for. The retry
    records the second, launches the third, and launches nothing twice."""
    storage = moto_cloud.storage("tune_digits/run-lost-reply")
    client = moto_cloud.client("ec2")
    backend = _backend(moto_cloud, storage, client=client)
    run_plan = RunPlan.from_json(plan_json(TYPE, 1, [(1, 3)], num_trials=3, eta=3, min_epochs=1))
    calls = []

    def lose_the_second_reply(**kwargs):
        calls.append(kwargs)
        if len(calls) == 2:
            raise ReadTimeoutError(endpoint_url=moto_cloud.endpoint)

    client.meta.events.register("after-call.ec2.RunInstances", lose_the_second_reply)
    with pytest.raises(ReadTimeoutError):
        scale(backend, run_plan, 1, batch_size=1)
    assert len(moto_cloud.instances(run_id=backend.run_id)) == 2 and len(storage.ledger()) == 1

    again = scale(backend, run_plan, 1, batch_size=1)
    running = sorted(i["InstanceId"] for i in moto_cloud.instances(run_id=backend.run_id))
    assert len(calls) == 3  # only the third batch was asked for again
    assert sorted(again["live"]) == running and len(running) == 3
    entries = {e["instance"]: e for e in storage.ledger()}
    assert sorted(entries) == running
    assert sorted(e["batch"] for e in entries.values()) == [f"stage-1-batch-{k}" for k in range(3)]
    backend.terminate_all()
    assert moto_cloud.instances(run_id=backend.run_id) == []
    moto_cloud.hypervisor.sync()
    assert agent_processes(storage) == []


def test_price_table_lookup_and_override():
    assert prices.lookup("p3.8xlarge").gpus == 4 and prices.lookup("p3.8xlarge").price_per_hour == 12.24
    assert prices.lookup("g5.xlarge", {"g5.xlarge": 0.5}).price_per_hour == 0.5
    assert prices.lookup("g5.xlarge", {"g6.xlarge": 0.5}).price_per_hour == 1.006
    assert all(t.gpus in (1, 4, 8) and t.price_per_hour > 0 for t in prices.TABLE.values())
    with pytest.raises(KeyError, match="no GPU instance type 'x1.large'"):
        prices.lookup("x1.large")
    with pytest.raises(ValueError, match="must be positive"):
        prices.lookup("g5.xlarge", {"g5.xlarge": 0})


def test_storage_reads_many_objects_in_one_round_on_s3(moto_cloud):
    storage = moto_cloud.storage("tune_digits/run-many")
    for k in range(5):
        storage.write_json({"k": k}, "ledger", f"i-{k}.json")
    paths = [("ledger", f"i-{k}.json") for k in (4, 0, 9, 2)]
    assert storage.read_json_many(paths) == [{"k": 4}, {"k": 0}, None, {"k": 2}]
    got = storage.fs.cat([storage.path(*p) for p in paths], on_error="return")
    assert all(storage.path(*p) in got for p in paths)  # keyed as asked: no object is read twice
