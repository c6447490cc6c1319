"""The tuning DAGs under the real scheduler, triggerer and LocalExecutor on PostgreSQL, triggered by REST."""

import base64
import re
import shutil
import time
import urllib.error
import urllib.parse

import psutil
import pytest

from rubberband_airflow.execution.storage import RunStorage
from tests.execution.moto_cloud import BUCKET, agent_args
from tests.fullstack.conftest import run_folder
from tests.fullstack.ui import CHROMIUM, trigger_from_form


def _agents_of(home) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if "rubberband_airflow.execution" in
            " ".join(p.info["cmdline"] or []) and str(home) in " ".join(p.info["cmdline"] or [])]


def _finished_run(stack, run_id: str) -> tuple[dict[str, str], dict]:
    """The task states and the report of a finished digits run, after checking what every run must show."""
    state = stack.wait_for_run("digits_tuning", run_id)
    states = stack.task_states("digits_tuning", run_id)
    assert state == "success", states
    assert states["plan[-1]"] == "success" and states["teardown[-1]"] == "success"
    rep = RunStorage(f"file://{stack.home}/rubberband/digits_tuning/{run_folder(run_id)}").read_json("report.json")
    assert rep["best"] is not None
    events = stack.api("GET", "/assets/events?limit=100")["asset_events"]
    assert any(e.get("source_run_id") == run_id and e["extra"].get("metric") == rep["best"]["metric"] for e in events)
    assert not _agents_of(stack.home)
    return states, rep


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (scripts/install-test-tools.sh)")
def test_rest_and_trigger_form_runs_override_params_and_behave_the_same(airflow_stack, digits_rest_run, tmp_path):
    stack, rest_id = airflow_stack, digits_rest_run
    rest_states, rest = _finished_run(stack, rest_id)
    waits = [k for k in rest_states if k.startswith("stage_1.wait[")]
    assert len(waits) == 4  # one deferred sensor per trial: the conf's num_trials, not the spec's 8
    assert len(rest["trials"]) == 4 and rest["deadline_seconds"] == 600

    # The same values typed into the trigger form, in a browser (which sends every param, defaults too).
    form_id = trigger_from_form(stack.base, "digits_tuning", {"num_trials": 4, "deadline_seconds": 600},
                                stack.token, tmp_path / "screenshots")
    run = stack.api("GET", f"/dags/digits_tuning/dagRuns/{urllib.parse.quote(form_id, safe='')}")
    assert run["triggered_by"] == "ui" and run["conf"]["num_trials"] == 4
    form_states, form = _finished_run(stack, form_id)
    assert form_states.keys() == rest_states.keys()  # the same tasks, mapped as many times
    assert form["deadline_seconds"] == 600 and form["stages"] and len(form["stages"]) == len(rest["stages"])
    # Same seed, same trials: the form's run sampled the very configurations the REST run did.
    assert {t: v["config"] for t, v in form["trials"].items()} == {t: v["config"] for t, v in rest["trials"].items()}

    # Both runs are on the RubberBand page of the api-server, for a logged-in user only.
    for path in ("/rubberband/", "/rubberband/api/runs"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            stack.request("GET", path, token=None)
        assert refused.value.code == 401
    listed = {r["run"]: r for r in stack.request("GET", "/rubberband/api/runs")["digits_tuning"]}
    for run_id, rep in ((rest_id, rest), (form_id, form)):
        assert listed[run_folder(run_id)]["best"] == rep["best"]
        path = f"/rubberband/api/runs/digits_tuning/{run_folder(run_id)}"
        assert stack.request("GET", path)["actual"] == rep["actual"]


def test_impossible_deadline_fails_the_plan_with_the_fastest_jct(airflow_stack):
    stack = airflow_stack
    stack.wait_for_dag("digits_tuning")
    run_id = stack.trigger("digits_tuning", {"deadline_seconds": 2})
    assert stack.wait_for_run("digits_tuning", run_id) == "failed"
    states = stack.task_states("digits_tuning", run_id)
    assert states["plan[-1]"] == "failed" and states["start_run[-1]"] == "upstream_failed", states
    log = stack.task_log("digits_tuning", run_id, "plan")
    found = re.search(r"no plan meets the deadline of 2 s; the fastest achievable JCT \(at the planner's "
                      r"quantile\) is ([0-9.]+) s with plan local-1 \[", log)
    assert found and float(found.group(1)) > 2, log[-3000:]
    # Planning failed before anything started: no retry, no run files, no agent.
    ti = stack.api("GET", f"/dags/digits_tuning/dagRuns/{run_id}/taskInstances/plan")
    assert ti["try_number"] == 1
    storage = RunStorage(f"file://{stack.home}/rubberband/digits_tuning/{run_folder(run_id)}")
    assert storage.read_json("run.json") is None
    assert not _agents_of(stack.home)


def _interval(ledger: list[dict]) -> tuple[float, float]:
    return min(e["running"] for e in ledger), max(e["terminated"] for e in ledger)


def test_concurrent_ec2_runs_keep_their_instances_apart(airflow_stack, stack_cloud):
    stack, cloud = airflow_stack, stack_cloud
    for dag_id in ("nightly_ec2_tuning", "digits_ec2"):
        stack.wait_for_dag(dag_id)
    runs = {"nightly_ec2_tuning": stack.trigger("nightly_ec2_tuning", {
                "num_trials": 3, "instance_types": ["g5.xlarge"], "max_instances": 2, "deadline_seconds": 1800}),
            "digits_ec2": stack.trigger("digits_ec2", {"num_trials": 2, "max_instances": 2, "deadline_seconds": 900})}
    for dag_id, run_id in runs.items():
        assert stack.wait_for_run(dag_id, run_id, timeout=1500) == "success", stack.task_states(dag_id, run_id)

    ec2 = cloud.client("ec2")
    every = [i for page in ec2.get_paginator("describe_instances").paginate() for r in page["Reservations"]
             for i in r["Instances"]]
    seen: dict[str, set[str]] = {}
    intervals = []
    for dag_id, run_id in runs.items():
        storage = RunStorage(f"s3://{BUCKET}/rubberband/{dag_id}/{run_folder(run_id)}")
        assert storage.read_json("report.json")["best"] is not None
        ledger = storage.ledger()
        mine = {e["instance"] for e in ledger}
        tagged = [i for i in every if {"Key": "rubberband:run_id", "Value": run_id} in i.get("Tags", [])]
        # The run's ledger is its tagged instances, and only they worked on its storage.
        assert mine and mine == {i["InstanceId"] for i in tagged}
        assert set(storage.subfolders("instances")) <= mine
        for i in tagged:
            assert {"Key": "rubberband:dag_id", "Value": dag_id} in i["Tags"]
            user_data = ec2.describe_instance_attribute(InstanceId=i["InstanceId"], Attribute="userData")
            args = agent_args(base64.b64decode(user_data["UserData"]["Value"]).decode())
            assert args[args.index("--run") + 1] == storage.uri  # its agent reads this run's storage only
        stages = len(storage.read_json("report.json")["stages"])
        results = [r for t in storage.subfolders("trials") for s in range(1, stages + 1)
                   if (r := storage.read_result(t, s))]
        assert results and {r["instance"] for r in results} <= mine
        seen[dag_id] = mine
        intervals.append(_interval(ledger))
    assert not seen["nightly_ec2_tuning"] & seen["digits_ec2"]
    (a0, a1), (b0, b1) = intervals
    assert a0 < b1 and b0 < a1  # the two runs' fleets were up at the same time
    # Nothing is left: no instance pending or running, no agent process.
    assert cloud.instances() == []
    cloud.hypervisor.sync()
    assert cloud.hypervisor.booted == {}


def test_a_run_marked_failed_mid_launch_leaves_no_instance_running(airflow_stack, stack_cloud):
    """A user marks an EC2 run failed while its first stage's start task launches its instances: the
    teardown (a setup's teardown runs however the run ends) terminates what the run launched and
    sweeps by its tags, and the sweeper finds anything launched after; nothing is left running."""
    stack, cloud = airflow_stack, stack_cloud
    stack.wait_for_dag("digits_ec2")
    stack.wait_for_dag("rubberband_sweeper")
    run_id = stack.trigger("digits_ec2", {"num_trials": 4, "max_instances": 2, "deadline_seconds": 900})
    quoted = urllib.parse.quote(run_id, safe="")
    deadline = time.time() + 600
    while (states := stack.task_states("digits_ec2", run_id)).get("stage_1.start[-1]") != "running":
        assert time.time() < deadline and stack.api("GET", f"/dags/digits_ec2/dagRuns/{quoted}")["state"] \
            in ("queued", "running"), states
        time.sleep(0.3)
    stack.api("PATCH", f"/dags/digits_ec2/dagRuns/{quoted}", {"state": "failed"})

    deadline = time.time() + 300
    while (states := stack.task_states("digits_ec2", run_id)).get("teardown[-1]") not in ("success", "failed"):
        assert time.time() < deadline, states
        time.sleep(2)
    assert states["teardown[-1]"] == "success", states
    # The run ends (Airflow 3.3 runs it again while its teardown runs, then judges it by its leaves,
    # which the mark left skipped: it may end "success"); what it launched must be gone either way.
    stack.wait_for_run("digits_ec2", run_id, timeout=300)
    after = stack.task_states("digits_ec2", run_id)
    assert states["stage_1.start[-1]"] != "success" or "success" not in {
        v for k, v in after.items() if k.startswith("stage_1.wait[")}, "the run was not stopped mid-launch"
    sweep = stack.trigger("rubberband_sweeper", {})
    assert stack.wait_for_run("rubberband_sweeper", sweep) == "success"
    assert cloud.instances(dag_id="digits_ec2", run_id=run_id) == []
    cloud.hypervisor.sync()
    launched = {i["InstanceId"] for i in cloud.instances(("terminated",), dag_id="digits_ec2", run_id=run_id)}
    assert not launched & set(cloud.hypervisor.booted)  # no agent of the run is left either
