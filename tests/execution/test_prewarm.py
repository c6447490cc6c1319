"""Pre-warming executed (docs/planning-model.md section 4, step 2): the next stage's added instances
requested during a stage at its start plus the plan's lead time, unless the barrier comes first;
real agents on the local backend running sleeping trials."""

import time

import pytest

from rubberband_airflow.execution import runner
from rubberband_airflow.execution.runner import RunPlan, RunSpec
from rubberband_airflow.search_space import sample
from rubberband_airflow.workloads import synthetic
from tests.execution.conftest import plan_json

SYNTHETIC = "rubberband_airflow.workloads.synthetic:train"


def _start(storage, backend, lead: float | None) -> RunPlan:
    """A run of 2 trials of 2 one-second epochs on one instance, whose stage 2 has two; stage 1 placed."""
    plan = plan_json("local-1", 1, [(1, 1), (1, 2)], num_trials=2, eta=2, min_epochs=2)
    if lead is not None:
        plan["stages"][1]["launch_after_seconds"] = lead
    run_plan = RunPlan.from_json(plan)
    configs = [{**c, "epoch_seconds": 1.0, "serial": 0.0} for c in sample(synthetic.SEARCH_SPACE, 2, seed=1)]
    runner.start_run(storage, RunSpec(SYNTHETIC, synthetic.METRIC, synthetic.MODE), configs, plan, 1)
    runner.begin_stage(storage, 1)
    runner.scale(backend, run_plan, 1)
    runner.stage_placement(storage, backend, run_plan, 1)
    return run_plan


def _finish_stage_1(storage, backend, run_plan: RunPlan) -> None:
    runner.wait_stage(storage, backend, 1, runner.stage_trials(storage, 1), 60, run_plan=run_plan)
    runner.promote_stage(storage, backend, run_plan, 1, synthetic.MODE)


def test_the_next_stages_instances_are_requested_at_the_lead_time_and_not_again(storage, local_backend):
    backend = local_backend(slots=1)
    run_plan = _start(storage, backend, lead=1.5)
    start = storage.read_json("stages", "1", "start.json")["time"]
    assert runner.prewarm_due(storage, run_plan, 1) == pytest.approx(start + 1.5)
    [warm] = runner.prewarm(storage, backend, run_plan, 1, poll=0.1)
    entry = next(e for e in storage.ledger() if e["instance"] == warm)
    assert start + 1.5 <= entry["requested"] < start + 3.0
    assert runner.prewarm(storage, backend, run_plan, 1, poll=0.1) == [warm]  # a retry launches nothing
    _finish_stage_1(storage, backend, run_plan)
    # It was requested while stage 1 still ran, and took none of its trials.
    ends = [storage.read_result(t, 1)["finished"] for t in runner.stage_trials(storage, 1)]
    assert entry["requested"] < min(ends)
    assert warm not in {storage.read_result(t, 1)["instance"] for t in runner.stage_trials(storage, 1)}
    # Stage 2 finds it live and launches nothing more.
    runner.begin_stage(storage, 2)
    assert runner.scale_out(backend, run_plan, 2, 8) == []
    assert backend.live()[-1] == warm and len(backend.live()) == 2


def test_no_prewarm_when_the_barrier_comes_first_or_the_plan_has_none(storage, local_backend):
    backend = local_backend(slots=1)
    run_plan = _start(storage, backend, lead=60.0)
    began = time.monotonic()
    assert runner.prewarm(storage, backend, run_plan, 1, poll=0.2) == []  # returns at the barrier, not at 60 s
    assert time.monotonic() - began < 30
    assert all(storage.read_result(t, 1) for t in runner.stage_trials(storage, 1))
    assert len(storage.ledger()) == 1
    # A plan without a lead time for stage 2: nothing to wait for.
    plain = RunPlan.from_json(plan_json("local-1", 1, [(1, 1), (1, 2)], num_trials=2, eta=2, min_epochs=2))
    assert runner.prewarm_due(storage, plain, 1) is None
    assert runner.prewarm(storage, backend, plain, 1) == [] and len(storage.ledger()) == 1
