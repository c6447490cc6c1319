"""The synthetic workload: sleeping epochs on a known curve, real checkpoints, a known best trial;
and the local backend's opt-in to more slots than cores, for it alone."""

import copy

import pytest
import yaml

from rubberband_airflow.execution.backends.local import LocalBackend, LocalInstanceType, machine_slots
from rubberband_airflow.execution.checkpoint import read_info
from rubberband_airflow.execution.runner import RunSpec, run_sha
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.search_space import sample
from rubberband_airflow.spec import SpecError, parse_spec
from rubberband_airflow.tuning import planning_problem
from rubberband_airflow.workloads import synthetic
from tests.airflow.conftest import ROOT
from tests.execution.conftest import agent_processes, plan_json

SYNTHETIC = "rubberband_airflow.workloads.synthetic:train"


def _spec(trainable: str = SYNTHETIC, **backend):
    data = yaml.safe_load((ROOT / "dags" / "digits_tuning.yaml").read_text())
    data.update(trainable=trainable, metric="loss", mode="min", search_space=synthetic.SEARCH_SPACE,
                sha={"num_trials": 256, "eta": 4, "min_epochs": 1}, deadline_seconds=600)
    data["backend"].update(backend)
    return parse_spec(copy.deepcopy(data), "synthetic.yaml")


def test_oversubscribe_is_only_for_a_trainable_that_does_not_compute():
    with pytest.raises(SpecError) as e:
        _spec("rubberband_airflow.workloads.digits:train", oversubscribe=True)
    assert e.value.field == "backend.oversubscribe" and "digits:train computes" in e.value.message
    with pytest.raises(SpecError) as e:
        _spec(oversubscribe="yes")
    assert e.value.field == "backend.oversubscribe" and "true or false" in e.value.message
    assert _spec(oversubscribe=True).backend.oversubscribe
    assert not _spec().backend.oversubscribe  # the default


def test_slots_beyond_the_machines_cores_need_the_opt_in():
    profile = synthetic.profile(16, trial_overhead_seconds=0.5, stage_overhead_seconds=2.0)
    too_many = machine_slots() + 1
    # Without it, an instance type with more slots than the machine has is refused, naming the field,
    # for the synthetic workload and a computing one alike.
    for trainable in (SYNTHETIC, "rubberband_airflow.workloads.digits:train"):
        with pytest.raises(ProblemError) as e:
            planning_problem(_spec(trainable, slots=too_many), {}, profile)
        assert e.value.field == "backend.slots" and f"{machine_slots()} GPUs (or CPU cores" in e.value.message
    # With it, a 16-instance fleet of 16 slots each is the planner's to use on this 2-core machine.
    problem = parse_problem(planning_problem(_spec(slots=16, max_instances=16, oversubscribe=True), {}, profile))
    [itype] = problem.instance_types
    assert itype.gpus == 16 and itype.max_instances == 16
    # A computing workload within the cores is still capped to what fits without sharing one.
    digits = planning_problem(_spec("rubberband_airflow.workloads.digits:train", slots=1, max_instances=16), {},
                              profile)
    assert digits["instance_types"][0]["max_instances"] == machine_slots()


def test_profile_gives_the_curve_the_planner_fits():
    problem = parse_problem(planning_problem(_spec(slots=8, max_instances=2, oversubscribe=True), {},
                                             synthetic.profile(8, 2.0, 0.25, trial_overhead_seconds=0.5,
                                                               stage_overhead_seconds=1.0)))
    for g in (1, 2, 4, 8):
        assert problem.workload.epoch_seconds[g] == pytest.approx(2.0 * (0.25 + 0.75 / g))


def test_a_run_sleeps_on_the_curve_resumes_its_checkpoints_and_finds_the_known_best(storage, env):
    # 16 trials at once on 4 instances of 4 slots: twice the cores of this machine, which a sleeping
    # workload may use.
    slots, instances = 4, 4
    backend = LocalBackend(storage, LocalInstanceType("local-sleep", slots), trial_timeout=120, env=env)
    configs = [{**c, "epoch_seconds": 0.5, "serial": 0.2, "noise": 0.0}
               for c in sample(synthetic.SEARCH_SPACE, 16, seed=5)]
    plan = plan_json("local-sleep", slots, [(1, instances), (2, 2)], num_trials=16, eta=4, min_epochs=2)
    try:
        out = run_sha(storage, backend, RunSpec(SYNTHETIC, synthetic.METRIC, synthetic.MODE, seed=1), configs, plan)
    finally:
        backend.terminate_all()
    first, second = out["stages"]
    assert first["failed"] == [] and second["failed"] == [] and len(second["trials"]) == 4
    by_trial = {f"trial-{k:04d}": c for k, c in enumerate(configs)}
    assert out["best"]["trial"] == synthetic.best_config(by_trial)  # known in advance
    assert out["best"]["metric"] == pytest.approx(synthetic.loss(by_trial[out["best"]["trial"]], 8))
    for trial in second["trials"]:
        metrics = storage.metrics(trial)
        assert [m["epoch"] for m in metrics] == list(range(1, 9))  # 2 epochs, then 6 more after promotion
        assert read_info(storage, trial).epoch == 8
        # Stage 1 on 1 slot, stage 2 on 2: the curve's epoch times, slept (not computed).
        assert metrics[0]["epoch_seconds"] == pytest.approx(0.5)
        assert metrics[-1]["epoch_seconds"] == pytest.approx(0.5 * (0.2 + 0.8 / 2))
        gaps = [b["time"] - a["time"] for a, b in zip(metrics[2:], metrics[3:])]
        assert min(gaps) >= 0.3 - 0.01
    assert backend.live() == [] and agent_processes(storage) == []
