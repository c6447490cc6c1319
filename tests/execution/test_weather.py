"""A night's weather: storage error bursts, hung agents, late and duplicate writes, long stages.

Each test injects the fault into real agent processes (or real concurrent writers) and checks
what a user would: the trial's result, the agents still alive or retired, nothing left running.
"""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rubberband_airflow.execution import recovery, runner, worker
from rubberband_airflow.execution.agent import imds_instance_id
from rubberband_airflow.execution.backends.base import billed_cost
from rubberband_airflow.execution.backends.local import LocalBackend, LocalInstanceType
from rubberband_airflow.execution.runner import RunPlan, RunSpec, TrialTimeout, assign_stage, start_run
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.report import build_report
from tests.execution.conftest import agent_processes, plan_json
from tests.execution.moto_cloud import BUCKET, moto_cloud  # noqa: F401 (the fixture)
from tests.execution.test_runner import LedgerBackend, started, worked  # noqa: F401 (fixtures)
from tests.flaky_fs import S3Storm, register, storm_env

SPEC = RunSpec("tests.trainables:sleepy", "accuracy", "max", seed=1)


def _task(trial, start=0, stop=1, limit=None):
    task = {"trial": trial, "gpus": 1, "start_epoch": start, "stop_epoch": stop}
    return task if limit is None else {**task, "limit_seconds": limit}


def _wait_for(predicate, timeout=60.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# --- time limits that fit the work -------------------------------------------------------------


def test_a_long_final_stage_completes_and_a_hang_is_still_caught(storage, local_backend, env):
    """Stage 2 trains 3 epochs (9 s) where the flat 8 s limit of old would kill it; a hung trial
    of stage 1 still fails, as timed out, at its stage's limit."""
    env["RUBBERBAND_TEST_EPOCH_SECONDS"] = "3"
    plan = plan_json("local-1", 1, [(1, 2), (1, 1)], num_trials=4, eta=4, min_epochs=1, epoch_seconds=2.0)
    configs = [{"x": 0.1}, {"x": 0.3, "hang": True}, {"x": 0.2}, {"x": 0.05}]
    timeout = TrialTimeout(factor=4, floor_seconds=8)
    run_plan = RunPlan.from_json(plan)
    assert run_plan.trial_limit(1, timeout) == 12 and run_plan.trial_limit(2, timeout) == 28
    summary = runner.run_sha(storage, local_backend(), SPEC, configs, plan, stage_timeout=120, trial_timeout=timeout)
    hung = storage.read_result("trial-0001", 1)
    assert hung["state"] == "failed" and "timed out after 12 s" in hung["error"], hung
    final = storage.read_result("trial-0002", 2)
    assert final["state"] == "done" and final["finished"] - final["started"] > timeout.floor_seconds, final
    assert summary["best"]["trial"] == "trial-0002"
    placed = storage.read_json("stages", "2", "placement.json")["placement"]
    assert [t["limit_seconds"] for tasks in placed.values() for t in tasks] == [28]
    assert agent_processes(storage) == []


def test_an_older_spec_s_flat_timeout_is_the_floor():
    from rubberband_airflow.spec import SpecError, parse_spec

    base = {"name": "t", "trainable": "m:f", "metric": "acc", "search_space": {"x": {"type": "uniform", "low": 0,
            "high": 1}}, "sha": {"num_trials": 4, "eta": 2, "min_epochs": 1}, "deadline_seconds": 60,
            "backend": {"type": "local", "instance_type": "l", "slots": 1, "price_per_hour": 1, "max_instances": 1},
            "storage": "file:///tmp/x", "profile": "/tmp/p.json"}
    assert parse_spec(base, "s.yaml").trial_timeout == TrialTimeout(3.0, 600.0)
    assert parse_spec({**base, "trial_timeout_seconds": 300}, "s.yaml").trial_timeout == TrialTimeout(3.0, 300.0)
    spec = parse_spec({**base, "trial_timeout": {"factor": 2, "floor_seconds": 60}}, "s.yaml")
    assert spec.trial_timeout == TrialTimeout(2.0, 60.0)
    with pytest.raises(SpecError, match="trial_timeout.factor: must be positive"):
        parse_spec({**base, "trial_timeout": {"factor": 0}}, "s.yaml")
    with pytest.raises(SpecError, match="trial_timeout.floor: unknown key"):
        parse_spec({**base, "trial_timeout": {"floor": 5}}, "s.yaml")
    with pytest.raises(SpecError, match="trial_timeout_seconds: give trial_timeout"):
        parse_spec({**base, "trial_timeout": {"factor": 2}, "trial_timeout_seconds": 5}, "s.yaml")


def test_an_agent_idles_longer_than_any_stage_it_can_wait_through(resnet_problem):
    from rubberband_airflow.planning.plan import parse_plan
    from rubberband_airflow.planning.problem import parse_problem
    from tests.conftest import WORKED_PLAN

    problem = parse_problem(resnet_problem)
    run_plan = RunPlan(problem, parse_plan(WORKED_PLAN, problem))
    timeout = TrialTimeout()
    idle = run_plan.agent_idle_seconds(timeout)
    for stage in range(1, run_plan.stages + 1):
        a = run_plan.allocation(stage)
        waves = -(-run_plan.sha.trials(stage) // (a.instances * run_plan.slots_per_instance(stage)))
        assert idle > waves * run_plan.trial_limit(stage, timeout) + run_plan.launch_seconds


def test_an_idle_local_agent_exits_by_itself(storage, env):
    """No orchestrator comes back: the local agent ends after its idle limit, as an EC2 one does."""
    backend = LocalBackend(storage, LocalInstanceType("local-1", 1), env=env, idle_timeout=2.0)
    [instance] = backend.launch("stage-1", 1)
    _wait_for(lambda: backend.describe([instance]) == {instance: "terminated"}, 60, "the idle agent to exit")
    assert storage.heartbeat(instance)["idle_exit"] is True
    assert runner.reconcile(backend) == [] and agent_processes(storage) == []


# --- write-once results ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "s3"])
def test_of_two_concurrent_writers_of_one_result_exactly_one_wins(tmp_path, where, request):
    if where == "s3":
        storage = request.getfixturevalue("moto_cloud").storage("tune/run-once")
    else:
        storage = RunStorage(f"file://{tmp_path}/run")
    barrier = threading.Barrier(8)

    def write(k):
        barrier.wait()
        return storage.write_result("trial-0000", 1, {"state": "done", "metric": k})

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(write, range(8)))
    assert won.count(True) == 1
    assert storage.read_result("trial-0000", 1)["metric"] == won.index(True)
    assert storage.listdir("trials", "trial-0000") == ["stage-1.json"]  # no temporary left behind


def test_a_result_another_process_writes_is_seen_after_its_trial_folder_was_listed(moto_cloud):
    """s3fs lists the parent of an empty folder and caches it: a watcher that polled a trial's
    metrics before its first epoch must still see the result the agent writes later."""
    storage = moto_cloud.storage("tune/run-seen")
    storage.write_config("trial-0000", {"x": 0.5})
    assert storage.metrics("trial-0000") == []
    moto_cloud.client("s3").put_object(Bucket=BUCKET, Key="tune/run-seen/trials/trial-0000/stage-1.json",
                                       Body=b'{"state": "done"}')  # the agent, in a process of its own
    assert storage.read_result("trial-0000", 1) == {"state": "done"}
    assert runner.stage_results(storage, 1, ["trial-0000"]) == {"trial-0000": {"state": "done"}}


def test_a_late_result_after_promotion_cannot_overwrite_the_recorded_one(storage):
    plan = plan_json("local-1", 1, [(1, 2), (1, 1)], num_trials=2, eta=2, min_epochs=1)
    start_run(storage, RunSpec("tests.trainables:plain", "accuracy", "max"), [{"lr": 0.1}, {"lr": 0.2}], plan, 1)
    storage.write_assignment(1, "i0", [_task("trial-0000"), _task("trial-0001")])
    assert worker.run_task(storage.uri, "trial-0000", 1, "i0", []) == 0
    outcome = runner.promote_stage(storage, LedgerBackend(storage), RunPlan.from_json(plan), 1, "max")
    assert outcome.failed == ["trial-0001"] and outcome.promoted == ["trial-0000"]
    worker.run_task(storage.uri, "trial-0001", 1, "i0", [])  # the late worker finishes after all
    late = storage.read_result("trial-0001", 1)
    assert late["state"] == "failed" and late["error"] == "no result was recorded"


def test_a_retried_place_returns_the_placement_it_wrote(started):
    storage, backend = started
    run_plan = RunPlan.from_json(storage.read_json("plan.json"))
    backend.launch("stage-1-batch-0", 2)
    barrier = threading.Barrier(4)

    def place(_):
        barrier.wait()
        return runner.stage_placement(storage, backend, run_plan, 1)

    with ThreadPoolExecutor(4) as pool:  # concurrent attempts: one placement
        first, *others = list(pool.map(place, range(4)))
    assert others == [first] * 3
    backend.launch("stage-1-batch-1", 3)  # the fleet changed before the retry
    assert runner.stage_placement(storage, backend, run_plan, 1) == first
    placed = [t["trial"] for tasks in first.values() for t in tasks]
    assert sorted(placed) == runner.stage_trials(storage, 1)  # each trial once, on one instance
    assert set(storage.listdir("stages", "1")) == {"trials.json", "placement.json", *(f"{i}.json" for i in first)}
    assert all(storage.read_json("stages", "1", f"{i}.json")["tasks"] == tasks for i, tasks in first.items())


def test_metrics_of_concurrent_epochs_do_not_interleave(storage):
    def report(epoch):
        storage.append_metrics("trial-0000", {"epoch": epoch, "accuracy": epoch / 100})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(report, range(1, 41)))
    report(7)  # a retried epoch replaces its record
    assert [m["epoch"] for m in storage.metrics("trial-0000")] == list(range(1, 41))


# --- agents that survive weather ---------------------------------------------------------------


def test_an_agent_and_its_worker_ride_out_a_storage_error_burst_and_the_trial_completes(tmp_path, env):
    """Every storage call of the agent and of its trial's worker fails for 6 s while the trial
    trains (its second epoch's metrics are written in the burst): both back off, the trial
    finishes with every epoch recorded, and the agent takes the next stage's work."""
    env = storm_env(tmp_path, {**env, "RUBBERBAND_TEST_EPOCH_SECONDS": "5"})
    storm = tmp_path / "storm"
    register()
    storage = RunStorage(f"flaky://{tmp_path}/run")  # this process feels no storm: it has no storm variable
    start_run(storage, SPEC, [{"x": 0.5}], {"instance_type": "local", "stages": []}, 1)
    backend = LocalBackend(storage, LocalInstanceType("local-1", 1), trial_timeout=120, env=env)
    try:
        [instance] = backend.launch("stage-1", 1)
        assign_stage(storage, 1, {instance: [_task("trial-0000", stop=2)]})
        _wait_for(lambda: storage.metrics("trial-0000"), 60, "the trial's first epoch")
        storm.touch()
        time.sleep(6)
        storm.unlink()
        hits = [line.split()[1] for line in (tmp_path / "storm.hits").read_text().splitlines()]
        assert hits.count("agent.py") >= 2, "the agent should have met the storm"
        assert "worker.py" in hits, "the worker should have met the storm"
        _wait_for(lambda: storage.read_result("trial-0000", 1) is not None, 60, "the trial's result")
        assert storage.read_result("trial-0000", 1)["state"] == "done", storage.read_result("trial-0000", 1)
        assert [m["epoch"] for m in storage.metrics("trial-0000")] == [1, 2]
        assert backend.describe([instance]) == {instance: "running"}
        assign_stage(storage, 2, {instance: [_task("trial-0000", start=2, stop=3)]})
        _wait_for(lambda: storage.read_result("trial-0000", 2) is not None, 60, "the next stage's result")
        assert storage.read_result("trial-0000", 2)["state"] == "done"
    finally:
        backend.terminate_all()
    assert agent_processes(storage) == []


def test_a_hung_agent_is_retired_and_its_instance_terminated(storage, local_backend):
    backend = local_backend()
    first, second = backend.launch("stage-1", 2)
    _wait_for(lambda: storage.heartbeat(first) and storage.heartbeat(second), 60, "both agents")
    pid = storage.heartbeat(first)["pid"]
    os.kill(pid, signal.SIGSTOP)  # hung: alive to the OS, silent to the run
    try:
        time.sleep(9)
        assert runner.reconcile(backend, hung_after=8) == [second]
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    retired = storage.read_json("instances", first, "retired.json")
    assert "heartbeat has not changed" in retired["reason"]
    assert next(e for e in storage.ledger() if e["instance"] == first)["terminated"] is not None
    assert backend.describe([first]) == {first: "terminated"}
    assert [p.pid for p in agent_processes(storage)] == [storage.heartbeat(second)["pid"]]
    backend.terminate_all()


def test_a_fresh_heartbeat_with_a_trial_far_past_its_limit_is_a_hung_agent():
    now = 10_000.0
    beat = {"time": now, "state": "ready", "tasks": [{"stage": 2, "trial": "trial-0003", "started": now - 1000,
                                                      "limit_seconds": 600}]}
    assert "has not ended trial-0003 of stage 2, 400 s past its limit of 600 s" in runner.hung_reason(beat, now, 300)
    assert runner.hung_reason(beat, now, 500) is None
    assert runner.hung_reason({**beat, "time": now - 400}, now, 300).startswith("its agent's heartbeat")
    assert runner.hung_reason({**beat, "state": "stopping"}, now, 1) is None  # quit, not hung
    assert runner.hung_reason(None, now, 1) is None


def test_an_instance_whose_clock_is_behind_is_not_taken_for_hung_and_a_hung_one_still_is(storage):
    """The instance's clock is 10 minutes behind the orchestrator's: its trial, 0.5 s into a 1 s
    limit by that clock, is not judged overdue at once (as comparing the two clocks would), but
    is once its heartbeat has stood still past the limit and the grace by the watcher's clock."""
    from rubberband_airflow.execution.recovery import LossWatch

    agent_now = time.time() - 600
    storage.write_json({"instance": "i-behind", "time": agent_now, "state": "ready",
                        "tasks": [{"stage": 1, "trial": "trial-0000", "started": agent_now - 0.5,
                                   "limit_seconds": 1.0}]}, "instances", "i-behind", "heartbeat.json")
    watch = LossWatch(storage, None, 1)
    watch.overdue_grace = 1.0
    assert watch.reason("i-behind") is None
    time.sleep(1.0)
    assert watch.reason("i-behind") is None  # 1.5 s in by its clock: within the limit and the grace
    time.sleep(1.6)
    assert "is hung: its agent has not ended trial-0000 of stage 1" in watch.reason("i-behind")
    restarted = LossWatch(storage, None, 1)  # a watcher that starts after the agent froze (a new triggerer)
    restarted.overdue_grace = 1.0
    assert "is hung" in restarted.reason("i-behind")  # the heartbeat's age is the store's to tell: at once
    # Scaling judges staleness by when storage says the heartbeat was written: fresh, not 10 minutes old.
    beat, written = storage.heartbeat("i-behind"), storage.modified("instances")["i-behind/heartbeat.json"]
    assert abs(written - time.time()) < 10
    assert runner.hung_reason(beat, time.time(), 300, written) is None
    assert "has not changed for 3" in runner.hung_reason(beat, time.time() + 330, 300, written)


def test_the_metadata_service_is_asked_again_after_errors(monkeypatch):
    calls = []

    class Flaky(BaseHTTPRequestHandler):
        def _answer(self, body: str) -> None:
            calls.append(self.command)
            code = 500 if len(calls) <= 3 else 200
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body.encode())

        def do_PUT(self):
            self._answer("token")

        def do_GET(self):
            self._answer("i-0123456789abcdef0")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        assert imds_instance_id(timeout=2, patience=30) == "i-0123456789abcdef0"
    finally:
        server.shutdown()
    assert len(calls) >= 5


# --- a night of weather, on either backend ------------------------------------------------------


class Night(threading.Thread):
    """Once the second instance of stage 1 has trained an epoch of its first trial: a storage error
    burst of 6 s for every agent and worker (``storm(True)``, then ``storm(False)``), and that
    instance hangs (its agent's process group stopped, as a frozen machine)."""

    def __init__(self, storage: RunStorage, storm) -> None:
        super().__init__(daemon=True)
        self.storage, self.storm = storage, storm
        self.seen: dict = {}
        self.error: str | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ledger = [e for e in self.storage.ledger() if e.get("batch") == "stage-1-batch-0"]
            beat = (self.storage.heartbeat(ledger[1]["instance"]) or {}) if len(ledger) == 2 else {}
            tasks = beat.get("tasks") or []
            if tasks and self.storage.metrics(tasks[0]["trial"]):
                self.storm(True)
                os.killpg(beat["pid"], signal.SIGSTOP)
                self.seen = {"instance": ledger[1]["instance"], "pid": beat["pid"], "trial": tasks[0]["trial"],
                             "deadline": tasks[0]["started"] + tasks[0]["limit_seconds"], "time": time.time()}
                time.sleep(6)
                self.storm(False)
                return
            time.sleep(0.1)
        self.error = "the fault was never injected: the second instance's first trial never trained an epoch"


def _logs(tmp_path) -> str:
    return "\n".join(f"{p.name}: {p.read_text()[-3000:]}" for p in sorted((tmp_path / "agents").glob("*.log")))


def test_a_night_with_a_storage_error_burst_and_a_hung_instance_loses_no_trial_on_ec2(tmp_path, request,
                                                                                      monkeypatch):
    """Mid-stage, every agent and worker on EC2 meets a storage error burst and one instance hangs:
    the trials on the healthy instance ride out the burst; the hung one's are placed again as soon
    as its heartbeat shows a trial past its limit (not after 5 minutes of silence) and finish; the
    report's cost is the ledger's and nothing is left running. (On the local backend the burst and
    the hang each have a test of their own: above, and in tests/airflow/test_trial_recovery.py.)"""
    from rubberband_airflow.execution import prices
    from rubberband_airflow.execution.backends.ec2 import EC2Backend

    monkeypatch.setattr(recovery, "OVERDUE_GRACE_SECONDS", 2.0)  # of 60 s: for a short test
    cloud = request.getfixturevalue("moto_cloud")
    s3 = S3Storm(cloud.endpoint)
    request.addfinalizer(s3.close)
    # The instances reach S3 through the storm, with botocore's own retries off: the burst
    # reaches the agents' and workers' code.
    cloud.hypervisor.env.update(FSSPEC_S3_ENDPOINT_URL=s3.url, AWS_MAX_ATTEMPTS="1", RUBBERBAND_TEST_EPOCH_SECONDS="1")
    storage = cloud.storage("tune_weather/run-night")
    backend = EC2Backend(storage, "g5.xlarge", cloud.image_id, cloud.subnets, [cloud.security_group],
                         cloud.instance_profile, dag_id="tune_weather", run_id="manual__night",
                         slots=prices.lookup("g5.xlarge").gpus, trial_timeout=120, client=cloud.client("ec2"))
    plan = plan_json("g5.xlarge", 1, [(1, 2)], num_trials=4, eta=2, min_epochs=3)
    night = Night(storage, lambda on: s3.raging.set() if on else s3.raging.clear())
    night.start()
    try:
        out = runner.run_sha(storage, backend, SPEC, [{"x": k / 10} for k in range(4)], plan, stage_timeout=240,
                             trial_timeout=TrialTimeout(factor=2, floor_seconds=45))
    finally:  # the frozen agent ends with its instance; should the test fail first, it ends here
        night.join(timeout=10)
        if night.seen:
            try:
                os.killpg(night.seen["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert night.error is None, night.error
    assert s3.hits > 0, "the storm should have met the instances"
    [stage] = out["stages"]
    results = {t: storage.read_result(t, 1) for t in stage["trials"]}
    assert stage["failed"] == [] and len(results) == 4, ({t: (r or {}).get("error") for t, r in results.items()},
                                                         _logs(tmp_path))
    assert all(r["state"] == "done" for r in results.values()), results

    [record] = recovery.records(storage, 1)
    hung = night.seen["instance"]
    assert record["lost"] == hung and "is hung: its agent has not ended" in record["reason"], record
    assert record["time"] - night.seen["deadline"] < 60  # about the trial's limit, not 300 s of silence
    moved = {t["trial"]: t["to"] for t in record["trials"]}
    assert night.seen["trial"] in moved and all(storage.read_result(t, 1)["instance"] == i for t, i in moved.items())

    report = build_report(storage, "tune_weather")
    [rec] = report["recoveries"]
    assert rec["lost"] == hung
    ledger = storage.ledger()
    assert all(e["terminated"] is not None for e in ledger)
    run_plan = runner.RunPlan.from_json(plan)
    price = {run_plan.instance_type.name: run_plan.instance_type.price_per_hour}
    assert report["actual"]["cost_usd"] == pytest.approx(billed_cost(ledger, price, run_plan.problem.billing)
                                                         + run_plan.problem.data_cost())
    launched = cloud.instances(("pending", "running", "stopping", "stopped", "terminated"),
                               dag_id="tune_weather", run_id=backend.run_id)
    assert {i["InstanceId"] for i in launched} == {e["instance"] for e in ledger}  # the ledger misses none
    assert cloud.instances(dag_id="tune_weather", run_id=backend.run_id) == []
    cloud.hypervisor.sync()
    assert agent_processes(storage) == []


def test_storage_calls_are_tried_again_through_s3s_bad_weather_and_not_when_asked_wrongly(moto_cloud, request):
    """A burst of S3 500s is waited out; a request S3 refuses as wrong fails at once, not after
    the 5 minutes of patience (a misconfigured run should not take 5 minutes a task to fail)."""
    import s3fs

    from rubberband_airflow.execution import backoff

    s3 = S3Storm(moto_cloud.endpoint)
    request.addfinalizer(s3.close)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3.url, skip_instance_cache=True,
                           config_kwargs={"retries": {"max_attempts": 1}})
    path = f"{BUCKET}/tune_weather/asked/x.json"
    s3.raging.set()
    threading.Timer(2.0, s3.raging.clear).start()
    begun = time.monotonic()
    backoff.retry(lambda: fs.pipe_file(path, b"{}"), "writing", patience=60)
    assert 2.0 <= time.monotonic() - begun < 30 and s3.hits > 0
    assert fs.cat_file(path) == b"{}"

    begun = time.monotonic()
    with pytest.raises(OSError, match="storage class") as wrong:
        backoff.retry(lambda: fs.pipe_file(path, b"{}", StorageClass="NO_SUCH_CLASS"), "writing", patience=60)
    assert time.monotonic() - begun < 5 and not backoff.transient(wrong.value)

    s3.raging.set()
    begun = time.monotonic()
    with pytest.raises(OSError) as burst:
        backoff.retry(lambda: fs.cat_file(path), "reading", patience=3)
    assert backoff.transient(burst.value) and 1.5 <= time.monotonic() - begun < 10  # gave up within its patience
