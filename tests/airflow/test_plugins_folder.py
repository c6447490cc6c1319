"""The RubberBand plugin with the repo's plugins/ as Airflow's plugins folder (as MWAA and docker/compose.yaml
run it) and with the package alone: one plugin, its page served behind the login, no import error.

One Airflow home for both; one api-server per case, on 127.0.0.1 and a free port, stopped afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.airflow.conftest import BIN, ROOT, airflow_env, run

# The plugins folder of each case: the repo's plugins/, or Airflow's default ($AIRFLOW_HOME/plugins, absent).
CASES = {"plugins folder": str(ROOT / "plugins"), "package alone": None}


@dataclass
class Server:
    base: str
    env: dict[str, str]
    token: str

    def get(self, path: str, token: str | None = None) -> tuple[int, str]:
        """Status and body of ``GET path``, with a bearer token if given."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{self.base}{path}", headers=headers),
                                        timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def api(self, path: str) -> Any:
        status, body = self.get(f"/api/v2{path}", self.token)
        assert status == 200, body
        return json.loads(body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """An Airflow home on SQLite shared by both cases, with the admin's password in a file."""
    home = tmp_path_factory.mktemp("plugins_home")
    (home / "passwords.json").write_text(json.dumps({"admin": secrets.token_urlsafe(16)}))
    r = run([str(BIN / "airflow"), "db", "migrate"], airflow_env(home), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return home


def _token(base: str, password: str) -> str:
    req = urllib.request.Request(f"{base}/auth/token", data=json.dumps({"username": "admin", "password": password})
                                 .encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["access_token"]


@pytest.fixture(scope="module", params=list(CASES))
def server(request, home) -> Iterator[Server]:
    """The api-server of one case, up and answering; stopped (its process group) at the end."""
    port = _free_port()
    env = {**airflow_env(home), "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
           "AIRFLOW__API__WORKERS": "1", "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
           "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32)}
    # As a deployment runs it: the package from its installed distribution only (airflow_env puts the
    # repository on PYTHONPATH, where an editable build's rubberband_airflow.egg-info, found as a second
    # distribution, would register the entry point twice).
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    env.pop("AIRFLOW__CORE__PLUGINS_FOLDER", None)
    if CASES[request.param]:
        env["AIRFLOW__CORE__PLUGINS_FOLDER"] = CASES[request.param]
    log_path = home / f"api-server-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(BIN / "airflow"), "api-server"], env=env, cwd=home, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/v2/monitor/health", timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("the api-server did not come up: " + log_path.read_text()[-3000:])
                time.sleep(0.5)
        password = json.loads((home / "passwords.json").read_text())["admin"]
        yield Server(base, env, _token(base, password))
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_one_rubberband_plugin_from_the_package_and_no_import_error(server):
    plugins = server.api("/plugins?limit=100")["plugins"]
    [plugin] = [p for p in plugins if p["name"] == "rubberband"]
    assert plugin["source"].startswith("rubberband-airflow==")  # the package's entry point registers it
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/rubberband"]
    assert server.api("/plugins/importErrors") == {"import_errors": [], "total_entries": 0}


def test_the_page_is_served_behind_the_login(server):
    status, _ = server.get("/rubberband/")
    assert status == 401
    status, page = server.get("/rubberband/", server.token)
    assert status == 200 and "<h1>RubberBand tuning runs</h1>" in page


def test_the_plugins_command_lists_one_rubberband_plugin(server):
    r = run([str(BIN / "airflow"), "plugins", "-o", "json"], server.env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [p["name"] for p in json.loads(r.stdout)].count("rubberband") == 1
