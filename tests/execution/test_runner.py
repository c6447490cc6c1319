"""The stage functions the tuning DAG's tasks call, on the model page's worked example.

The backend here only keeps a ledger (no processes): what is tested is the runner's stage
logic, which the DAG's tasks and `run_sha` share, against docs/planning-model.md section 4.
"""

import os
import signal
import time

import pytest

from rubberband_airflow.execution import recovery, runner
from rubberband_airflow.execution.backends.base import ComputeBackend, Market
from rubberband_airflow.execution.runner import RunPlan, StageFailed
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.plan import parse_plan
from rubberband_airflow.planning.problem import parse_problem
from tests.conftest import WORKED_PLAN


class LedgerBackend(ComputeBackend):
    """Instances that are running as soon as they are launched; only the ledger is kept."""

    def __init__(self, storage: RunStorage) -> None:
        self.storage = storage

    def launch(self, batch: str, count: int, market: Market | None = None) -> list[str]:
        existing = [e["instance"] for e in self.storage.ledger() if e["batch"] == batch]
        if existing:
            return existing
        now = time.time()
        ids = [f"{batch}-{k}" for k in range(count)]
        for i in ids:
            self.storage.write_ledger({"instance": i, "batch": batch, "type": "p3.8xlarge", "requested": now,
                                       "running": now, "terminated": None})
            time.sleep(0.001)  # distinct request times: LIFO is by request order
        return ids

    def describe(self, instances: list[str]) -> dict[str, str]:
        return {i: "running" for i in instances}

    def terminate(self, instances: list[str]) -> None:
        for e in self.storage.ledger():
            if e["instance"] in instances and e["terminated"] is None:
                self.storage.write_ledger({**e, "terminated": time.time()})


@pytest.fixture
def worked(resnet_problem):
    problem = parse_problem(resnet_problem)
    return RunPlan(problem, parse_plan(WORKED_PLAN, problem))


@pytest.fixture
def started(tmp_path, worked):
    storage = RunStorage(f"file://{tmp_path}/run")
    configs = [{"x": k} for k in range(worked.sha.num_trials)]
    runner.start_run(storage, runner.RunSpec("m:f", "acc"), configs, worked.to_json(), 4)
    return storage, LedgerBackend(storage)


def test_plan_json_round_trips(worked):
    again = RunPlan.from_json(worked.to_json())
    assert again == worked
    assert [s["trials"] for s in worked.to_json()["stages"]] == [64, 16, 4, 1]


def test_trial_seconds_are_the_model_pages(worked):
    # Section 4's worked example: trials of 80 s, 200 s, 740 s and one 4-GPU trial of 884 s.
    assert [worked.trial_seconds(i) for i in range(1, 5)] == [80, 200, 740, 884]
    assert [worked.slots_per_instance(i) for i in range(1, 5)] == [4, 4, 4, 1]
    assert worked.launch_seconds == 130


def test_scale_targets_launch_the_missing_and_drop_the_newest_first():
    assert runner.scale_targets(["a", "b"], 5) == (3, [])
    assert runner.scale_targets(["a", "b", "c", "d"], 1) == (0, ["d", "c", "b"])
    assert runner.scale_targets([], 0) == (0, [])
    assert [(b.name, b.count) for b in runner.launch_batches(2, 19, 8)] == [
        ("stage-2-batch-0", 8), ("stage-2-batch-1", 8), ("stage-2-batch-2", 3)]
    assert runner.launch_batches(1, 0, 8) == []
    # After a clear that continues the attempt, batches are new: none the earlier teardown ended is adopted.
    assert [b.name for b in runner.launch_batches(2, 9, 8, continued=1)] == ["stage-2-batch-0-clear-1",
                                                                           "stage-2-batch-1-clear-1"]


def _finish(storage: RunStorage, stage: int, metric=lambda t: int(t.split("-")[1]), skip=()) -> None:
    for t in runner.stage_trials(storage, stage):
        if t not in skip:
            storage.write_result(t, stage, {"state": "done", "stage": stage, "metric": metric(t)})


def _place_stage_1(storage: RunStorage, backend, worked) -> None:
    """Stage 1 of the worked example launched and placed."""
    for batch in runner.scale_out(backend, worked, 1, 8):
        backend.launch(batch.name, batch.count)
    runner.stage_placement(storage, backend, worked, 1)


def test_stages_of_the_worked_example(started, worked):
    storage, backend = started
    sizes, epochs = [], []
    for stage in range(1, 5):
        runner.begin_stage(storage, stage)
        for batch in runner.scale_in(backend, worked, stage, batch_size=2):
            backend.terminate(batch)
        for batch in runner.scale_out(backend, worked, stage, batch_size=3):
            backend.launch(batch.name, batch.count)
        placement = runner.stage_placement(storage, backend, worked, stage)
        sizes.append({i: len(tasks) for i, tasks in placement.items()})
        epochs.append({(t["start_epoch"], t["stop_epoch"], t["gpus"]) for tasks in placement.values() for t in tasks})
        _finish(storage, stage)
        outcome = runner.promote_stage(storage, backend, worked, stage, "max")
        assert outcome.failed == [] and outcome.last == (stage == 4)
    # 4 instances launched in batches of 3 and 1; 64 trials on 16 slots, then 16; stage 3 keeps the oldest.
    assert sizes[0] == {"stage-1-batch-0-0": 16, "stage-1-batch-0-1": 16, "stage-1-batch-0-2": 16,
                        "stage-1-batch-1-0": 16}
    assert list(sizes[1].values()) == [4, 4, 4, 4]
    assert sizes[2] == {"stage-1-batch-0-0": 4} and sizes[3] == {"stage-1-batch-0-0": 1}
    assert epochs == [{(0, 1, 1)}, {(1, 4, 1)}, {(4, 16, 1)}, {(16, 64, 4)}]
    # Promotion kept the highest metrics: trials 63..48, then 63..60, then 63.
    assert runner.stage_trials(storage, 4) == ["trial-0063"]
    assert backend.live() == []  # the last stage released the fleet


def test_placement_expects_unready_instances_after_launch_latency(started, worked):
    storage, backend = started
    (old,) = backend.launch("old", 1)
    storage.write_json({"instance": old, "time": time.time()}, "instances", old, "heartbeat.json")
    (new,) = backend.launch("new", 1)
    placement = runner.stage_placement(storage, backend, worked, 1)
    # Trials of 80 s; the old instance's 4 slots start trials at 0, 80, 160, ... and the new one's,
    # ready after 130 s of pending and boot, at 130, 210, ...: of 64 trials, 36 and 28.
    assert {i: len(tasks) for i, tasks in placement.items()} == {old: 36, new: 28}
    assert [t["trial"] for t in placement[old][:9]] == [f"trial-{k:04d}" for k in (0, 1, 2, 3, 4, 5, 6, 7, 12)]


def test_promotion_records_missing_results_and_never_promotes_failures(started, worked):
    storage, backend = started
    runner.begin_stage(storage, 1)
    _place_stage_1(storage, backend, worked)
    _finish(storage, 1, metric=lambda t: -int(t.split("-")[1]), skip={"trial-0000", "trial-0001", "trial-0002"})
    storage.write_result("trial-0002", 1, {"state": "failed", "stage": 1, "error": "NaN loss"})
    outcome = runner.promote_stage(storage, backend, worked, 1, "min")
    assert outcome.failed == ["trial-0000", "trial-0001", "trial-0002"]
    assert storage.read_result("trial-0000", 1) == {"state": "failed", "stage": 1, "error": "no result was recorded"}
    # mode min: the lowest metrics, i.e. the highest trial numbers, 16 of them (n_2 = 64 / 4)
    assert outcome.promoted == [f"trial-{k:04d}" for k in range(63, 47, -1)]
    assert runner.stage_trials(storage, 2) == outcome.promoted
    assert len(backend.live()) == 4  # not the last stage: the fleet stays


def test_a_stage_where_every_trial_failed_is_an_error(started, worked):
    storage, backend = started
    with pytest.raises(StageFailed, match="every trial of stage 1 failed"):
        runner.promote_stage(storage, backend, worked, 1, "max")
    assert storage.exists("stages", "1", "end.json")


def test_a_retried_promotion_promotes_the_same_trials_and_keeps_the_stage_end(started, worked):
    storage, backend = started
    _place_stage_1(storage, backend, worked)
    _finish(storage, 1, skip={"trial-0063"})
    first = runner.promote_stage(storage, backend, worked, 1, "max")
    ended = storage.read_json("stages", "1", "end.json")
    again = runner.promote_stage(storage, backend, worked, 1, "max")  # the promote task's retry
    assert again == first and storage.read_json("stages", "1", "end.json") == ended
    assert runner.stage_trials(storage, 2) == first.promoted and "trial-0063" in first.failed
    assert storage.read_result("trial-0063", 1)["error"] == "no result was recorded"


def test_the_next_stage_s_start_and_the_stage_s_promote_promote_it_once_and_agree(started, worked):
    """Both end the stage at the same time (the next start promotes it, off its promote task's path)."""
    from concurrent.futures import ThreadPoolExecutor

    storage, backend = started
    _place_stage_1(storage, backend, worked)
    _finish(storage, 1, skip={"trial-0007"})
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: runner.promote_stage(storage, backend, worked, 1, "max"), range(2)))
    assert outcomes[0] == outcomes[1] and outcomes[0].failed == ["trial-0007"]
    assert runner.stage_trials(storage, 2) == outcomes[0].promoted and len(outcomes[0].promoted) == 16
    # The late result of the trial recorded as failed cannot change the stage's outcome afterwards.
    assert not storage.write_result("trial-0007", 1, {"state": "done", "stage": 1, "metric": 10**6})
    assert runner.promote_stage(storage, backend, worked, 1, "max") == outcomes[0]
    # A stage where every trial failed fails both, and leaves no claim behind for a retry to wait on.
    with ThreadPoolExecutor(2) as pool:
        errors = list(pool.map(lambda _: pytest.raises(StageFailed, runner.promote_stage, storage, backend, worked,
                                                       2, "max"), range(2)))
    assert all("every trial of stage 2 failed" in str(e.value) for e in errors)
    assert not storage.exists("stages", "2", "promoted.claim") and not storage.exists("stages", "2", "promoted.json")


def test_a_start_killed_mid_promotion_is_taken_over_by_its_retry_at_once(started, worked):
    """The task process that claimed the promotion is killed (SIGKILL) before writing it: its retry on
    the same host sees the claimant gone and promotes, not waiting out the claim's 5 minutes."""
    import multiprocessing

    storage, backend = started
    _place_stage_1(storage, backend, worked)
    _finish(storage, 1)
    claimed = multiprocessing.get_context("fork").Event()

    def killed_start() -> None:  # claims the promotion, then hangs in it until killed
        recovery.once(storage, ("stages", "1", "promoted.json"), lambda: (claimed.set(), time.sleep(600)),
                      "the promotion of stage 1")

    proc = multiprocessing.get_context("fork").Process(target=killed_start)
    proc.start()
    assert claimed.wait(30)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    # Had the claimant been in another container sharing this host's name (host networking), its
    # process id would mean nothing here: such a claim is left alone until it is stale.
    held = storage.read_json("stages", "1", "promoted.claim")
    storage.write_json({**held, "pid_space": f"{held['pid_space'].split()[0]} another-pid-namespace"}, "stages", "1",
                       "promoted.claim")
    with pytest.raises(RuntimeError, match="claimed by another task"):
        recovery.once(storage, ("stages", "1", "promoted.json"), lambda: {}, "the promotion of stage 1", wait=1.5)
    storage.write_json(held, "stages", "1", "promoted.claim")
    began = time.monotonic()
    outcome = runner.promote_stage(storage, backend, worked, 1, "max")  # the retry
    assert time.monotonic() - began < 30
    assert outcome.failed == [] and runner.stage_trials(storage, 2) == outcome.promoted != []


def test_a_promotion_failed_in_a_storage_error_burst_is_tried_again_at_once_by_its_own_task(
        tmp_path, worked, monkeypatch):
    """Storage fails mid-promotion, and fails the deletion of the promotion's claim too: the same task,
    trying again once storage is back, takes over the claim it left, not waiting out its 5 minutes;
    a claim another thread of the process holds is still waited for."""
    from rubberband_airflow.execution import recovery
    from tests.flaky_fs import STORM, STORM_HERE, register

    register()
    storm = tmp_path / "storm"
    monkeypatch.setenv(STORM, str(storm))
    monkeypatch.setenv(STORM_HERE, "1")
    storage = RunStorage(f"flaky://{tmp_path}/run")
    backend = LedgerBackend(storage)
    runner.start_run(storage, runner.RunSpec("m:f", "acc"), [{"x": k} for k in range(worked.sha.num_trials)],
                     worked.to_json(), 4)
    _place_stage_1(storage, backend, worked)
    _finish(storage, 1)

    def promote_in_the_storm() -> dict:
        storm.touch()  # storage fails from here: the promotion's reads, then the claim's deletion
        return runner._promote_stage(storage, backend, worked, 1, "max")

    with pytest.raises(OSError, match="injected"):
        recovery.once(storage, ("stages", "1", "promoted.json"), promote_in_the_storm, "the promotion of stage 1")
    storm.unlink()
    assert storage.read_json("stages", "1", "promoted.claim")["pid"] == os.getpid()  # left behind
    began = time.monotonic()
    outcome = runner.promote_stage(storage, backend, worked, 1, "max")  # the task, trying again
    assert time.monotonic() - began < 10
    assert outcome.failed == [] and runner.stage_trials(storage, 2) == outcome.promoted != []
    # A claim this process is making now (another thread's) is not taken for abandoned.
    recovery._CLAIMING.add("busy")
    try:
        storage.write_json({"time": time.time(), "pid": os.getpid(), "pid_space": recovery._pid_space(),
                            "token": "busy"}, "stages", "2", "promoted.claim")
        with pytest.raises(RuntimeError, match="claimed by another task"):
            recovery.once(storage, ("stages", "2", "promoted.json"), lambda: {}, "the promotion of stage 2", wait=1.5)
    finally:
        recovery._CLAIMING.discard("busy")


def test_a_clear_runs_the_failed_trials_of_a_torn_down_stage_again_as_a_new_try(started, worked):
    storage, backend = started
    for batch in runner.scale_out(backend, worked, 1, 8):
        backend.launch(batch.name, batch.count)
    runner.stage_placement(storage, backend, worked, 1, clear=0)
    failed = {"trial-0005", "trial-0009"}
    _finish(storage, 1, skip=failed)
    for t in failed:
        storage.write_result(t, 1, {"state": "failed", "stage": 1, "error": "CUDA error"})
    runner.stop_instances(storage, backend)  # the teardown of the run, which then failed
    assert not runner.rerun_due(storage, "trial-0005", 1, task_try=2)  # its wait has not reported it yet
    for t in failed:  # their waits fail, in the first try of their tasks
        runner.report_failure(storage, t, 1, task_try=1)
    assert not runner.rerun_due(storage, "trial-0005", 1, task_try=1)  # the same try: not cleared since
    assert not runner.rerun_due(storage, "trial-0000", 1, task_try=2)  # finished: kept
    assert runner.rerun_due(storage, "trial-0005", 1, task_try=2)  # its wait cleared: a new try of its task

    record = runner.rerun_failed(storage, backend, worked, 1, clear=1)
    assert runner.rerun_failed(storage, backend, worked, 1, clear=1) == record  # the stage's other waits
    assert record["try"] == 2 and sorted(record["trials"]) == sorted(failed)
    # The run had no live instance: the try launched its own (slots of 4 GPUs, 1 per trial: one instance).
    assert record["launched"]["instances"] == backend.live() == ["stage-1-retry-2-0"]
    tasks = list(storage.assignments("stage-1-retry-2-0"))
    assert sorted(t["trial"] for t in tasks) == sorted(failed) and {t["try"] for t in tasks} == {2}
    assert all(t["start_epoch"] == 0 and t["stop_epoch"] == worked.sha.epochs(1) for t in tasks)
    # The newest try counts: it has no result yet; the first try's failure is kept beside it.
    assert storage.read_result("trial-0005", 1) is None
    assert storage.read_result("trial-0005", 1, 1)["error"] == "CUDA error"
    assert not runner.rerun_due(storage, "trial-0005", 1, task_try=2)  # its new try has no result yet
    # The triggers' shared listing of the stage's results waits for the new try too.
    assert not failed & storage.stage_results(1) and "trial-0000" in storage.stage_results(1)
    # Results are written once per try: a late writer of the first try changes nothing.
    assert not storage.write_result("trial-0005", 1, {"state": "done", "stage": 1, "metric": 99}, 1)
    assert storage.write_result("trial-0005", 1, {"state": "done", "stage": 1, "metric": 100}, 2)
    assert not storage.write_result("trial-0005", 1, {"state": "failed", "stage": 1, "error": "late"}, 2)
    storage.write_result("trial-0009", 1, {"state": "failed", "stage": 1, "error": "NaN loss"}, 2)
    assert failed <= storage.stage_results(1)
    assert (storage.root + "/trials/trial-0005/stage-1.try-2.json") in storage.fs.ls(storage.path("trials",
                                                                                                  "trial-0005"))
    outcome = runner.promote_stage(storage, backend, worked, 1, "max")
    assert outcome.promoted[0] == "trial-0005" and outcome.failed == ["trial-0009"]
    # A try that fails again is not run again by the clear that ran it, nor, once the stage is
    # promoted, by a later clear: the run went on.
    assert not runner.rerun_due(storage, "trial-0009", 1, task_try=2)
    runner.report_failure(storage, "trial-0009", 1, task_try=2)
    assert runner.cleared_since_failure(storage, "trial-0009", 1, task_try=3)
    assert not runner.rerun_due(storage, "trial-0009", 1, task_try=3)


def test_a_trial_run_again_after_a_clear_is_recovered_afresh_when_its_instance_is_lost(started, worked):
    """A trial fails when its instance is lost MAX_RECOVERIES times in a stage; the count is its
    try's: run again by a clear, it is placed again when its new instance is lost."""
    storage, backend = started
    _place_stage_1(storage, backend, worked)
    trial = "trial-0005"
    for _ in range(recovery.MAX_RECOVERIES):
        lost = recovery.trial_instances(storage, 1)[trial][0]
        record = runner.recover_trials(storage, backend, worked, 1, lost, "the instance is gone")
    assert record["moved"][trial] is None
    assert f"lost {recovery.MAX_RECOVERIES} times" in storage.read_result(trial, 1)["error"]
    runner.report_failure(storage, trial, 1, task_try=1)  # its wait fails; the user clears it
    assert trial in runner.rerun_failed(storage, backend, worked, 1, clear=1)["trials"]
    lost = recovery.trial_instances(storage, 1)[trial][0]
    record = runner.recover_trials(storage, backend, worked, 1, lost, "the instance is gone")
    assert record["moved"][trial] is not None and storage.read_result(trial, 1) is None
    assert recovery.trial_instances(storage, 1)[trial][1]["try"] == 2


def test_a_lost_instances_trial_is_not_placed_on_an_instance_being_recovered_or_hung(tmp_path, started, worked):
    """Two instances lost at once (a partition) are recovered concurrently, each by its own claim:
    the first recovery must not move its trials onto the other, which its own recovery, already
    under way, is terminating (the trial would then be failed as lost there); nor onto a hung one."""
    storage, backend = started
    x, w, v, u = backend.launch("stage-1-batch-0", 4)
    task = {"trial": "trial-0003", "gpus": worked.allocation(1).gpus_per_trial, "start_epoch": 0, "stop_epoch": 1}
    runner.assign_stage(storage, 1, {x: [task], w: [], v: [], u: []})
    now = time.time()
    for i in (x, w, v, u):
        storage.write_json({"state": "running", "time": now, "tasks": []}, "instances", i, "heartbeat.json")
    beat = tmp_path / "run" / "instances" / v / "heartbeat.json"  # v's agent hung: its heartbeat stands still
    os.utime(beat, (now - recovery.HUNG_SECONDS - 60, now - recovery.HUNG_SECONDS - 60))
    storage.write_json({"time": now, "pid": 1, "pid_space": "elsewhere", "token": "t"},
                       "stages", "1", "recovery", f"{w}.claim")  # w's recovery has begun
    record = runner.recover_trials(storage, backend, worked, 1, x, "the instance is gone")
    assert record["moved"]["trial-0003"] == u  # the healthy idle instance, not w nor v
    assert recovery.trial_instance(storage, "trial-0003", 1) == u


def test_a_new_attempt_keeps_what_the_earlier_one_finished_and_places_only_the_rest(tmp_path, started, worked):
    earlier, backend = started
    for batch in runner.scale_out(backend, worked, 1, 8):
        backend.launch(batch.name, batch.count)
    runner.stage_placement(earlier, backend, worked, 1)
    _finish(earlier, 1, skip={"trial-0003"})
    earlier.write_result("trial-0003", 1, {"state": "failed", "stage": 1, "error": "NaN loss"})
    earlier.append_metrics("trial-0007", {"epoch": 1, "acc": 0.5})
    earlier.write_bytes(b"state of trial-0007", "trials", "trial-0007", "checkpoint.pt")
    runner.stop_instances(earlier, backend)

    storage = RunStorage(f"file://{tmp_path}/run.attempt-2")
    configs = [{"x": k} for k in range(worked.sha.num_trials)]
    runner.start_run(storage, runner.RunSpec("m:f", "acc"), configs, worked.to_json(), 4)
    record = runner.carry_over(earlier, storage, 1)
    assert record["from_attempt"] == 1 and len(record["results"]["1"]) == worked.sha.num_trials - 1
    kept = storage.read_result("trial-0007", 1)
    assert kept["state"] == "done" and kept["metric"] == 7 and kept["carried_from"] == 1
    assert storage.read_result("trial-0003", 1) is None  # the failure is not kept: it runs again
    assert storage.metrics("trial-0007") == [{"epoch": 1, "acc": 0.5}]
    assert storage.read_bytes("trials", "trial-0007", "checkpoint.pt") == b"state of trial-0007"
    # The stage has one trial to run: the plan's instances, and only that trial is placed.
    new = LedgerBackend(storage)
    assert runner.unfinished(storage, 1) == ["trial-0003"]
    for batch in runner.scale_out(new, worked, 1, 8):
        new.launch(batch.name, batch.count)
    placement = runner.stage_placement(storage, new, worked, 1)
    assert [t["trial"] for tasks in placement.values() for t in tasks] == ["trial-0003"]
    storage.write_result("trial-0003", 1, {"state": "done", "stage": 1, "metric": 3})
    outcome = runner.promote_stage(storage, new, worked, 1, "max")
    assert outcome.failed == [] and outcome.promoted == [f"trial-{k:04d}" for k in range(63, 47, -1)]
    # A stage whose every result is kept launches nothing (and drops what is live).
    for t in runner.stage_trials(storage, 2):
        storage.write_result(t, 2, {"state": "done", "stage": 2, "metric": 1, "carried_from": 1})
    assert runner.wanted_instances(storage, worked, 2) == 0
    assert runner.scale_out(new, worked, 2, 8) == [] and runner.scale_in(new, worked, 2, 8)
