"""An Airflow home on SQLite for the tests: migrated once per session, DAGs from the repo's dags/."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def airflow_env(home: Path, dags: Path = ROOT / "dags") -> dict:
    return {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def run(cmd: list[str], env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="session")
def migrated_home(tmp_path_factory) -> Path:
    """AIRFLOW_HOME with a migrated SQLite database."""
    home = tmp_path_factory.mktemp("airflow_home")
    r = run([str(BIN / "airflow"), "db", "migrate"], airflow_env(home), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return home


@pytest.fixture(scope="session")
def digits_profile(tmp_path_factory) -> Path:
    """The profile of the digits example on a local instance of one slot, from the profiler."""
    folder = tmp_path_factory.mktemp("profiling")
    profile = folder / "local-1.json"
    r = run([str(BIN / "rubberband"), "profile", "--slots", "1", "--epochs", "3", "--storage",
             f"file://{folder}/runs", "--out", str(profile)], {**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return profile


@pytest.fixture(scope="session")
def airflow_home(migrated_home, digits_profile) -> Path:
    """``migrated_home`` with the digits profile where the repo's digits spec reads it."""
    profile = migrated_home / "rubberband" / "profiles" / "local-1.json"
    profile.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(digits_profile, profile)
    return migrated_home
