"""The example DAGs parse; bad specs become import errors naming the file and the field."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.airflow.conftest import BIN, ROOT, airflow_env, run


@pytest.fixture
def dagbag_for(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))

    def load(folder: Path):
        from airflow.dag_processing.dagbag import DagBag

        return DagBag(dag_folder=str(folder))
    return load


def test_example_dags_import_without_errors(dagbag_for):
    bag = dagbag_for(ROOT / "dags")
    assert bag.import_errors == {}
    dag = bag.dags["digits_tuning"]
    ids = set(dag.task_dict)
    assert {"plan", "start_run", "teardown", "report", "stage_1.start",
            "stage_1.wait", "stage_1.promote", "stage_1.prewarm"} <= ids
    assert dag.task_dict["teardown"].is_teardown
    assert dag.task_dict["stage_1.wait"].partial_kwargs["deferrable"] is True  # no worker slot per waiting trial
    assert set(dag.params) >= {"deadline_seconds", "num_trials", "eta", "min_epochs", "instance_types", "seed"}
    assert dag.params.get_param("deadline_seconds").schema["minimum"] == 1
    assert dag.task_dict["report"].outlets[0].uri.endswith("/digits_tuning/best_config.json")
    # The nightly example runs at 02:00 (UTC); the sweeper every 15 minutes, one run at a time.
    assert bag.dags["nightly_ec2_tuning"].timetable.expression == "0 2 * * *"
    sweeper = bag.dags["rubberband_sweeper"]
    assert sweeper.timetable.expression == "*/15 * * * *" and sweeper.max_active_runs == 1
    # The calibration DAG runs when triggered, on the repo's storage root.
    assert type(bag.dags["rubberband_calibration"].timetable).__name__ == "NullTimetable"
    # The downstream example is scheduled on that Asset.
    downstream = bag.dags["train_best_digits"]
    assert [a.uri for a in downstream.timetable.asset_condition.objects] == [dag.task_dict["report"].outlets[0].uri]


def test_each_stage_after_the_first_executes_its_replan_unless_the_spec_turns_it_off(dagbag_for, tmp_path):
    folder = tmp_path / "dags"
    folder.mkdir()
    spec = yaml.safe_load((ROOT / "dags" / "digits_tuning.yaml").read_text())
    for name, replan in (("replanned", None), ("fixed", False)):
        data = {**spec, "name": name} | ({} if replan is None else {"replan": replan})
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))
        shutil.copy(ROOT / "dags" / "digits_tuning.py", folder / f"{name}.py")
    bag = dagbag_for(folder)
    assert bag.import_errors == {}
    replanned, fixed = bag.dags["replanned"], bag.dags["fixed"]
    # One task from a stage's barrier to its trials' waits: the start task re-plans (stages 2 on,
    # unless the spec says replan: false), scales the fleet and places the trials.
    assert {t.rsplit(".", 1)[-1] for t in replanned.task_dict if t.startswith("stage_2.")} == \
        {"start", "wait", "promote", "prewarm"}
    assert [replanned.task_dict[f"stage_{i}.start"].op_args[1] for i in (1, 2, 3)] == [False, True, True]
    assert [fixed.task_dict[f"stage_{i}.start"].op_args[1] for i in (1, 2, 3)] == [False, False, False]
    for dag in (replanned, fixed):
        tasks = dag.task_dict
        assert tasks["stage_1.start"].upstream_task_ids == {"start_run"}
        # The next stage starts once this one's waits and its pre-warm are over, and promotes this
        # one itself: one task between two stages, not two. A promote is off that path.
        assert tasks["stage_2.start"].upstream_task_ids == {"stage_1.wait", "stage_1.prewarm"}
        assert tasks["stage_2.start"].trigger_rule == "all_done_min_one_success"
        assert not tasks["stage_1.promote"].downstream_task_ids & {t for t in tasks if t.startswith("stage_2.")}
        assert tasks["stage_2.wait"].upstream_task_ids == {"stage_2.start"}
        assert tasks["stage_2.promote"].upstream_task_ids == {"stage_2.start", "stage_2.wait"}
        # A stage's pre-warm starts once its trials are placed.
        assert tasks["stage_1.prewarm"].upstream_task_ids == {"stage_1.start"}

BAD = [
    ("sha", {"num_trials": 0, "eta": 2, "min_epochs": 1}, "sha.num_trials"),
    ("search_space", {"lr": {"type": "gaussian"}}, "search_space.lr.type"),
    ("backend", {"type": "k8s"}, "backend.type"),
    ("deadline_seconds", -5, "deadline_seconds"),
    ("colour", "blue", "colour"),
    ("replan", "yes", "replan"),
    ("backend", {"type": "ec2", "ami": "ami-1", "subnets": ["subnet-1"], "security_groups": ["sg-1"],
                 "instance_profile": "rubberband-agent", "instance_types": [{"name": "x9.huge", "max_instances": 2}]},
     "backend.instance_types[0]"),
]


@pytest.mark.parametrize("key,value,field", BAD, ids=[b[2] for b in BAD])
def test_bad_spec_is_an_import_error_naming_file_and_field(dagbag_for, tmp_path, key, value, field):
    folder = tmp_path / "dags"
    folder.mkdir()
    spec = yaml.safe_load((ROOT / "dags" / "digits_tuning.yaml").read_text())
    spec[key] = value
    (folder / "bad_tuning.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(ROOT / "dags" / "digits_tuning.py", folder / "bad_tuning.py")
    bag = dagbag_for(folder)
    [(path, error)] = bag.import_errors.items()
    assert path.endswith("bad_tuning.py")
    assert "bad_tuning.yaml" in error and f"{field}:" in error


def test_provider_and_plugin_are_registered(tmp_path):
    env = airflow_env(tmp_path)
    r = run([str(BIN / "airflow"), "providers", "list", "-o", "json"], env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert any(p["package_name"] == "rubberband-airflow" for p in json.loads(r.stdout))
    r = run([str(BIN / "airflow"), "plugins", "-o", "json"], env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    [plugin] = [p for p in json.loads(r.stdout) if p["name"] == "rubberband"]
    assert "/rubberband" in json.dumps(plugin)
    # Registered once, with no import error (a second copy of the package would register it twice).
    r = run([str(BIN / "python"), "-c", "import json; from airflow.plugins_manager import _get_plugins; "
             "print(json.dumps(_get_plugins()[1]))"], env, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1]) == {}, r.stdout + r.stderr[-2000:]


def test_plugin_page_is_behind_airflows_login(tmp_path, monkeypatch):
    """Without a valid token nothing is shown (the pages with a login: tests/fullstack)."""
    from airflow.api_fastapi.app import create_auth_manager
    from fastapi.testclient import TestClient

    from rubberband_airflow.execution.storage import RunStorage
    from rubberband_airflow.plugin import create_app

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
    RunStorage(f"file://{tmp_path}/rubberband/digits_tuning/manual__1").write_json({"best": None}, "report.json")
    create_auth_manager()  # as the api-server does at startup: Airflow's configured auth manager
    client = TestClient(create_app())
    for path in ("/", "/api/runs", "/api/runs/digits_tuning/manual__1"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer forged"}).status_code == 403
        client.cookies.set("_token", "forged")
        assert client.get(path).status_code == 403
        client.cookies.clear()
