"""The Airflow path of a lost instance: the trigger, made with the run's backend, notices a killed
agent by its dead pid, and a hung one by the trial past its limit in its heartbeat (neither after
the heartbeat silence); the sensor has the trial placed again and defers on its new instance,
where it resumes from its checkpoint and finishes."""

import asyncio
import os
import signal
import time
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import TaskDeferred

from rubberband_airflow.execution import checkpoint, recovery
from rubberband_airflow.execution.runner import RunSpec, assign_stage, start_run
from rubberband_airflow.sensors.trial import TrialResultSensor
from rubberband_airflow.triggers.trial import TrialResultTrigger
from tests.execution.conftest import (  # noqa: F401 (fixtures)
    agent_processes,
    env,
    local_backend,
    one_trial_spec,
    plan_json,
    storage,
)

# Times trials against their limits and deadlines: run alone (`make test` runs these after the rest).
pytestmark = pytest.mark.serial

def _first_event(trigger: TrialResultTrigger, timeout: float) -> tuple[dict, float]:
    async def first():
        async for event in trigger.run():
            return event.payload
    began = time.monotonic()
    return asyncio.run(asyncio.wait_for(first(), timeout)), time.monotonic() - began


def _trigger(deferred: TaskDeferred) -> TrialResultTrigger:
    trigger = deferred.trigger
    trigger.poll_interval, trigger.liveness_interval = 0.2, 0.5
    return trigger


def _deferred_sensor_of_a_checkpointed_trial(storage, local_backend, env, tmp_path, monkeypatch, limit):
    """A trial of 4 epochs (one every second) running on a local instance, its sensor deferred and
    the trial checkpointed at epoch 1 or later: the sensor, the deferral, the instance, the context."""
    for name in ("PYTHONPATH", "RUBBERBAND_TEST_EPOCH_SECONDS"):  # what the backend the sensor makes passes on
        monkeypatch.setenv(name, env["PYTHONPATH"] if name == "PYTHONPATH" else "1.0")
    spec = one_trial_spec(tmp_path, "recovery_test", "tests.trainables:steady", 4)
    env["RUBBERBAND_TEST_EPOCH_SECONDS"] = "1.0"
    start_run(storage, RunSpec("tests.trainables:steady", "accuracy", "max", seed=1), [{"lr": 0.1}],
              plan_json("local-1", 1, [(1, 1)], num_trials=1, eta=2, min_epochs=4), 1)
    [instance] = local_backend().launch("stage-1-batch-0", 1)
    assign_stage(storage, 1, {instance: [{"trial": "trial-0000", "gpus": 1, "start_epoch": 0, "stop_epoch": 4,
                                          "limit_seconds": limit}]})
    context = {"dag": SimpleNamespace(dag_id="recovery_test"), "run_id": "manual__1"}
    sensor = TrialResultSensor(task_id="wait", run_uri=storage.uri, trial="trial-0000", stage=1,
                               spec_path=str(spec), deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context)
    deadline = time.monotonic() + 120
    while (info := checkpoint.read_info(storage, "trial-0000")) is None or info.epoch < 1:
        assert time.monotonic() < deadline, "the trial did not checkpoint"
        time.sleep(0.1)
    return sensor, deferred.value, instance, context


def test_a_killed_agents_trial_is_placed_again_by_its_sensor_and_resumes(storage, local_backend, env, tmp_path,
                                                                         monkeypatch):
    sensor, deferred, instance, context = _deferred_sensor_of_a_checkpointed_trial(
        storage, local_backend, env, tmp_path, monkeypatch, limit=120)
    os.killpg(storage.heartbeat(instance)["pid"], signal.SIGKILL)  # the instance dies mid-trial
    event, waited = _first_event(_trigger(deferred), timeout=60)
    assert event["lost"] and event["instance"] == instance and waited < 5  # the dead pid, not 300 s of silence
    assert "the backend says it is terminated" in event["result"]["error"]
    _resumed_elsewhere(storage, local_backend, sensor, context, event, instance)


def test_a_hung_agents_trial_is_placed_again_at_its_limit_not_after_the_silence(storage, local_backend, env,
                                                                               tmp_path, monkeypatch):
    monkeypatch.setattr(recovery, "OVERDUE_GRACE_SECONDS", 2.0)  # of 60 s: for a short test
    sensor, deferred, instance, context = _deferred_sensor_of_a_checkpointed_trial(
        storage, local_backend, env, tmp_path, monkeypatch, limit=20)
    beat = storage.heartbeat(instance)
    os.killpg(beat["pid"], signal.SIGSTOP)  # the instance freezes mid-trial: alive, silent (its end: terminated)
    event, _ = _first_event(_trigger(deferred), timeout=90)
    noticed = time.time()
    assert event["lost"] and event["instance"] == instance
    assert "is hung: its agent has not ended trial-0000 of stage 1" in event["result"]["error"], event
    [task] = beat["tasks"]
    assert noticed - (task["started"] + 20) < 30  # at about the trial's limit, not after 300 s of silence
    _resumed_elsewhere(storage, local_backend, sensor, context, event, instance)


def _resumed_elsewhere(storage, local_backend, sensor, context, event, instance):
    """The sensor has the trial placed again; it resumes on its new instance from its checkpoint."""
    with pytest.raises(TaskDeferred) as again:  # placed again: the wait goes on
        sensor.execute_complete(context, event)
    [record] = recovery.records(storage, 1)
    [moved] = record["trials"]
    assert moved["trial"] == "trial-0000" and moved["to"] not in (None, instance) and moved["from_epoch"] >= 1
    event, _ = _first_event(_trigger(again.value), timeout=120)
    assert "lost" not in event
    assert sensor.execute_complete(context, event)["metric"] == pytest.approx(1 - 0.9 ** 4)
    result = storage.read_result("trial-0000", 1)
    assert result["instance"] == moved["to"] and result["resumed_from_epoch"] == moved["from_epoch"]
    assert [m["started_from"] for m in storage.metrics("trial-0000")] == (
        [0] * moved["from_epoch"] + [moved["from_epoch"]] * (4 - moved["from_epoch"]))
    local_backend().terminate_all()
    assert agent_processes(storage) == []
