"""Faults at a stage barrier, where the DAG's own tasks (the stage's promote, the next stage's start)
read and write run storage. A storage error burst: they ride it out as the waits and trials do, not
failing their one Airflow retry 5 s later. A start that fails for good: the run ends failed, its
report says which stages ran, and no best configuration is published. Real `dag.test` runs on
SQLite, real agents and workers; the storm injected by ``flaky://`` storage (tests/flaky_fs.py) in
every process of the run."""

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import yaml

from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.report import summary_lines
from rubberband_airflow.run_view import run_view_html
from rubberband_airflow.spec import load_spec
from rubberband_airflow.tuning import past_runs, stage_overhead
from rubberband_airflow.workloads import synthetic
from tests.airflow.conftest import ROOT, airflow_env, run
from tests.airflow.test_dag_runs import _agents_alive
from tests.flaky_fs import STORM_AFTER, STORM_HERE, storm_env

# Test setup: the DAG run with `dag.test`, as `airflow dags test` runs one (each task named by a
# further argument failing every try as a task whose host is gone would; `once:<task>` only its
# first, LATE seconds in); then each task instance's try number and state.
LATE = 20.0
RUN = f"LATE = {LATE}\n" + """
import sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag()
assert not bag.import_errors, bag.import_errors
dag = bag.dags[sys.argv[1]]
def gone(*args, **kwargs):
    raise RuntimeError("injected: the task's host is gone")
for task_id in sys.argv[2:]:
    if task_id.startswith("once:"):  # only its first try, which hangs LATE seconds before it is gone
        import functools, time
        task = dag.get_task(task_id[5:])
        def first_gone(real, tries=[]):
            @functools.wraps(real)  # Airflow passes what the task's own signature takes
            def once(*args, **kwargs):
                tries.append(1)
                if len(tries) == 1:
                    time.sleep(LATE)
                    gone()
                return real(*args, **kwargs)
            return once
        task.python_callable = first_gone(task.python_callable)
    else:
        dag.get_task(task_id).python_callable = gone
dr = dag.test()
print("DAG RUN", getattr(dr.state, "value", dr.state), flush=True)
for ti in dr.get_task_instances():
    print("TI", ti.task_id, ti.map_index, ti.try_number, getattr(ti.state, "value", ti.state), flush=True)
"""
STORM_SECONDS = 12.0  # longer than a task's first try and its Airflow retry, 5 s apart


def _storm_at_the_barrier(store: Path, storm: Path, done: threading.Event) -> None:
    """The storm starts as soon as stage 1 is promoted (by the stage's promote or the next start,
    whichever comes first: the rest of both then runs in it; the process that promotes starts it,
    ``STORM_AFTER``); end it STORM_SECONDS later."""
    while not done.is_set():
        if storm.exists() or any(store.glob("*/*/stages/1/promoted.json")):
            storm.touch()
            time.sleep(STORM_SECONDS)
            storm.unlink()
            return
        time.sleep(0.02)


def _dag(name: str, migrated_home: Path, tmp_path: Path, stages: int = 2) -> tuple[Path, dict[str, str]]:
    """A tuning DAG named ``name`` (8 sleeping trials, ``stages`` stages) with its run storage at
    ``flaky://<tmp>/store``, and the environment of a `dag.test` of it whose every process feels the
    storm file. (The session's Airflow database is shared: each test's DAG, and so its best
    configuration's Asset, has a name of its own.)"""
    dags, store = tmp_path / "dags", tmp_path / "store"
    dags.mkdir()
    shutil.copy(ROOT / "dags" / "digits_tuning.py", dags / f"{name}.py")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(synthetic.profile(1, 1.0, 0.0, trial_overhead_seconds=0.35,
                                                    stage_overhead_seconds=2.5, instance_type="local-sleep")))
    space = {**synthetic.SEARCH_SPACE, "epoch_seconds": {"type": "choice", "values": [1.0]},
             "serial": {"type": "choice", "values": [0.0]}}
    spec = {"name": name, "trainable": "rubberband_airflow.workloads.synthetic:train",
            "metric": synthetic.METRIC, "mode": synthetic.MODE, "search_space": space,
            "sha": {"num_trials": 8, "eta": 2, "min_epochs": 1, "num_stages": stages}, "deadline_seconds": 600,
            "backend": {"type": "local", "instance_type": "local-sleep", "slots": 2, "price_per_hour": 1.0,
                        "max_instances": 2, "oversubscribe": True},
            "billing": {"minimum_seconds": 1, "increment_seconds": 1}, "storage": f"flaky://{store}",
            "profile": str(profile), "seed": 1}
    (dags / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return store, {**storm_env(tmp_path, airflow_env(migrated_home, dags)), STORM_HERE: "1"}


def test_a_storage_error_burst_at_a_stage_barrier_fails_no_task_and_loses_no_trial(migrated_home, tmp_path):
    store, env = _dag("weather_storm", migrated_home, tmp_path)
    env[STORM_AFTER] = "stages/1/promoted.json"  # its promoter starts the storm, at once
    storm = tmp_path / "storm"

    done = threading.Event()
    watcher = threading.Thread(target=_storm_at_the_barrier, args=(store, storm, done), daemon=True)
    watcher.start()
    try:
        r = run([sys.executable, "-c", RUN, "weather_storm"], env, timeout=600)
    finally:
        done.set()
        watcher.join()
    out = r.stdout + r.stderr
    (tmp_path / "dag-test.log").write_text(out)
    assert "DAG RUN success" in r.stdout, out[-5000:]

    # The storm reached the run's own tasks, which tried their storage calls again within their try.
    hits = (tmp_path / "storm.hits").read_text().splitlines()
    assert any(line.endswith(" -c") for line in hits), hits[:5]  # the dag.test process: the tasks
    assert "the start of stage 2 failed" in out and "trying again" in out
    tries = {(t, int(m)): (int(k), s) for line in r.stdout.splitlines() if line.startswith("TI ")
             for _, t, m, k, s in [line.split()]}
    assert tries[("stage_2.start", -1)] == (1, "success")  # no Airflow retry was needed
    assert tries[("stage_1.promote", -1)] == (1, "success")
    assert all(s == "success" for _, s in tries.values()), tries

    # Every trial is accounted for, stage 2's promoted trials ran once each, nothing is left running.
    [folder] = list((store / "weather_storm").glob("manual__*"))
    storage = RunStorage(f"file://{folder}")
    rep = storage.read_json("report.json")
    assert rep["complete"] and len(rep["trials"]) == 8 and [s["failed"] for s in rep["stages"]] == [[], []]
    promoted = storage.read_json("stages", "2", "trials.json")["trials"]
    assert len(promoted) == 4 and storage.stage_results(2) == set(promoted)
    assert all(storage.current_try(t, 2) == 1 for t in promoted)
    assert all(e["terminated"] is not None for e in storage.ledger())
    assert rep["best"]["trial"] == synthetic.best_config({t: v["config"] for t, v in rep["trials"].items()})
    assert _agents_alive(tmp_path) == []


def test_a_start_that_fails_for_good_fails_the_run_and_publishes_no_best_configuration(migrated_home, tmp_path):
    """Stage 2's start fails both its tries: the run does not end green on stage 1's results alone."""
    store, env = _dag("weather_failed_start", migrated_home, tmp_path)
    r = run([sys.executable, "-c", RUN, "weather_failed_start", "stage_2.start"], env, timeout=600)
    out = r.stdout + r.stderr
    (tmp_path / "dag-test.log").write_text(out)
    assert "DAG RUN failed" in r.stdout, out[-5000:]
    tries = {t: s for line in r.stdout.splitlines() if line.startswith("TI ") for _, t, _, _, s in [line.split()]}
    assert tries["stage_2.start"] == "failed" and tries["teardown"] == "success" and tries["report"] == "failed"
    [folder] = list((store / "weather_failed_start").glob("manual__*"))
    storage = RunStorage(f"file://{folder}")
    rep = storage.read_json("report.json")  # what ran is reported
    assert rep["complete"] is False and rep["stages_planned"] == 2 and [s["stage"] for s in rep["stages"]] == [1]
    assert any(line.startswith("INCOMPLETE: the run ended after stage 1 of 2") for line in summary_lines(rep))
    assert len(rep["trials"]) == 8 and rep["best"] is not None
    assert not (store / "weather_failed_start" / "best_config.json").exists()  # downstream DAGs see nothing new
    page = run_view_html(storage, "weather_failed_start", refresh_seconds=10)  # the run's tab: ended, not in flight
    assert "(incomplete: the run stopped after stage 1 of 2)" in page and "name='rb-refresh'" not in page
    assert all(e["terminated"] is not None for e in storage.ledger())
    assert _agents_alive(tmp_path) == []


def test_a_start_tried_again_late_does_not_teach_the_next_runs_a_late_stage_overhead(migrated_home, tmp_path):
    """Stage 2's start hangs LATE seconds and is gone; Airflow's retry runs it. The run ends green;
    its report says stage 2 started late and does not count that wait as the orchestrator's stage
    overhead, which the DAG's next runs plan with (stage 3's, measured as usual)."""
    store, env = _dag("weather_late_start", migrated_home, tmp_path, stages=3)
    r = run([sys.executable, "-c", RUN, "weather_late_start", "once:stage_2.start"], env, timeout=600)
    out = r.stdout + r.stderr
    (tmp_path / "dag-test.log").write_text(out)
    assert "DAG RUN success" in r.stdout, out[-5000:]
    tries = {t: (int(k), s) for line in r.stdout.splitlines() if line.startswith("TI ")
             for _, t, _, k, s in [line.split()]}
    assert tries["stage_2.start"] == (2, "success")

    [folder] = list((store / "weather_late_start").glob("manual__*"))
    storage = RunStorage(f"file://{folder}")
    rep = storage.read_json("report.json")
    assert rep["complete"] and [s["failed"] for s in rep["stages"]] == [[], [], []]
    # Stage 2's first trial began more than LATE seconds after stage 1's last result...
    stage1_end = rep["stages"][0]["end"]
    first_2 = min(v["results"]["2"]["spawned"] for v in rep["trials"].values() if "2" in v["results"])
    assert first_2 - stage1_end > LATE
    # ... which the report says, without measuring it as stage 2's overhead; stage 3's is measured.
    overheads = rep["stage_overhead_seconds"]
    assert overheads[1] is None and 0 < overheads[2] < LATE / 2, overheads
    assert any(line.startswith("Stage 2 started late: its start was tried again") for line in summary_lines(rep))
    # The DAG's next run plans with stage 3's overhead, not the night's wait.
    spec = load_spec(tmp_path / "dags" / "weather_late_start.yaml")
    planned, source = stage_overhead(spec, past_runs(RunStorage(f"file://{store}/weather_late_start")), [])
    assert source == "past runs" and planned == overheads[2]
    assert all(e["terminated"] is not None for e in storage.ledger())
    assert _agents_alive(tmp_path) == []
