import os
from pathlib import Path

import psutil
import pytest

from rubberband_airflow.execution import runner
from rubberband_airflow.execution.backends.local import LocalBackend, LocalInstanceType
from rubberband_airflow.execution.runner import RunPlan
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.plan import Plan
from rubberband_airflow.planning.problem import parse_problem
from tests.conftest import ours

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
    """Agent and worker processes of this run that this test session started, still alive (another
    session on the machine may run the same test, with the same storage URI, at the same time)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if storage.uri in cmd and p.status() != psutil.STATUS_ZOMBIE and ours(p):
            out.append(p)
    return out


def plan_json(instance_type: str, gpus: int, stages: list[tuple[int, int]], *, num_trials: int, eta: int,
              min_epochs: int, epoch_seconds: float = 1.0, pending: float = 0.0, boot: float = 0.0) -> dict:
    """A plan with its problem, as the planning task returns it: (gpus_per_trial, instances) per stage."""
    problem = parse_problem({
        "sha": {"num_trials": num_trials, "eta": eta, "min_epochs": min_epochs, "num_stages": len(stages)},
        "workload": {"epoch_seconds": {str(g): epoch_seconds / g for g, _ in stages},
                     "trial_overhead_seconds": 1.0, "stage_overhead_seconds": 1.0},
        "instance_types": [{"name": instance_type, "gpus": gpus, "price_per_hour": 1.0,
                            "pending_seconds": pending, "boot_seconds": boot}],
        "deadline_seconds": 3600})
    return RunPlan(problem, Plan.of(instance_type, stages)).to_json()


def run_stage(storage: RunStorage, backend, run_plan: RunPlan, stage: int, mode: str, timeout: float = 120) -> None:
    """One stage as the tuning DAG's tasks run it: begin, scale, place, wait for its trials, promote."""
    runner.begin_stage(storage, stage)
    runner.scale(backend, run_plan, stage)
    placement = runner.stage_placement(storage, backend, run_plan, stage)
    runner.wait_stage(storage, backend, stage, [t["trial"] for ts in placement.values() for t in ts], timeout,
                      run_plan=run_plan)
    runner.promote_stage(storage, backend, run_plan, stage, mode)


def one_trial_spec(folder: Path, name: str, trainable: str, min_epochs: int) -> Path:
    """A tuning spec of one trial in one stage on the local backend, its storage and profile in ``folder``."""
    spec = folder / f"{name}.yaml"
    spec.write_text(f"""
name: {name}
trainable: {trainable}
metric: accuracy
mode: max
search_space: {{lr: {{type: uniform, low: 0.1, high: 0.2}}}}
sha: {{num_trials: 1, eta: 2, min_epochs: {min_epochs}, num_stages: 1}}
deadline_seconds: 300
backend: {{type: local, instance_type: local-1, slots: 1, price_per_hour: 1.0, max_instances: 2}}
storage: file://{folder}
profile: {folder}/profile.json
trial_timeout_seconds: 120
""")
    return spec
