"""The trial trigger and sensor against real agents: a result ends the wait, a lost instance fails it."""

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from rubberband_airflow.execution import runner
from rubberband_airflow.execution.runner import RunSpec, assign_stage, start_run
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.sensors.trial import TrialResultSensor
from rubberband_airflow.triggers import trial as trial_trigger
from rubberband_airflow.triggers.trial import BOOT_SECONDS, TrialResultTrigger, boot_limit
from tests.execution.conftest import agent_processes, env, local_backend, storage  # noqa: F401 (fixtures)
from tests.flaky_fs import STORM, STORM_HERE, register


def _run(storage, backend, trainable: str) -> str:
    start_run(storage, RunSpec(trainable, "accuracy", "max", seed=1), [{"lr": 0.1}],
              {"instance_type": "local-1", "stages": []}, 1)
    [instance] = backend.launch("stage-1", 1)
    assign_stage(storage, 1, {instance: [{"trial": "trial-0000", "gpus": 1, "start_epoch": 0, "stop_epoch": 1}]})
    return instance


def _first_event(trigger: TrialResultTrigger, timeout: float) -> tuple[dict, float]:
    async def first():
        async for event in trigger.run():
            return event.payload
    began = time.monotonic()
    payload = asyncio.run(asyncio.wait_for(first(), timeout))
    return payload, time.monotonic() - began


def _sensor(storage) -> TrialResultSensor:
    return TrialResultSensor(task_id="wait", run_uri=storage.uri, trial="trial-0000", stage=1)


def test_a_trial_outlasting_the_silence_window_is_not_lost_while_its_agent_beats(storage, local_backend, env):
    env["RUBBERBAND_TEST_SLOW_SECONDS"] = "20"
    _run(storage, local_backend(), "tests.trainables:slow")
    trigger = TrialResultTrigger(storage.uri, "trial-0000", 1, poll_interval=0.2, silent_seconds=12,
                                 boot_seconds=60, liveness_interval=0.5)
    event, waited = _first_event(trigger, timeout=120)
    assert waited > 12 and "lost" not in event
    assert _sensor(storage).execute_complete({}, event)["metric"] == 0.5


def test_a_killed_instance_fails_its_trial_and_the_failure_is_recorded(storage, local_backend):
    instance = _run(storage, local_backend(), "tests.trainables:hangs")
    deadline = time.monotonic() + 60
    while (beat := storage.heartbeat(instance)) is None or not beat["running"]:
        assert time.monotonic() < deadline, "the agent did not start the trial"
        time.sleep(0.2)
    os.killpg(beat["pid"], signal.SIGKILL)  # the instance dies: agent and worker, no result written
    trigger = TrialResultTrigger(storage.uri, "trial-0000", 1, poll_interval=0.2, silent_seconds=3,
                                 boot_seconds=60, liveness_interval=0.5)
    event, waited = _first_event(trigger, timeout=60)
    assert event["lost"] and waited < 10
    assert event["result"]["error"].startswith(f"instance {instance} was lost: no heartbeat for")
    with pytest.raises(AirflowFailException, match="trial-0000 failed in stage 1: instance .* was lost"):
        _sensor(storage).execute_complete({}, event)
    assert storage.read_result("trial-0000", 1)["state"] == "failed"  # recorded, not dropped
    assert agent_processes(storage) == []


def test_an_instance_whose_agent_never_starts_fails_its_trial(storage):
    start_run(storage, RunSpec("tests.trainables:hangs", "accuracy", "max", seed=1), [{"lr": 0.1}],
              {"instance_type": "local-1", "stages": []}, 1)
    assign_stage(storage, 1, {"i-never": [{"trial": "trial-0000", "gpus": 1, "start_epoch": 0, "stop_epoch": 1}]})
    trigger = TrialResultTrigger(storage.uri, "trial-0000", 1, poll_interval=0.2, silent_seconds=3,
                                 boot_seconds=2, liveness_interval=0.5)
    event, _ = _first_event(trigger, timeout=30)
    assert event["lost"] and event["result"]["error"] == (
        "instance i-never sent no heartbeat within 2 s: its agent never started")


def test_the_wait_for_a_first_heartbeat_grows_with_the_launch_latency_the_plan_expects():
    plan = {"instance_type": "g5.12xlarge", "problem": {"instance_types": [
        {"name": "g5.xlarge", "pending_seconds": 10, "boot_seconds": 20},
        {"name": "g5.12xlarge", "pending_seconds": 200, "boot_seconds": 400}]}}
    assert boot_limit(plan) == 1800.0  # three times 600 s
    plan["instance_type"] = "g5.xlarge"
    assert boot_limit(plan) == BOOT_SECONDS  # never less than the default
    assert boot_limit(None) == BOOT_SECONDS


def test_the_triggers_of_a_stage_share_its_listing_and_each_ends_with_its_own_trial(storage):
    trials = [f"trial-{k:04d}" for k in range(32)]
    start_run(storage, RunSpec("tests.trainables:hangs", "accuracy", "max", seed=1), [{"lr": 0.1}] * 32,
              {"instance_type": "local-1", "stages": []}, 1)
    assign_stage(storage, 1, {"i-0": [{"trial": t, "gpus": 1, "start_epoch": 0, "stop_epoch": 1} for t in trials]})
    for k, t in enumerate(trials[:16]):  # half are done now, the other half while the triggers wait
        storage.write_result(t, 1, {"state": "done", "stage": 1, "metric": k / 100})

    async def wait_all() -> list:
        async def first(trigger: TrialResultTrigger):
            async for event in trigger.run():
                return event
        triggers = [TrialResultTrigger(storage.uri, t, 1, poll_interval=0.2, boot_seconds=60, finish_task=True)
                    for t in trials]
        waits = asyncio.gather(*(first(t) for t in triggers))
        await asyncio.sleep(1.0)
        [watch] = trial_trigger._WATCHES.values()  # one watch, one listing per poll, for the stage's 16 waiting
        assert watch.users == 16 and watch.done == dict.fromkeys(trials[:16], 1)  # each with its try
        for k, t in enumerate(trials[16:], start=16):
            await asyncio.to_thread(storage.write_result, t, 1, {"state": "done", "stage": 1, "metric": k / 100})
        return await asyncio.wait_for(waits, 30)

    events = asyncio.run(wait_all())
    assert trial_trigger._WATCHES == {}  # the last trigger out dropped it
    # Each ended its own task on the triggerer, its XCom the sensor's.
    assert [e.xcoms["return_value"] for e in events] == [
        {"trial": t, "stage": 1, "metric": k / 100} for k, t in enumerate(trials)]
    assert {e.task_instance_state for e in events} == {"success"}
    assert storage.stage_results(1) == set(trials)
    assert storage.stage_results(2) == set()


def test_the_triggers_of_a_stage_ride_out_a_storage_error_burst_and_each_ends_with_its_result(tmp_path, monkeypatch):
    """Every read of the triggers fails for 3 s (20 of their polls) while the trials' results are
    written: no wait fails or is lost, and each ends with its own trial's result once storage is back."""
    register()
    run = tmp_path / "run"
    storage = RunStorage(f"file://{run}")  # what the trials write through, spared by the storm
    trials = [f"trial-{k:04d}" for k in range(8)]
    start_run(storage, RunSpec("tests.trainables:hangs", "accuracy", "max", seed=1), [{"lr": 0.1}] * 8,
              {"instance_type": "local-1", "stages": []}, 1)
    assign_stage(storage, 1, {"i-0": [{"trial": t, "gpus": 1, "start_epoch": 0, "stop_epoch": 1} for t in trials]})
    storm = tmp_path / "storm"
    monkeypatch.setenv(STORM, str(storm))
    monkeypatch.setenv(STORM_HERE, "1")

    async def night() -> list:
        async def first(trigger: TrialResultTrigger):
            async for event in trigger.run():
                return event
        triggers = [TrialResultTrigger(f"flaky://{run}", t, 1, poll_interval=0.15, boot_seconds=60, finish_task=True)
                    for t in trials]
        waits = asyncio.gather(*(first(t) for t in triggers))
        await asyncio.sleep(1.0)  # the stage's watch is open, its results listed
        storm.touch()
        for k, t in enumerate(trials):
            await asyncio.to_thread(storage.write_result, t, 1, {"state": "done", "stage": 1, "metric": k / 100})
        await asyncio.sleep(3.0)
        assert not waits.done()  # nothing read in the storm: still waiting, none failed
        storm.unlink()
        return await asyncio.wait_for(waits, 30)

    events = asyncio.run(night())
    assert Path(f"{storm}.hits").read_text().count("\n") >= 20  # the storm met the triggers' reads
    assert [e.xcoms["return_value"] for e in events] == [
        {"trial": t, "stage": 1, "metric": k / 100} for k, t in enumerate(trials)]
    assert trial_trigger._WATCHES == {}


@pytest.mark.parametrize("deferrable", [True, False])
def test_a_wait_that_starts_or_pokes_in_a_storage_error_burst_goes_on_and_ends_with_its_result(
        deferrable, tmp_path, monkeypatch):
    """Every read of the sensor fails for 2 s from its start: it starts late (deferred to its trigger,
    or poking) rather than failing, and ends with its trial's result, which the trial wrote meanwhile."""
    register()
    run = tmp_path / "run"
    storage = RunStorage(f"file://{run}")  # the trial's side, spared by the storm
    start_run(storage, RunSpec("tests.trainables:hangs", "accuracy", "max", seed=1), [{"lr": 0.1}],
              {"instance_type": "local-1", "stages": []}, 1)
    assign_stage(storage, 1, {"i-0": [{"trial": "trial-0000", "gpus": 1, "start_epoch": 0, "stop_epoch": 1}]})
    storm = tmp_path / "storm"
    monkeypatch.setenv(STORM, str(storm))
    monkeypatch.setenv(STORM_HERE, "1")
    storm.touch()
    sensor = TrialResultSensor(task_id="wait", run_uri=f"flaky://{run}", trial="trial-0000", stage=1,
                               deferrable=deferrable, poll_interval=0.1, timeout=60)
    if deferrable:  # the result comes while the storm lasts: the wait's start sees it once storage is back
        storage.write_result("trial-0000", 1, {"state": "done", "stage": 1, "metric": 0.5})
        threading.Timer(2.0, storm.unlink).start()
        assert sensor.execute({}) == {"trial": "trial-0000", "stage": 1, "metric": 0.5}
    else:  # the storm passes before the result comes: the pokes in the storm found nothing, and failed nothing
        threading.Timer(2.0, storm.unlink).start()
        threading.Timer(2.5, storage.write_result, ("trial-0000", 1, {"state": "done", "stage": 1, "metric": 0.5})) \
            .start()
        assert sensor.execute({}) == {"trial": "trial-0000", "stage": 1, "metric": 0.5}
    assert Path(f"{storm}.hits").read_text().count("\n") >= 2  # the storm met the sensor's reads


def test_a_failed_wait_cleared_after_its_stage_was_promoted_says_how_to_run_the_trial_again(storage):
    """The run went on without the failed trial; clearing its wait alone cannot bring it back into
    the run, and the wait says so, and what to clear instead."""
    from types import SimpleNamespace

    start_run(storage, RunSpec("tests.trainables:sleepy", "accuracy", "max", seed=1), [{"lr": 0.1}],
              {"instance_type": "local-1", "stages": []}, 1)
    assign_stage(storage, 1, {"i-0": [{"trial": "trial-0000", "gpus": 1, "start_epoch": 0, "stop_epoch": 1}]})
    storage.write_result("trial-0000", 1, {"state": "failed", "stage": 1, "error": "ValueError: boom"})
    with pytest.raises(AirflowFailException) as first:
        _sensor(storage).execute({"dag_run": SimpleNamespace(clear_number=0), "ti": SimpleNamespace(try_number=1)})
    assert str(first.value) == "trial-0000 failed in stage 1: ValueError: boom"

    storage.write_json({"stage": 1, "trials": ["trial-0000"], "promoted": [], "failed": ["trial-0000"]},
                       "stages", "1", "promoted.json")  # the stage's promote ran: the run went on without it
    with pytest.raises(AirflowFailException) as cleared:
        _sensor(storage).execute({"dag_run": SimpleNamespace(clear_number=1), "ti": SimpleNamespace(try_number=2)})
    assert str(cleared.value).startswith("trial-0000 failed in stage 1: ValueError: boom; the run was cleared, "
                                         "but stage 1 was promoted without it")
    assert "clear the whole run (from start_run)" in str(cleared.value)
    assert storage.retries(1) == []  # and no try was started for nothing


def test_a_failed_wait_started_on_the_triggerer_runs_its_trial_again_after_a_clear(
        storage, local_backend, env, tmp_path, monkeypatch):
    """With ``waits_start_on_triggerer`` no worker runs a wait's ``execute``: the scheduler starts its
    trigger, which finds its trial by its map index. A trial fails; the user clears its failed task;
    the trigger starts again, finds the failure, and resumes the wait on a worker, which runs the trial
    again (a new try, resumed from its checkpoint) and waits for it; the new try ends the task on the
    triggerer with its metric. The first try's failure stays, and only the clear runs it again."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import TaskDeferred
    from airflow.triggers.base import TaskSuccessEvent, TriggerEvent

    from tests.execution.conftest import one_trial_spec, plan_json

    markers = tmp_path / "markers"
    markers.mkdir()
    for name, value in {"PYTHONPATH": env["PYTHONPATH"], "RUBBERBAND_TEST_MARKERS": str(markers),
                        "RUBBERBAND_TEST_FAIL_STAGES": "1"}.items():  # the agents of both backends get them
        monkeypatch.setenv(name, value)
        env[name] = value
    spec = one_trial_spec(tmp_path, "clear_test", "tests.trainables:fails_first_try", 1)
    start_run(storage, RunSpec("tests.trainables:fails_first_try", "accuracy", "max", seed=1), [{"lr": 0.1}],
              plan_json("local-1", 1, [(1, 1)], num_trials=1, eta=2, min_epochs=1), 1)
    [instance] = local_backend().launch("stage-1-batch-0", 1)
    assign_stage(storage, 1, {instance: [{"trial": "trial-0000", "gpus": 1, "start_epoch": 0, "stop_epoch": 1}]})

    def started_on_the_triggerer() -> TrialResultTrigger:
        """The trigger as the scheduler starts it (dag_factory's start_trigger_args), on map index 0."""
        trigger = TrialResultTrigger(storage.uri, None, 1, poll_interval=0.2, liveness_interval=0.5,
                                     spec_path=str(spec), boot_seconds=None, finish_task=True)
        trigger.task_instance = SimpleNamespace(dag_id="clear_test", run_id="manual__1", task_id="stage_1.wait",
                                                map_index=0)
        return trigger

    sensor = TrialResultSensor(task_id="wait", run_uri=storage.uri, trial="trial-0000", stage=1,
                               spec_path=str(spec), deferrable=True, finish_on_triggerer=True,
                               start_from_trigger=True)
    context = {"dag": SimpleNamespace(dag_id="clear_test"), "run_id": "manual__1"}
    failed, _ = _first_event(started_on_the_triggerer(), timeout=60)
    assert failed["result"]["error"].startswith("RuntimeError: injected failure 0")
    with pytest.raises(AirflowFailException, match="trial-0000 failed in stage 1: RuntimeError: injected failure 0"):
        sensor.execute_complete({**context, "dag_run": SimpleNamespace(clear_number=0),
                                 "ti": SimpleNamespace(try_number=1)}, failed)
    assert storage.retries(1) == []  # a failure is not run again by itself

    # The clear: Airflow's clear number of the run is 1; the trigger starts again and finds the failure.
    again, _ = _first_event(started_on_the_triggerer(), timeout=30)
    assert again == failed
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute_complete({**context, "dag_run": SimpleNamespace(clear_number=1),
                                 "ti": SimpleNamespace(try_number=2)}, again)
    [retry] = storage.retries(1)
    assert retry["try"] == 2 and retry["clear"] == 1 and retry["trials"] == ["trial-0000"]
    assert retry["launched"] is None  # placed on the run's live instance
    trigger = deferred.value.trigger
    trigger.poll_interval, trigger.liveness_interval = 0.2, 0.5

    async def first() -> TriggerEvent:
        async for event in trigger.run():
            return event
    done = asyncio.run(asyncio.wait_for(first(), 60))
    assert isinstance(done, TaskSuccessEvent)  # the task ends on the triggerer, with the sensor's XCom
    assert done.xcoms["return_value"] == {"trial": "trial-0000", "stage": 1,
                                          "metric": storage.read_result("trial-0000", 1)["metric"]}
    assert storage.read_result("trial-0000", 1, 2)["state"] == "done"
    assert "injected failure 0" in storage.read_result("trial-0000", 1, 1)["error"]
    # A wait of the same clear that resumes late with the old failure runs nothing again: it ends with the new try.
    metric = storage.read_result("trial-0000", 1)["metric"]
    late = sensor.execute_complete({**context, "dag_run": SimpleNamespace(clear_number=1),
                                    "ti": SimpleNamespace(try_number=2)}, failed)
    assert late == {"trial": "trial-0000", "stage": 1, "metric": metric} and len(storage.retries(1)) == 1


def test_a_trial_failing_after_a_clear_of_other_tasks_runs_again_only_when_its_own_wait_is_cleared(
        storage, local_backend, tmp_path):
    """Airflow's clear number of a run grows with a clear of any of its tasks: a clear of other tasks
    while a stage runs (a failed prewarm, a wait failed in a storage burst) is no clear of this wait.
    A trial that then fails for the first time fails its wait, and nothing runs it again, until its
    own wait is cleared (a new try of its task)."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import TaskDeferred

    from tests.execution.conftest import one_trial_spec, plan_json

    spec = one_trial_spec(tmp_path, "clear_test", "tests.trainables:sleepy", 1)
    start_run(storage, RunSpec("tests.trainables:sleepy", "accuracy", "max", seed=1), [{"x": 0.5}],
              plan_json("local-1", 1, [(1, 1)], num_trials=1, eta=2, min_epochs=1), 1)
    [instance] = local_backend().launch("stage-1-batch-0", 1)
    assign_stage(storage, 1, {instance: []})  # placed at clear 0 (the trial's try 1 fails below)
    storage.write_result("trial-0000", 1, {"state": "failed", "stage": 1, "error": "ValueError: boom"})
    failed = {"trial": "trial-0000", "stage": 1, "result": storage.read_result("trial-0000", 1)}
    sensor = TrialResultSensor(task_id="wait", run_uri=storage.uri, trial="trial-0000", stage=1,
                               spec_path=str(spec), deferrable=True)
    context = {"dag": SimpleNamespace(dag_id="clear_test"), "run_id": "manual__1"}

    # Another task was cleared meanwhile (clear 1); this wait, in its first try, reports the failure.
    with pytest.raises(AirflowFailException, match="trial-0000 failed in stage 1: ValueError: boom"):
        sensor.execute_complete({**context, "dag_run": SimpleNamespace(clear_number=1),
                                 "ti": SimpleNamespace(try_number=1)}, failed)
    assert storage.retries(1) == [] and list(storage.assignments(instance)) == []  # nothing runs it again

    # Its own wait cleared (clear 2, the task's try 2): the trial runs again, on the live instance.
    with pytest.raises(TaskDeferred):
        sensor.execute({**context, "dag_run": SimpleNamespace(clear_number=2), "ti": SimpleNamespace(try_number=2)})
    [retry] = storage.retries(1)
    assert retry["try"] == 2 and retry["clear"] == 2 and retry["trials"] == ["trial-0000"]
    assert [t["trial"] for t in storage.assignments(instance)] == ["trial-0000"]


def test_a_clear_of_some_failed_waits_runs_only_their_trials_again(storage, local_backend, tmp_path):
    """Two trials of a stage failed; the user clears one of their waits (Airflow resets that task, the
    other stays failed): only its trial runs again, none whose wait would never read the new try."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import TaskDeferred

    from tests.execution.conftest import one_trial_spec, plan_json

    spec = one_trial_spec(tmp_path, "clear_test", "tests.trainables:sleepy", 1)
    start_run(storage, RunSpec("tests.trainables:sleepy", "accuracy", "max", seed=1), [{"x": 0.5}, {"x": 0.6}],
              plan_json("local-1", 1, [(1, 1)], num_trials=2, eta=2, min_epochs=1), 1)
    [instance] = local_backend().launch("stage-1-batch-0", 1)
    trials = ["trial-0000", "trial-0001"]
    assign_stage(storage, 1, {instance: []})
    for t in trials:  # both failed, and their waits reported it in the first try of their tasks
        storage.write_result(t, 1, {"state": "failed", "stage": 1, "error": "ValueError: boom"})
        runner.report_failure(storage, t, 1, task_try=1)

    class Clear1Ti:  # the first wait's task after the clear, as Airflow's task context has it
        task_id, try_number = "stage_1.wait", 2

        @staticmethod
        def xcom_pull(task_ids):
            return trials if task_ids == "stage_1.start" else None

        @staticmethod
        def get_task_states(dag_id, task_ids, run_ids):
            return {"manual__1": {"stage_1.wait_0": None, "stage_1.wait_1": "failed"}}

    sensor = TrialResultSensor(task_id="wait", run_uri=storage.uri, trial="trial-0000", stage=1,
                               spec_path=str(spec), deferrable=True)
    with pytest.raises(TaskDeferred):
        sensor.execute({"dag": SimpleNamespace(dag_id="clear_test"), "run_id": "manual__1", "ti": Clear1Ti(),
                        "dag_run": SimpleNamespace(clear_number=1)})
    [retry] = storage.retries(1)
    assert retry["trials"] == ["trial-0000"]
    assert [t["trial"] for t in storage.assignments(instance)] == ["trial-0000"]
