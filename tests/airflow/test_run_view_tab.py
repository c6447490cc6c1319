"""The RubberBand tab of a DAG run: the plugin serves the run view of that run behind Airflow's
login, and the overview page links each run to it; trial ids, configurations, the DAG's description
and run names that hold markup reach every page as text (the page itself:
tests/execution/test_run_view.py; in Airflow's UI: tests/fullstack/test_run_tab.py)."""

import html
import json
import re
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from rubberband_airflow.run_view import _libraries
from rubberband_airflow.tuning import run_uri
from tests.airflow.conftest import BIN, ROOT, airflow_env, run
from tests.execution.test_run_view import HOSTILE, HOSTILE_ID, _with_hostile_trial_id, run_dir  # noqa: F401

RUN_ID = "manual__2026-12-02T15:32:22.980994+00:00"


@pytest.fixture
def airflow_db(tmp_path, monkeypatch):
    """This process's Airflow on a migrated SQLite database of its own (the login checks revoked tokens there)."""
    from airflow import settings

    conn = f"sqlite:///{tmp_path}/airflow.db"
    r = run([str(BIN / "airflow"), "db", "migrate"],
            {**airflow_env(tmp_path), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": conn}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", conn)
    settings.configure_vars()
    settings.reconfigure_orm()
    yield
    monkeypatch.undo()
    settings.configure_vars()
    settings.reconfigure_orm()


def _forget_token_keys() -> None:
    from airflow.api_fastapi.auth.managers.base_auth_manager import BaseAuthManager

    BaseAuthManager._get_token_signer.__func__.cache_clear()  # type: ignore[attr-defined]
    BaseAuthManager._get_token_validator.__func__.cache_clear()  # type: ignore[attr-defined]


def test_the_run_tab_serves_the_run_view_behind_the_login(run_dir, airflow_db, tmp_path, monkeypatch, request):  # noqa: F811
    from airflow.api_fastapi.app import create_auth_manager, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    from rubberband_airflow.plugin import RubberBandPlugin, create_app
    from rubberband_airflow.spec import load_spec

    dags = tmp_path / "dags"
    dags.mkdir()
    spec = yaml.safe_load((ROOT / "dags" / "digits_tuning.yaml").read_text())
    spec["description"] = HOSTILE
    (dags / "digits_tuning.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(dags))
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "run-view-test-" * 4)
    _forget_token_keys()  # signer and validator are cached per process: an earlier test's secret must not stay
    request.addfinalizer(_forget_token_keys)
    folder = run_uri(load_spec(dags / "digits_tuning.yaml"), "digits_tuning", RUN_ID).removeprefix("file://")
    _with_hostile_trial_id(run_dir, Path(folder))
    # Another run, in a folder with markup in its name, its best trial id markup too.
    other = Path(folder).parent / HOSTILE_ID
    shutil.copytree(run_dir, other)
    report = json.loads((other / "report.json").read_text())
    # It stopped after stage 1 of 2 (a task failed for good): the overview says so.
    (other / "report.json").write_text(json.dumps({**report, "best": {**report["best"], "trial": HOSTILE},
                                                   "complete": False, "stages": report["stages"][:1]}))
    create_auth_manager()
    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
    client = TestClient(create_app())
    path = f"/runs/digits_tuning/{quote(RUN_ID, safe='')}"

    assert client.get(path).status_code == 401
    page = client.get(path, headers={"Authorization": f"Bearer {token}"})
    assert page.status_code == 200, page.text[:500]
    assert "<title>digits_tuning / " in page.text
    own = page.text.replace(_libraries(), "")  # the page's own parts
    assert "<img" not in own and "<svg" not in own  # description, trial ids and configurations are text
    assert html.escape(HOSTILE) in own and html.escape(HOSTILE_ID) in own
    specs = json.loads(re.search(r"id='rb-specs'>(.*?)</script>", page.text, re.S).group(1))
    assert set(specs) == {"fleet", "cost", "curves", "deadline"}
    assert "name='rb-refresh'" not in page.text  # finished: no refreshing

    client.cookies.set("_token", token)  # as the UI's iframe sends it
    waiting = client.get(f"/runs/digits_tuning/{quote(HOSTILE_ID, safe='')}").text
    assert f"{html.escape(HOSTILE_ID)}: the run has not started yet.</p>" in waiting and "<svg" not in waiting
    assert client.get("/runs/not_a_tuning_dag/x").status_code == 404
    overview = client.get("/").text
    folder_name = folder.rsplit("/", 1)[-1]
    assert f"<a href='runs/digits_tuning/{quote(folder_name, safe='')}'>" in overview
    assert (f"<a href='runs/digits_tuning/{quote(HOSTILE_ID, safe='')}'>{html.escape(HOSTILE_ID)}</a> "
            f"<strong>incomplete</strong>: ended after stage 1 of {report['stages_planned']}</td>") in overview
    assert overview.count("incomplete") == 1  # the complete run is not marked
    assert f"<td>{html.escape(HOSTILE)}</td>" in overview and "<img" not in overview and "<svg" not in overview
    assert client.get(f"/runs/digits_tuning/{quote(folder_name, safe='')}").status_code == 200

    [tab] = [v for v in RubberBandPlugin.external_views if v["destination"] == "dag_run"]
    assert tab["href"] == "/rubberband/runs/{DAG_ID}/{RUN_ID}"

    # A cleared run: its tab shows the newest attempt (the run cleared twice: attempt 3), not the first.
    shutil.copytree(run_dir, Path(f"{folder}.attempt-3"))
    shutil.copytree(run_dir, Path(f"{folder}x.attempt-9"))  # another run's attempt, whose id starts the same
    page = client.get(path, headers={"Authorization": f"Bearer {token}"})
    assert page.status_code == 200 and "<title>digits_tuning / " in page.text
    assert f"{html.escape(RUN_ID)} (attempt 3) · RubberBand</title>" in page.text
