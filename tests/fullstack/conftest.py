"""A real Airflow 3.3 stack for tests: PostgreSQL, scheduler, dag-processor, triggerer, api-server.

The database is one of its own on the PostgreSQL at ``RUBBERBAND_TEST_PG`` (default
postgresql://postgres@127.0.0.1:5432/postgres), created here and dropped afterwards; the
components run on 127.0.0.1 with LocalExecutor and are stopped at the end. Their DAGs are the
repo's dags/, with the EC2 example pointed at a moto server (its own process) whose instances
a ``Hypervisor`` boots, and a second EC2 DAG (the digits spec on EC2) to run beside it.

``celery_stack`` is the distributed one: CeleryExecutor (Redis broker, PostgreSQL result
backend) with two workers, the scale DAG's run storage on S3; a module's fixture, it stops when
test_stack_celery.py is done (``celery_stack_at`` builds it for benchmarks/bench_scale.py too).

Its fixtures are session-wide (but ``celery_stack``): every module here uses them from this file,
none imports them (an imported fixture is a fixture of that module, and would start a second stack).
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import psycopg2
import pytest
import yaml
from psycopg2 import sql

from rubberband_airflow.workloads import synthetic
from tests.airflow.conftest import (  # noqa: F401 (fixtures)
    BIN,
    ROOT,
    airflow_env,
    airflow_home,
    digits_profile,
    migrated_home,
    run,
)
from tests.execution.moto_cloud import BUCKET, REGION, MotoCloud, airflow_side, cloud, cloud_env

PG = os.environ.get("RUBBERBAND_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until ``url`` answers; fail with the log's tail if ``process`` exits or time runs out."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except (urllib.error.URLError, ConnectionError):
            if time.time() > deadline or process.poll() is not None:
                raise TimeoutError(f"{url} did not come up: " + log.read_text()[-3000:]) from None
            time.sleep(0.5)


class Stack:
    """The running stack, reached as its user ``admin`` (the simple auth manager, with a password)."""

    def __init__(self, home: Path, port: int, env: dict[str, str], password: str) -> None:
        self.home, self.port, self.env, self.password = home, port, env, password
        self.base = f"http://127.0.0.1:{port}"
        self._token: str | None = None
        self.processes: dict[str, subprocess.Popen] = {}  # component: its process, each a session of its own
        self.commands: dict[str, tuple[list[str], dict[str, str]]] = {}  # component: its arguments, environment

    def start(self, name: str) -> None:
        """Start a component (again), its output appended to its log."""
        args, added = self.commands[name]
        out = open(self.home / "component-logs" / f"{name}.log", "a")
        self.processes[name] = subprocess.Popen([str(BIN / "airflow"), *args], env={**self.env, **added}, cwd=ROOT,
                                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, name: str) -> None:
        """SIGKILL a component's whole process group, as a lost host or the OOM killer would end it."""
        p = self.processes[name]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    @property
    def token(self) -> str:
        """A JWT from ``POST /auth/token``, as a REST client gets one."""
        if self._token is None:
            self._token = self.request("POST", "/auth/token", {"username": "admin", "password": self.password},
                                       token=None)["access_token"]
        return self._token

    def request(self, method: str, path: str, body: Any = None, token: str | None = "") -> Any:
        """JSON over HTTP to the api-server; with the admin's bearer token unless ``token`` says otherwise."""
        headers = {"Content-Type": "application/json"}
        token = self.token if token == "" else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}{path}", data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return self.request(method, f"/api/v2{path}", body)

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

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, map_index: int = -1) -> str:
        quoted = urllib.request.quote(run_id, safe="")
        out = self.api("GET", f"/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}/logs/{try_number}"
                              f"?full_content=true&map_index={map_index}")
        lines = []
        for line in out["content"]:  # structured records: an event, and an exception's type and value if any
            if isinstance(line, dict):
                lines.append(str(line.get("event", "")))
                lines += [f"{e.get('exc_type')}: {e.get('exc_value')}" for e in line.get("error_detail") or []]
            else:
                lines.append(str(line))
        return "\n".join(lines)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of a run, page by page (the API gives at most 100 at a time)."""
        quoted = urllib.request.quote(run_id, safe="")
        tis: list[dict[str, Any]] = []
        while True:
            page = self.api("GET", f"/dags/{dag_id}/dagRuns/{quoted}/taskInstances?limit=100&offset={len(tis)}")
            tis += page["task_instances"]
            if not page["task_instances"] or len(tis) >= page["total_entries"]:
                return tis

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        return {f"{t['task_id']}[{t['map_index']}]": t["state"] for t in self.task_instances(dag_id, run_id)}


@contextmanager
def moto_cloud_server(folder: Path) -> Iterator[MotoCloud]:
    """moto's server in a process of its own (its state apart from any other test's), set up by ``cloud``."""
    port = _free_port()
    log = open(folder / "moto_server.log", "w")
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(f"{endpoint}/moto-api/", server, Path(log.name))
        with pytest.MonkeyPatch.context() as mp, cloud(mp, endpoint, folder / "agents") as c:
            yield c
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="session")
def stack_cloud(tmp_path_factory) -> Iterator[MotoCloud]:
    """moto's server for the stacks (see ``moto_cloud_server``)."""
    with moto_cloud_server(tmp_path_factory.mktemp("moto")) as c:
        yield c


def _ec2_backend(c: MotoCloud) -> dict[str, Any]:
    return {"type": "ec2", "aws_conn_id": "aws_default", "region": REGION, "ami": c.image_id, "subnets": c.subnets,
            "security_groups": [c.security_group], "instance_profile": c.instance_profile}


def _stack_dags(dags: Path, c: MotoCloud, profile: Path) -> None:
    """The repo's DAGs; the nightly EC2 example on the moto account (triggered by the tests, so no
    schedule) and ``digits_ec2``, the digits spec on EC2. Their profile is the digits one, in the bucket."""
    shutil.copytree(ROOT / "dags", dags, ignore=shutil.ignore_patterns("__pycache__"))
    nightly = yaml.safe_load((dags / "nightly_ec2_tuning.yaml").read_text())
    nightly.update(schedule=None, storage=f"s3://{BUCKET}/rubberband",
                   profile=f"s3://{BUCKET}/rubberband/profiles/g5.12xlarge.json",
                   backend={**nightly["backend"], **_ec2_backend(c)})
    (dags / "nightly_ec2_tuning.yaml").write_text(yaml.safe_dump(nightly))
    digits = yaml.safe_load((ROOT / "dags" / "digits_tuning.yaml").read_text())
    digits.update(name="digits_ec2", description="The digits spec on EC2 instances.", storage=f"s3://{BUCKET}/rubberband",
                  profile=nightly["profile"],
                  backend={**_ec2_backend(c), "instance_types": [{"name": "g5.xlarge", "max_instances": 2}]})
    (dags / "digits_ec2.yaml").write_text(yaml.safe_dump(digits))
    shutil.copy(ROOT / "dags" / "digits_tuning.py", dags / "digits_ec2.py")
    with fsspec.open(nightly["profile"], "w") as f:
        f.write(profile.read_text())


@contextmanager
def _stack(home: Path, dags: Path, settings: dict[str, str],
           extra: dict[str, tuple[list[str], dict[str, str]]] | None = None) -> Iterator[Stack]:
    """Airflow on a database of its own on PostgreSQL: ``COMPONENTS`` and the ``extra`` ones
    (name: arguments of ``airflow``, environment added to the stack's), with ``settings`` on top of
    the environment every stack has (``{db}`` in one is the database's name); all stopped, and the
    database dropped, at the end."""
    db = f"rubberband_test_{os.getpid()}_{home.name}".lower()
    admin = psycopg2.connect(PG)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    password = secrets.token_urlsafe(16)
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({"admin": password}))
    port = _free_port()
    url = PG.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://") + f"/{db}"
    # The components reach AWS through the connection aws_default only (no ambient keys).
    env = {**airflow_side(airflow_env(home, dags)), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url,
           "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__PARALLELISM": "8",
           "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
           "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
           "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
           "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
           "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
           "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
           "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
           **{k: v.replace("{db}", db) for k, v in settings.items()}}
    stack = Stack(home, port, env, password)
    try:
        r = run([str(BIN / "airflow"), "db", "migrate"], env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        logs = home / "component-logs"
        logs.mkdir()
        stack.commands = {name: ([name], {}) for name in COMPONENTS} | (extra or {})
        for name in stack.commands:
            stack.start(name)
        _wait_until_up(f"{stack.base}/api/v2/monitor/health", stack.processes["api-server"], logs / "api-server.log")
        yield stack
    finally:
        processes = list(stack.processes.values())
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


@pytest.fixture(scope="package")
def airflow_stack(tmp_path_factory, digits_profile, stack_cloud) -> Iterator[Stack]:
    """The LocalExecutor stack with the repo's DAGs and the EC2 ones on moto; it stops when a worker
    goes on to tests outside tests/fullstack (the modules on it run one after the other: conftest.py)."""
    home = tmp_path_factory.mktemp("stack_home")
    profile = home / "rubberband" / "profiles" / "local-1.json"
    profile.parent.mkdir(parents=True)
    shutil.copy(digits_profile, profile)
    dags = home / "dags"
    _stack_dags(dags, stack_cloud, profile)
    with _stack(home, dags, {}) as stack:
        yield stack


# The scale DAG: the synthetic workload (sleeping epochs) on oversubscribed local instances,
# run storage on S3. Its spec's trials are the most a test or the benchmark asks for, a quarter
# of what the trigger form allows (the form's num_trials picks 16, 64 or 256).
SCALE_DAG = "synthetic_scale"
SCALE_PREFIX = "scale"
CELERY_WORKERS = 2
# Its epochs sleep this long whatever the GPUs (serial 1): every trial is a process of one slot (a
# trial on more would start a torch process per rank, seconds of CPU each on this machine).
EPOCH_SECONDS = 2.0


def synthetic_spec(name: str, storage: str, profile: str, sha: dict[str, int], slots: int, max_instances: int,
                   deadline_seconds: float, epoch_seconds: float = EPOCH_SECONDS) -> dict[str, Any]:
    """A tuning DAG's spec: the synthetic workload's sleeping epochs (serial 1) on oversubscribed
    local instances of ``slots``."""
    return {"name": name, "schedule": None, "trainable": "rubberband_airflow.workloads.synthetic:train",
            "metric": "loss", "mode": "min",
            "search_space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0},
                             "y": {"type": "uniform", "low": 0.0, "high": 1.0},
                             "epoch_seconds": {"type": "choice", "values": [epoch_seconds]},
                             "serial": {"type": "choice", "values": [1.0]}},
            "sha": sha, "deadline_seconds": deadline_seconds,
            "backend": {"type": "local", "instance_type": "local-sleep", "slots": slots, "price_per_hour": 1.0,
                        "max_instances": max_instances, "oversubscribe": True},
            "billing": {"minimum_seconds": 0, "increment_seconds": 1},
            "storage": storage, "profile": profile, "trial_timeout": {"factor": 3, "floor_seconds": 300}, "seed": 0}


def scale_spec(deadline_seconds: float = 240) -> dict[str, Any]:
    """The scale DAG's spec: 64 trials by default, eta 4, two stages; 16 instances of 16 slots."""
    return synthetic_spec(SCALE_DAG, f"s3://{BUCKET}/{SCALE_PREFIX}", f"s3://{BUCKET}/{SCALE_PREFIX}/profile.json",
                          {"num_trials": 64, "eta": 4, "min_epochs": 1, "num_stages": 2}, 16, 16, deadline_seconds)


@contextmanager
def celery_stack_at(home: Path, c: MotoCloud, settings: dict[str, str] | None = None,
                    components: dict[str, tuple[list[str], dict[str, str]]] | None = None,
                    specs: dict[str, dict[str, Any]] | None = None) -> Iterator[Stack]:
    """Airflow with CeleryExecutor: Redis (127.0.0.1:6379) the broker, the stack's PostgreSQL database
    the result backend, two workers on a queue of the stack's own, and the scale DAG, whose run
    storage is on S3 (moto's server), so no task reads another's local disk. The workers host the
    local instances (agent processes) the DAG launches. ``settings`` add to its environment;
    ``components`` replace or add components, as ``_stack``'s ``extra``; ``specs`` are more tuning
    DAGs, by DAG id."""
    dags = home / "dags"
    dags.mkdir(parents=True)
    for dag_id, spec in {SCALE_DAG: scale_spec(), **(specs or {})}.items():
        (dags / f"{dag_id}.yaml").write_text(yaml.safe_dump(spec))
        shutil.copy(ROOT / "dags" / "digits_tuning.py", dags / f"{dag_id}.py")
    with fsspec.open(f"s3://{BUCKET}/{SCALE_PREFIX}/profile.json", "w") as f:
        f.write(json.dumps(synthetic.profile(16, EPOCH_SECONDS, 1.0, trial_overhead_seconds=1.0,
                                             stage_overhead_seconds=10.0, instance_type="local-sleep")))
    queue = f"rubberband-{os.getpid()}"
    pg = PG.rsplit("/", 1)[0].replace("postgresql://", "db+postgresql://")
    celery = {"AIRFLOW__CORE__EXECUTOR": "CeleryExecutor", "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
                "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}",
                "AIRFLOW__CELERY__RESULT_BACKEND": f"{pg}/{{db}}",
                "AIRFLOW__CORE__PARALLELISM": "32", "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "64",
                "AIRFLOW__SCHEDULER__MAX_TIS_PER_QUERY": "512"}
    # The machine's credentials for S3 (an instance role's): a local backend's storage is reached
    # with fsspec's own, by the agents and by every Airflow component that reads run storage.
    machine = {k: v for k, v in cloud_env(c.endpoint).items() if k.startswith(("AWS_", "FSSPEC_"))}
    workers = {f"celery-worker-{k}": (["celery", "worker", "--concurrency", "8", "--queues", queue,
                                       "--celery-hostname", f"worker{k}@%h"],
                                      {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port())})
               for k in range(1, CELERY_WORKERS + 1)}
    with _stack(home, dags, {**celery, **machine, **(settings or {})}, {**workers, **(components or {})}) as stack:
        yield stack


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory, stack_cloud) -> Iterator[Stack]:
    """The Celery stack (``celery_stack_at``) with trial waits started on the triggerer; it stops
    when the module's tests are done."""
    # A task whose worker died is failed (and retried) after a minute without heartbeats, not five.
    with celery_stack_at(tmp_path_factory.mktemp("celery_home"), stack_cloud,
                         {"AIRFLOW__RUBBERBAND__WAITS_START_ON_TRIGGERER": "True",
                          "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60"}) as stack:
        yield stack


def run_folder(run_id: str) -> str:
    """A run's folder name in run storage (``tuning.run_uri``'s)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)


@pytest.fixture(scope="package")
def digits_rest_run(airflow_stack) -> str:
    """The id of a digits run with 4 trials and a 600 s deadline, triggered over REST when first asked
    for (returned at once, the run in flight); the tests that read a finished digits run share it."""
    airflow_stack.wait_for_dag("digits_tuning")
    return airflow_stack.trigger("digits_tuning", {"num_trials": 4, "deadline_seconds": 600})
