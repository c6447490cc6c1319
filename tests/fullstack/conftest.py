"""A real Airflow 3.3 stack for tests: PostgreSQL, scheduler, dag-processor, triggerer, api-server.

The database is one of its own on the PostgreSQL at ``RUBBERBAND_TEST_PG`` (default
postgresql://postgres@127.0.0.1:5432/postgres), created here and dropped afterwards; the
components run on 127.0.0.1 with LocalExecutor and the repo's dags/, and are stopped at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import psycopg2
import pytest
from psycopg2 import sql

from tests.airflow.conftest import BIN, ROOT, airflow_env, run

PG = os.environ.get("RUBBERBAND_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, home: Path, port: int, env: dict[str, str]) -> None:
        self.home, self.port, self.env = home, port, env
        self.base = f"http://127.0.0.1:{port}"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}/api/v2{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                self.api("GET", f"/dags/{dag_id}")
                return
            except urllib.error.HTTPError:
                time.sleep(2)
        raise TimeoutError(f"the dag-processor did not parse {dag_id} within {timeout:g} s")

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        return self.api("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 900) -> str:
        deadline = time.time() + timeout
        quoted = urllib.request.quote(run_id, safe="")
        while time.time() < deadline:
            state = self.api("GET", f"/dags/{dag_id}/dagRuns/{quoted}")["state"]
            if state in ("success", "failed"):
                return state
            time.sleep(3)
        raise TimeoutError(f"{dag_id} {run_id} did not finish within {timeout:g} s")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        quoted = urllib.request.quote(run_id, safe="")
        tis = self.api("GET", f"/dags/{dag_id}/dagRuns/{quoted}/taskInstances?limit=1000")["task_instances"]
        return {f"{t['task_id']}[{t['map_index']}]": t["state"] for t in tis}


@pytest.fixture(scope="session")
def airflow_stack(tmp_path_factory, airflow_home) -> Iterator[Stack]:
    db = f"rubberband_test_{os.getpid()}"
    admin = psycopg2.connect(PG)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    home = tmp_path_factory.mktemp("stack_home")
    profile = home / "rubberband" / "profiles" / "local-1.json"
    profile.parent.mkdir(parents=True)
    shutil.copy(airflow_home / "rubberband" / "profiles" / "local-1.json", profile)  # from the profiler
    port = _free_port()
    url = PG.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://") + f"/{db}"
    env = {**airflow_env(home), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url,
           "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__PARALLELISM": "8",
           "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
           "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
           "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
           "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
           "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2"}
    processes: list[subprocess.Popen] = []
    try:
        r = run([str(BIN / "airflow"), "db", "migrate"], env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        logs = home / "component-logs"
        logs.mkdir()
        for name in COMPONENTS:
            out = open(logs / f"{name}.log", "w")
            processes.append(subprocess.Popen([str(BIN / "airflow"), name], env=env, cwd=ROOT, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        stack = Stack(home, port, env)
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{stack.base}/api/v2/monitor/health", timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.time() > deadline:
                    raise TimeoutError("the api-server did not come up: " + (logs / "api-server.log").read_text()[-3000:])
                time.sleep(1)
        yield stack
    finally:
        for p in processes:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
        admin.close()
