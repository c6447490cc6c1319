"""The runtime installs and runs without Airflow: a fresh virtual environment with the package's base
dependencies only (what a GPU instance installs) runs the CLI's planner, an agent and a trial."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rubberband_airflow.execution.runner import RunSpec, assign_stage, start_run
from rubberband_airflow.execution.storage import RunStorage
from tests.execution.conftest import ROOT, agent_processes

# What runs without Airflow: the agent, its workers, storage, backends, the trainable API, the
# planning core and everything the `rubberband` CLI's commands import (profile reads tuning).
RUNTIME_MODULES = ("rubberband_airflow.execution.agent", "rubberband_airflow.execution.worker",
                   "rubberband_airflow.execution.storage", "rubberband_airflow.execution.runner",
                   "rubberband_airflow.execution.backends.local", "rubberband_airflow.execution.backends.ec2",
                   "rubberband_airflow.trainable", "rubberband_airflow.search_space", "rubberband_airflow.profiler",
                   "rubberband_airflow.report", "rubberband_airflow.tuning", "rubberband_airflow.cli",
                   "rubberband_airflow.workloads.digits")
IMPORT_ALL = f"""
import importlib, pkgutil, sys
import rubberband_airflow.planning as planning
core = tuple(m.name for m in pkgutil.iter_modules(planning.__path__, "rubberband_airflow.planning."))
for name in {RUNTIME_MODULES!r} + core:
    importlib.import_module(name)
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in ("airflow", "torch"))))
"""


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without its Python path and virtualenv: the venv's own packages only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    return {**env, **extra}


def test_runtime_modules_import_no_airflow():
    """Here Airflow is installed: importing the runtime must still leave it (and torch) unimported."""
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == []


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding the package installed without extras, from a copy of its sources (a build
    writes into its source tree); wheels come from pip's cache where it has them."""
    tmp = tmp_path_factory.mktemp("runtime")
    src = tmp / "src"
    shutil.copytree(ROOT / "rubberband_airflow", src / "rubberband_airflow",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=_env())
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile",
                        "-c", str(ROOT / "constraints.txt"), str(src)],
                       capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return venv


def test_the_runtime_installs_without_airflow_and_plans(runtime_venv, tmp_path):
    python = str(runtime_venv / "bin" / "python")
    for absent in ("airflow", "torch"):
        r = subprocess.run([python, "-c", f"import {absent}"], capture_output=True, text=True, timeout=60,
                           env=_env(), cwd=tmp_path)
        assert r.returncode != 0 and f"No module named '{absent}'" in r.stderr
    r = subprocess.run([python, "-c", IMPORT_ALL], capture_output=True, text=True, timeout=120, env=_env(),
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split() == [], r.stderr[-3000:]
    problem = ROOT / "rubberband_airflow" / "examples" / "problem-worked-example.json"
    r = subprocess.run([str(runtime_venv / "bin" / "rubberband"), "plan", str(problem)], capture_output=True,
                       text=True, timeout=120, env=_env(), cwd=tmp_path)
    assert r.returncode == 0 and '"stages"' in r.stdout, r.stderr[-3000:]


def test_an_agent_runs_a_trial_in_the_runtime_venv(runtime_venv, tmp_path):
    """The venv's `rubberband-agent` runs a plain-Python trial to its result, then stops on its stop file."""
    path = tmp_path / "path"  # only the trainable's module, not the repository (which holds the package)
    path.mkdir()
    shutil.copy(ROOT / "tests" / "trainables.py", path / "trainables.py")
    storage = RunStorage(f"file://{tmp_path}/run")
    [trial] = start_run(storage, RunSpec("trainables:plain", "accuracy", "max", seed=1), [{"lr": 0.25}],
                        {"instance_type": "local", "stages": []}, 1)
    instance = "i-runtime"
    assign_stage(storage, 1, {instance: [{"trial": trial, "gpus": 1, "start_epoch": 0, "stop_epoch": 2}]})
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen([str(runtime_venv / "bin" / "rubberband-agent"), "--run", storage.uri,
                                  "--instance", instance, "--slots", "1", "--trial-timeout", "60",
                                  "--poll-seconds", "0.2"],
                                 env=_env(PYTHONPATH=str(path)), cwd=path, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while (result := storage.read_result(trial, 1)) is None and agent.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert result is not None, (tmp_path / "agent.log").read_text()[-3000:]
        assert result["state"] == "done" and result["epoch"] == 2, result
        assert result["metric"] == pytest.approx(1 - 0.25 / 2)
        assert [m["epoch"] for m in storage.metrics(trial)] == [1, 2]

        storage.write_bytes(b"", "instances", instance, "stop")
        assert agent.wait(timeout=30) == 0
        assert storage.heartbeat(instance)["state"] == "stopping"
        assert agent_processes(storage) == []
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
