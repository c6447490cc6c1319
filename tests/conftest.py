import json
import os
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (`make test` must not pass or fail by the draw);
# HYPOTHESIS_PROFILE=explore draws new ones, to look for counterexamples.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "rubberband_airflow" / "examples"


@pytest.fixture
def resnet_problem() -> dict:
    """The example problem of the model page: ResNet on p3 instances, 64 trials, eta 4."""
    return json.loads((EXAMPLES / "problem-resnet-p3.json").read_text())


# The plan of the model page's worked example.
WORKED_PLAN = {"instance_type": "p3.8xlarge",
               "stages": [{"gpus_per_trial": 1, "instances": 4}, {"gpus_per_trial": 1, "instances": 4},
                          {"gpus_per_trial": 1, "instances": 1}, {"gpus_per_trial": 4, "instances": 1}]}


# What the tests start and must not leave behind: agents and trial workers, Airflow components,
# moto's server, the headless browser and its driver.
_STARTED_BY_TESTS = ("rubberband_airflow.execution", "rubberband-agent", "moto_server", "bin/airflow ",
                     "playwright/driver", "--headless")


# Every process started by this test session inherits this mark in its environment, so that
# processes of another test session running at the same time are not taken for ours.
_SESSION_MARK = "RUBBERBAND_TEST_SESSION"
_MARK = os.environ.setdefault(_SESSION_MARK, f"{os.getpid()}-{time.time()}")
if (_WORKER := os.environ.get("PYTEST_XDIST_WORKER")) and not _MARK.endswith(f"-{_WORKER}"):
    # A worker of `pytest -n` inherits its controller's mark: each worker checks only its own processes.
    _MARK = os.environ[_SESSION_MARK] = f"{_MARK}-{_WORKER}"

# Under `pytest -n N --dist loadgroup` a module runs on one worker, its module fixtures made once; the
# modules on the session's Airflow stack (LocalExecutor) share one worker and so one stack.
_ONE_STACK = {"tests/fullstack/test_stack.py", "tests/fullstack/test_run_tab.py"}


# The slowest modules, slowest first (`make test` on this machine): they start first, so that the
# two workers end together rather than one waiting for a long module the other took up last.
# (The run tab's module reads the stack's shared digits run in flight: it goes before the stack's.)
_SLOWEST = ("tests/fullstack/test_run_tab.py", "tests/fullstack/test_stack.py", "tests/airflow/test_dag_runs.py",
            "tests/airflow/test_ec2_dag.py", "tests/execution/test_weather.py",
            "tests/airflow/test_attempts.py", "tests/test_mwaa_bundle.py", "tests/execution/test_ec2_backend.py",
            "tests/execution/test_recovery.py", "tests/execution/test_agent.py", "tests/execution/test_spot.py")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which adds the groups to the test ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {m: k for k, m in enumerate(_SLOWEST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: a module keeps its order
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group("airflow_stack" if module in _ONE_STACK else module))


def pytest_collection_finish(session: pytest.Session) -> None:
    """A worker of `--dist loadgroup` fails its collection where xdist could not add the groups to
    the test ids (the scheduler would then spread a module, and its fixtures, over both workers)."""
    if getattr(session.config.option, "loadgroup", False) and any("@" not in i.nodeid for i in session.items):
        raise pytest.UsageError("pytest-xdist did not group the tests (`--dist loadgroup`): this pytest "
                                "keeps test ids where xdist cannot add a group; use the versions of constraints.txt")


def ours(p: psutil.Process) -> bool:
    """Whether this test session (this xdist worker) started ``p``."""
    try:
        return p.environ().get(_SESSION_MARK) == _MARK
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running():
    """After the whole session (every other fixture torn down), no process a test started is alive."""
    began = time.time()
    yield

    def left() -> list[str]:
        out = []
        for p in psutil.process_iter(["pid", "cmdline", "create_time", "status"]):
            cmd = " ".join(p.info["cmdline"] or []) + " "
            # An agent run inside the session (not as a process) leaves its trials' fork server to
            # the session's process, which it ends with.
            server = "multiprocessing.forkserver" in cmd and p.ppid() == os.getpid()
            if (p.pid != os.getpid() and p.info["create_time"] >= began - 1 and p.info["status"] != psutil.STATUS_ZOMBIE
                    and any(m in cmd for m in _STARTED_BY_TESTS) and ours(p) and not server):
                out.append(f"{p.pid}: {cmd[:200]}")
        return out

    deadline = time.monotonic() + 30  # processes being stopped get a moment to exit
    while (leaked := left()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not leaked, "tests left processes running:\n" + "\n".join(leaked)
