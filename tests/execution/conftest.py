import os
from pathlib import Path

import psutil
import pytest

from rubberband_airflow.execution.backends.local import LocalBackend, LocalInstanceType
from rubberband_airflow.execution.storage import RunStorage

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def storage(tmp_path) -> RunStorage:
    return RunStorage(f"file://{tmp_path}/run")


@pytest.fixture
def env() -> dict:
    """Agents and workers import the test trainables from the repository root."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture
def local_backend(storage, env):
    backends = []

    def make(slots: int = 1, boot: float = 0.0, pending: float = 0.0, timeout: float = 120.0) -> LocalBackend:
        b = LocalBackend(storage, LocalInstanceType(f"local-{slots}", slots, pending, boot), trial_timeout=timeout,
                         env=env)
        backends.append(b)
        return b

    yield make
    for b in backends:  # whatever a test did, no agent outlives it
        b.terminate_all()


def agent_processes(storage: RunStorage) -> list[psutil.Process]:
    """Agent and worker processes of this run still alive on the machine."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if storage.uri in cmd and p.status() != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out
