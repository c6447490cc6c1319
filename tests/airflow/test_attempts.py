"""A cleared DAG run keeps what finished and runs what failed again, a new attempt in a folder of its
own or the same attempt continued, never mixing attempts; a spec edited or broken mid-run changes
nothing of the run: real `dag.test` runs on SQLite, real agents and workers."""

import json
import shutil
import sys
from pathlib import Path

import yaml

from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.billing import billed_seconds
from rubberband_airflow.search_space import sample
from tests.airflow.conftest import BIN, ROOT, airflow_env, run
from tests.airflow.test_dag_runs import _agents_alive

# Test setup, not what is tested: `dag.test` for one logical date, as `airflow dags test` runs it,
# except that an existing run of that date is kept, cleared as "Clear" on the whole run does in the
# UI and REST API (every task instance, or with "only failed" the failed and upstream-failed ones;
# the run queued, its clear number one more), and run again, instead of deleted (nor cleared whole
# first, as `dag.test` does). After start_run,
# the spec file is overwritten with the text given, if any (a user editing it mid-run).
RERUN = """
import json, sys
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

import airflow.models.dagrun as dagrun_module
import airflow.sdk.definitions.dag as dag_module
from airflow.dag_processing.dagbag import DagBag
from airflow.models.dagrun import DagRun
from airflow.serialization.definitions.dag import SerializedDAG
from airflow.utils.state import DagRunState

dag_id, date, conf, spec_path, edit = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
only_failed = sys.argv[6:] == ["only-failed"]
create, run_task = dagrun_module.get_or_create_dagrun, dag_module._run_task

def keep_existing(*, dag, logical_date, session, **kwargs):
    run = session.scalar(select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.logical_date == logical_date))
    if run is None:
        return create(dag=dag, logical_date=logical_date, session=session, **kwargs)
    dag.clear(run_id=run.run_id, dag_run_state=DagRunState.QUEUED, only_failed=only_failed, session=session)
    session.commit()
    session.refresh(run)
    run.state = DagRunState.RUNNING
    session.commit()
    run.dag = dag
    return run

def run_then_edit(*, ti, task, **kwargs):
    out = run_task(ti=ti, task=task, **kwargs)
    if ti.task_id == "start_run" and edit:
        Path(spec_path).write_text(edit)
    return out

dagrun_module.get_or_create_dagrun, dag_module._run_task = keep_existing, run_then_edit
SerializedDAG.clear_dags = lambda *args, **kwargs: 0
dag = DagBag().dags[dag_id]
run = dag.test(logical_date=datetime.fromisoformat(date), run_conf=conf)
print("DAG RUN", run.run_id, getattr(run.state, "value", run.state), "clear number", run.clear_number)
"""
DATE = "2026-11-28T02:00:00+00:00"
CONF = {"num_trials": 2, "eta": 2, "min_epochs": 1}


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def _dag_test(env: dict, spec_path: Path, log: Path, edit: str = "", clear: str = "") -> str:
    """Run the DAG run of DATE, first cleared ("all" or "only-failed") if asked, the spec file
    overwritten with ``edit`` after its start_run if given; returns its "DAG RUN <id> <state> ..." line."""
    r = run([sys.executable, "-c", RERUN, spec_path.stem, DATE, json.dumps(CONF), str(spec_path), edit,
             *([clear] if clear else [])], env)
    out = r.stdout + r.stderr
    log.write_text(out)
    errors = [x for x in out.splitlines() if "error" in x.lower() and "XCom not found" not in x]
    [line] = [x for x in r.stdout.splitlines() if x.startswith("DAG RUN")] or [out[-3000:]]
    assert r.returncode == 0, "\n".join([line, *errors[-30:]])
    return line


def test_a_cleared_run_keeps_what_finished_runs_what_failed_and_a_spec_edited_mid_run_changes_nothing(
        airflow_home, tmp_path):
    dags, markers = tmp_path / "dags", tmp_path / "markers"
    dags.mkdir()
    markers.mkdir()
    shutil.copy(ROOT / "dags" / "digits_tuning.py", dags / "flaky_tuning.py")
    spec_path = dags / "flaky_tuning.yaml"
    spec = {"name": "flaky_tuning", "trainable": "tests.trainables:fails_first_try", "metric": "accuracy",
            "mode": "max", "search_space": {"lr": {"type": "uniform", "low": 0.01, "high": 0.5}},
            "sha": {"num_trials": 2, "eta": 2, "min_epochs": 1}, "deadline_seconds": 300,
            "backend": {"type": "local", "instance_type": "local-1", "slots": 1, "price_per_hour": 0.10,
                        "max_instances": 2},
            "billing": {"minimum_seconds": 0, "increment_seconds": 1}, "storage": f"file://{tmp_path}/store",
            "profile": str(airflow_home / "rubberband/profiles/local-1.json"),
            "trial_timeout": {"factor": 3, "floor_seconds": 120}, "seed": 0}
    spec_path.write_text(yaml.safe_dump(spec))
    # The fault: the trial of the last stage (stage 2) fails the first two times it runs there.
    env = {**airflow_env(tmp_path / "home", dags), "RUBBERBAND_TEST_MARKERS": str(markers),
           "RUBBERBAND_TEST_FAIL_STAGES": "2", "RUBBERBAND_TEST_FAILS": "2"}
    assert run([str(BIN / "airflow"), "db", "migrate"], env, timeout=300).returncode == 0
    runs = tmp_path / "store" / "flaky_tuning"

    # Attempt 1: once start_run has run, the spec moves the storage elsewhere and changes the seed.
    moved = {**spec, "storage": f"file://{tmp_path}/store-b", "seed": 5}
    first = _dag_test(env, spec_path, tmp_path / "dag-test-0.log", edit=yaml.safe_dump(moved))
    assert " failed clear number 0" in first  # every trial of stage 2 failed: no best configuration
    assert not (tmp_path / "store-b").exists()  # the run kept to its own copy of the spec
    [one] = list(runs.glob("manual__*"))
    rep1 = _report(one)
    [finalist] = RunStorage(f"file://{one}").read_json("stages", "2", "trials.json")["trials"]
    assert rep1["attempt"] == 1 and len(rep1["trials"]) == 2 and rep1["best"] is None
    assert "injected failure 0" in rep1["trials"][finalist]["results"]["2"]["error"]
    assert all(e["terminated"] is not None for e in rep1["ledger"]) and _agents_alive(tmp_path) == []

    # "Clear" of the whole run, spec (put back) and plan unchanged: attempt 2 keeps stage 1 and runs
    # stage 2 again. Its spec breaks mid-run.
    spec_path.write_text(yaml.safe_dump(spec))
    second = _dag_test(env, spec_path, tmp_path / "dag-test-1.log", edit="name: [unclosed\n", clear="all")
    assert " failed clear number 1" in second  # the finalist's second failure
    [two] = list(runs.glob("manual__*.attempt-2"))
    assert two.name == f"{one.name}.attempt-2"
    storage = RunStorage(f"file://{two}")
    carried = storage.read_json("carried.json")
    assert carried["from_attempt"] == 1 and sorted(carried["results"]["1"]) == sorted(rep1["trials"])
    assert "2" not in carried["results"]  # the failure is not kept: it ran again
    assert not [e for e in storage.ledger() if e["batch"].startswith("stage-1-")]  # stage 1 launched nothing
    assert "injected failure 1" in storage.read_result(finalist, 2)["error"]

    # The user fixes the spec; "Clear" with "only failed": start_run and the teardown stay, the failed
    # tasks of attempt 2 run again.
    spec_path.write_text(yaml.safe_dump(spec))
    third = _dag_test(env, spec_path, tmp_path / "dag-test-2.log", clear="only-failed")
    assert " success clear number 2" in third
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [one.name, two.name]
    assert _report(one) == rep1  # the first attempt's report stays as it was: no attempt mixes another's
    rep = _report(two)
    assert rep["attempt"] == 2 and rep["best"]["trial"] == finalist
    assert rep["trials"][finalist]["results"]["2"]["state"] == "done"
    assert all(t["results"]["1"]["state"] == "done" and t["results"]["1"]["carried_from"] == 1
               for t in rep["trials"].values())
    [retry] = rep["retries"]
    assert retry["stage"] == 2 and retry["try"] == 2 and retry["trials"] == [finalist] and retry["launched"]
    # The failure of the first try stays beside the second try's result: nothing recorded is lost.
    assert "injected failure 1" in storage.read_result(finalist, 2, 1)["error"]
    assert storage.read_result(finalist, 2, 2)["state"] == "done"
    # What finished was never trained again: each trial's epoch 1 once, the finalist's epoch 2 once.
    trained = sorted((markers / "trained.log").read_text().splitlines())
    assert trained == sorted([f"{t} 1" for t in rep["trials"]] + [f"{finalist} 2"])
    # Every instance of the attempt, those launched for the second try too, is terminated, and billed
    # as the report says; what attempt 1 trained is in attempt 1's bill, not counted again.
    ledger = storage.ledger()
    assert set(retry["launched"]) <= {e["instance"] for e in ledger}
    assert all(e["terminated"] is not None for e in ledger) and _agents_alive(tmp_path) == []
    cost = sum(billed_seconds(e["running"], e["terminated"], 0, 1) for e in ledger) * 0.10 / 3600
    assert abs(rep["actual"]["cost_usd"] - cost) < 1e-9

    # Cleared whole again with a changed spec (seed 5): a new attempt keeps nothing, and says why. It is
    # attempt 4, as the run's clear number is now 3 (the clear of only the failed tasks counted too).
    spec_path.write_text(yaml.safe_dump(moved | {"storage": spec["storage"]}))
    fourth = _dag_test({**env, "RUBBERBAND_TEST_FAIL_STAGES": ""}, spec_path, tmp_path / "dag-test-3.log",
                       clear="all")
    assert " success clear number 3" in fourth
    rep3 = _report(runs / f"{one.name}.attempt-4")
    assert rep3["attempt"] == 4 and rep3["best"] is not None
    assert rep3["carried"]["reason"] == "nothing kept from attempt 2: the spec changed since"
    configs = sample(spec["search_space"], 2, 5)
    assert [t["config"] for _, t in sorted(rep3["trials"].items())] == configs  # the new configurations
    for trial in rep3["trials"]:  # with the new attempt's own metrics, from its first epoch
        assert [m["epoch"] for m in RunStorage(f"file://{runs}/{one.name}.attempt-4").metrics(trial)][0] == 1
        assert "carried_from" not in rep3["trials"][trial]["results"]["1"]
    assert all(e["terminated"] is not None for e in rep3["ledger"]) and _agents_alive(tmp_path) == []
    assert _report(two) == rep


def _local_run_with_an_agent(tmp_path: Path, dag_id: str):
    """A started local run (attempt 1) with one agent running: its spec, storage and backend."""
    from rubberband_airflow.execution import runner
    from rubberband_airflow.hooks.backend import run_backend
    from rubberband_airflow.spec import load_spec
    from rubberband_airflow.tuning import RunSnapshot, run_uri, write_snapshot
    from tests.execution.conftest import one_trial_spec, plan_json

    spec = load_spec(str(one_trial_spec(tmp_path, dag_id, "tests.trainables:sleepy", 1)))
    storage = RunStorage(run_uri(spec, dag_id, "manual__1", 1))
    write_snapshot(storage, RunSnapshot(spec, {}, 1, "default"))
    runner.start_run(storage, runner.RunSpec("tests.trainables:sleepy", "accuracy", "max", seed=1), [{"x": 0.5}],
                     plan_json("local-1", 1, [(1, 1)], num_trials=1, eta=2, min_epochs=1), 1)
    return spec, storage, run_backend(spec, storage, dag_id, "manual__1", "local-1", deployment="default")


def test_a_run_cleared_while_it_runs_has_its_earlier_attempts_fleet_stopped(tmp_path):
    """Clearing a running run stops its tasks, not its instances, and resets its teardown before it
    ran: the new attempt's start_run terminates what the earlier attempt still runs, and that attempt
    launches nothing more (a wait of it that is still running cannot recover onto a new instance)."""
    import pytest

    from rubberband_airflow.execution.backends.base import Superseded
    from rubberband_airflow.hooks.backend import retire_earlier_attempts
    from tests.execution.conftest import agent_processes

    spec, storage, backend = _local_run_with_an_agent(tmp_path, "cleared_running")
    try:
        [instance] = backend.launch("stage-1-batch-0", 1)
        assert agent_processes(storage)  # attempt 1's agent runs

        assert retire_earlier_attempts(spec, "cleared_running", "manual__1", 3) == [instance]  # attempt 2: no folder
        assert agent_processes(storage) == [] and backend.live() == []
        assert storage.read_json("superseded.json")["by_attempt"] == 3
        with pytest.raises(Superseded, match="attempt 3 replaces this attempt"):
            backend.launch("stage-1-recover-" + instance, 1)  # a recovery of a wait of attempt 1 still running
        assert backend.live() == [] and agent_processes(storage) == []
    finally:
        backend.terminate_all()


def test_a_local_runs_teardown_ends_its_agents_when_its_folder_is_gone(tmp_path):
    """The run's files deleted (or its storage failing): the teardown still finds the run's agents
    by their processes, as EC2's teardown finds instances by their tags."""
    import shutil

    from rubberband_airflow.hooks.backend import teardown_run
    from tests.execution.conftest import agent_processes

    spec, storage, backend = _local_run_with_an_agent(tmp_path, "folder_gone")
    try:
        [instance] = backend.launch("stage-1-batch-0", 1)
        assert agent_processes(storage)
        shutil.rmtree(storage.root.removeprefix("file://"))
        assert teardown_run(storage.uri, spec, "folder_gone", "manual__1") == [instance]
        assert agent_processes(storage) == []
    finally:
        backend.terminate_all()
