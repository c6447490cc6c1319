import copy

import numpy as np
from hypothesis import given, settings, strategies as st

from rubberband_airflow.planning.plan import parse_plan
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.planning.simulator import Draws, simulate, simulate_outcome
from tests.conftest import WORKED_PLAN
from tests.planning.reference import assert_simulator_matches
from tests.planning.strategies import plans, problems


def test_worked_example_to_the_cent(resnet_problem):
    problem = parse_problem(resnet_problem)
    out = simulate(problem, parse_plan(WORKED_PLAN, problem))
    for stat in ("mean", "p50", "p95", "quantile"):
        assert out["jct_seconds"][stat] == 2334.0
    for stat in ("mean", "p50", "p95"):
        assert round(out["cost_usd"][stat], 4) == 14.2766
    assert out["samples"] == 256


def test_worked_example_stage_ends(resnet_problem):
    problem = parse_problem(resnet_problem)
    outcome = simulate_outcome(problem, parse_plan(WORKED_PLAN, problem), Draws.for_problem(problem))
    assert outcome.stage_end[0].tolist() == [465.0, 680.0, 1435.0, 2334.0]


def test_data_price_adds_one_restore_per_promoted_trial(resnet_problem):
    resnet_problem["billing"]["data_price_per_gb"] = 0.09
    problem = parse_problem(resnet_problem)
    out = simulate(problem, parse_plan(WORKED_PLAN, problem))
    # n_2 + n_3 + n_4 = 16 + 4 + 1 restores of 0.1 GB at $0.09/GB
    assert round(out["cost_usd"]["mean"], 6) == round(14.2766 + 21 * 0.1 * 0.09, 6)


def test_a_teardown_bills_the_instances_live_at_the_end_for_it_and_leaves_the_jct(resnet_problem):
    resnet_problem["workload"]["teardown_seconds"] = 90.0
    problem = parse_problem(resnet_problem)
    out = simulate(problem, parse_plan(WORKED_PLAN, problem))
    assert out["jct_seconds"]["mean"] == 2334.0
    # One p3.8xlarge ($12.24 an hour) is live at the end: 90 s more of it
    assert round(out["cost_usd"]["mean"], 4) == round(14.2766 + 90 * 12.24 / 3600, 4)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_vectorised_equals_event_by_event(data):
    problem = parse_problem(data.draw(problems()))
    plan = parse_plan(data.draw(plans(problem)), problem)
    assert_simulator_matches(problem, plan)


def test_noise_is_reproducible_and_seeded(resnet_problem):
    resnet_problem["workload"]["straggler_sigma"] = 0.3
    resnet_problem["instance_types"][1]["pending_sigma"] = 0.5
    problem = parse_problem(resnet_problem)
    plan = parse_plan(WORKED_PLAN, problem)
    first, again = simulate(problem, plan), simulate(problem, plan)
    assert first == again
    other = copy.deepcopy(resnet_problem)
    other["planner"] = {"seed": 7}
    assert simulate(parse_problem(other), plan) != first
    # Stragglers make the barrier wait for the slowest trial: the quantile is later than the noise-free run.
    assert first["jct_seconds"]["p50"] <= first["jct_seconds"]["quantile"]
    assert first["jct_seconds"]["quantile"] > 2334.0


def test_straggler_factor_has_mean_one(resnet_problem):
    resnet_problem["workload"]["straggler_sigma"] = 0.5
    resnet_problem["sha"] = {"num_trials": 1, "eta": 2, "min_epochs": 10}
    resnet_problem["planner"] = {"samples": 20000, "seed": 1}
    resnet_problem["workload"]["trial_overhead_seconds"] = 0
    resnet_problem["workload"]["stage_overhead_seconds"] = 0
    problem = parse_problem(resnet_problem)
    plan = parse_plan({"instance_type": "p3.8xlarge", "stages": [{"gpus_per_trial": 1, "instances": 1}]}, problem)
    outcome = simulate_outcome(problem, plan, Draws.for_problem(problem))
    train = outcome.jct - 130  # pending 40 + boot 90, then one trial of 10 epochs x 60 s
    assert abs(train.mean() / 600 - 1) < 0.02


def test_idle_early_instance_is_not_billed_before_running(resnet_problem):
    # 1 trial, 4 instances requested: all are billed from running (T + pending) to the end.
    resnet_problem["sha"] = {"num_trials": 1, "eta": 2, "min_epochs": 1}
    problem = parse_problem(resnet_problem)
    plan = parse_plan({"instance_type": "p3.8xlarge", "stages": [{"gpus_per_trial": 1, "instances": 4}]}, problem)
    out = simulate(problem, plan)
    jct = 15 + 40 + 90 + 80
    assert out["jct_seconds"]["mean"] == jct
    assert np.isclose(out["cost_usd"]["mean"], 4 * (jct - 55) * 12.24 / 3600)
