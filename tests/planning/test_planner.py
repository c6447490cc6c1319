import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from rubberband_airflow.planning.errors import InfeasibleError
from rubberband_airflow.planning.exhaustive import all_plans, exhaustive_optimum
from rubberband_airflow.planning.frontier import frontier
from rubberband_airflow.planning.plan import parse_plan
from rubberband_airflow.planning.planner import Evaluator, lower_bound_cost, plan_problem
from rubberband_airflow.planning.problem import (
    SHA,
    Billing,
    InstanceType,
    PlannerSettings,
    Problem,
    Workload,
    parse_problem,
)
from rubberband_airflow.planning.simulator import simulate
from tests.planning.strategies import problems


@st.composite
def small_problems(draw, noise: bool):
    """Problems of 2 or 3 stages whose deadline lies between 0.9x and 2.5x the fastest noise-free JCT."""
    data = draw(problems(noise=noise, max_instances=3, max_trials=16))
    data["sha"]["eta"] = draw(st.integers(2, 3))
    data["sha"]["num_trials"] = draw(st.integers(data["sha"]["eta"] ** 2, 16))
    data["sha"]["num_stages"] = draw(st.integers(2, 3)) if data["sha"]["num_trials"] >= 9 else 2
    if noise:
        data["planner"]["samples"] = draw(st.integers(16, 64))
    problem = parse_problem(data)
    fastest = min(f[0].jct for t in problem.instance_types if (f := frontier(problem, t, fastest_only=True)))
    data["deadline_seconds"] = fastest * draw(st.floats(0.9, 2.5))
    return parse_problem(data)


def _check_against_exhaustive(problem):
    ev = Evaluator(problem)
    best = exhaustive_optimum(problem, ev)
    if best is None:
        with pytest.raises(InfeasibleError) as err:
            plan_problem(problem)
        fastest = min(ev(p).jct_quantile for p in all_plans(problem))
        assert err.value.fastest_jct_seconds > problem.deadline_seconds
        assert err.value.fastest_jct_seconds >= fastest - 1e-9
        return None
    out = plan_problem(problem)
    plan = parse_plan(out, problem)
    assert ev.on_time(plan)
    assert out["predicted"]["jct_seconds"]["quantile"] <= problem.deadline_seconds
    assert out["predicted"]["cost_usd"]["mean"] <= ev(best).cost_mean * 1.01 + 1e-9
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems(noise=False))
def test_noise_free_plan_is_the_exact_optimum(problem):
    _check_against_exhaustive(problem)


# Found by hypothesis: the cheapest plan in mean cost, (2, 1, 1) instances, lies three frontier
# plans before the last on-time one, outside the window around it, and three moves from it.
_FASTER_IS_CHEAPER = parse_problem({
    "sha": {"num_trials": 12, "eta": 2, "min_epochs": 2, "num_stages": 3},
    "workload": {"epoch_seconds": {"1": 14.0, "2": 1.0}, "trial_overhead_seconds": 0, "stage_overhead_seconds": 0,
                 "straggler_sigma": 0.3, "checkpoint_gb": 0},
    "instance_types": [
        {"name": "type-0", "gpus": 1, "price_per_hour": 1.0, "pending_seconds": 92, "boot_seconds": 101,
         "pending_sigma": 0, "max_instances": 3},
        {"name": "type-1", "gpus": 1, "price_per_hour": 2.0, "pending_seconds": 0, "boot_seconds": 0,
         "pending_sigma": 0, "max_instances": 1}],
    "deadline_seconds": 807.9375, "billing": {"minimum_seconds": 0, "increment_seconds": 60, "data_price_per_gb": 0},
    "planner": {"jct_quantile": 0.5, "samples": 59, "seed": 1}})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems(noise=True))
@example(_FASTER_IS_CHEAPER)
def test_noisy_plan_within_one_percent_of_exhaustive_optimum(problem):
    _check_against_exhaustive(problem)


# Found by hypothesis (HYPOTHESIS_PROFILE=explore): noise reorders two plans the noise-free frontier
# keeps apart. Stage 1 on one instance of 1-GPU trials then stage 2 on two of 4-GPU trials costs
# 146 instance-seconds noise-free and 124 s; the reverse shape, 144 and 89 s, dominates it and prunes
# it from the frontier. With stragglers (sigma 0.3) the pruned plan is 7% cheaper at the quantile.
# For noisy problems the frontier keeps points beaten by less than planner.NOISY_MARGIN (2%).
GAP = Problem(sha=SHA(num_trials=9, eta=2, min_epochs=1, num_stages=2, done=0),
              workload=Workload(epoch_seconds={1: 34.0, 4: 11.0, 8: 1.0}, trial_overhead_seconds=0.0,
                                stage_overhead_seconds=0.0, straggler_sigma=0.3, checkpoint_gb=0.0),
              instance_types=(InstanceType(name="type-0", gpus=4, price_per_hour=1.0, pending_seconds=0.0,
                                           boot_seconds=0.0, pending_sigma=0.0, max_instances=2, market="on-demand",
                                           interruptions_per_hour=0.0),),
              deadline_seconds=134.75,
              billing=Billing(minimum_seconds=0.0, increment_seconds=1.0, data_price_per_gb=0.0),
              planner=PlannerSettings(jct_quantile=0.9, samples=16, seed=0), start=None)


def test_noisy_plan_the_noise_free_frontier_prunes():
    _check_against_exhaustive(GAP)


# Found by hypothesis (HYPOTHESIS_PROFILE=explore): with pending noise a stage's first trials start
# on whichever of its instances is ready first, the least of several lognormal draws, so its JCT at
# the quantile can be far below the noise-free one. Plan (2, 1) is 45 s noise-free, over the pruning
# deadline (39.25 s relaxed by one lognormal factor: 44.9 s), and 36.8 s at the median: on time and
# 1.1% cheaper than the plan chosen. A fix relaxes the pruning deadline by the least of several draws
# without losing the deadline's pruning at large quotas.
EARLIEST_READY = Problem(
    sha=SHA(num_trials=4, eta=2, min_epochs=1, num_stages=2, done=0),
    workload=Workload(epoch_seconds={1: 0.5}, trial_overhead_seconds=1.0, stage_overhead_seconds=0.0,
                      straggler_sigma=0.0, checkpoint_gb=0.0),
    instance_types=(InstanceType(name="type-0", gpus=1, price_per_hour=1.0, pending_seconds=38.0, boot_seconds=1.0,
                                 pending_sigma=0.5, max_instances=3, market="on-demand",
                                 interruptions_per_hour=0.0),),
    deadline_seconds=39.251953125, billing=Billing(minimum_seconds=0.0, increment_seconds=1.0, data_price_per_gb=0.0),
    planner=PlannerSettings(jct_quantile=0.5, samples=16, seed=1), start=None)


@pytest.mark.xfail(reason="known gap: the pruning deadline ignores that a stage starts on its earliest-ready instance",
                   strict=True)
def test_noisy_plan_the_pruning_deadline_drops():
    _check_against_exhaustive(EARLIEST_READY)


def test_example_problem_plan_and_baselines(resnet_problem):
    problem = parse_problem(resnet_problem)
    out = plan_problem(problem)
    cost = out["predicted"]["cost_usd"]["mean"]
    # Every plan of p3.8xlarge with up to 3 instances (6,561 plans) costs at least as much.
    small = parse_problem({**resnet_problem,
                           "instance_types": [{**resnet_problem["instance_types"][1], "max_instances": 3}]})
    best = exhaustive_optimum(small)
    assert cost <= simulate(small, best)["cost_usd"]["mean"] + 1e-9
    base = out["baselines"]
    assert base["static_allocation"]["feasible"] and base["static_cluster"]["feasible"]
    assert base["lower_bound"]["cost_usd"] <= cost
    assert cost <= base["static_cluster"]["predicted"]["cost_usd"]["mean"]
    assert cost <= base["static_allocation"]["predicted"]["cost_usd"]["mean"]
    # The static allocation baseline really is static, and meets the deadline.
    stages = base["static_allocation"]["stages"]
    assert len({(s["gpus_per_trial"], s["instances"]) for s in stages}) == 1
    assert base["static_allocation"]["predicted"]["jct_seconds"]["quantile"] <= 2400
    assert len({s["instances"] for s in base["static_cluster"]["stages"]}) == 1


def test_elastic_plan_beats_static_when_parallelism_shrinks(resnet_problem):
    resnet_problem["sha"] = {"num_trials": 256, "eta": 4, "min_epochs": 1}
    resnet_problem["deadline_seconds"] = 5000
    out = plan_problem(parse_problem(resnet_problem))
    counts = [s["instances"] for s in out["stages"]]
    assert counts[0] > counts[-1]  # grows wide for many short trials, shrinks for the last ones
    static = out["baselines"]["static_cluster"]["predicted"]["cost_usd"]["mean"]
    assert out["predicted"]["cost_usd"]["mean"] < 0.9 * static


def test_tighter_deadline_never_costs_less(resnet_problem):
    costs = []
    for deadline in (1200, 1600, 2400, 4000):
        resnet_problem["deadline_seconds"] = deadline
        out = plan_problem(parse_problem(resnet_problem))
        assert out["predicted"]["jct_seconds"]["quantile"] <= deadline
        costs.append(out["predicted"]["cost_usd"]["mean"])
    assert costs == sorted(costs, reverse=True)


def test_impossible_deadline_reports_fastest(resnet_problem):
    resnet_problem["deadline_seconds"] = 600
    problem = parse_problem(resnet_problem)
    with pytest.raises(InfeasibleError) as err:
        plan_problem(problem)
    e = err.value
    fastest = parse_plan(e.fastest_plan, problem)
    assert simulate(problem, fastest)["jct_seconds"]["quantile"] == e.fastest_jct_seconds
    assert 600 < e.fastest_jct_seconds < 1200
    assert "fastest achievable JCT" in str(e) and f"{e.fastest_jct_seconds:.1f}" in str(e)


def test_noisy_plan_meets_deadline_at_quantile(resnet_problem):
    resnet_problem["workload"]["straggler_sigma"] = 0.25
    for t in resnet_problem["instance_types"]:
        t["pending_sigma"] = 0.4
    problem = parse_problem(resnet_problem)
    out = plan_problem(problem)
    sim = simulate(problem, parse_plan(out, problem))
    assert sim["jct_seconds"]["quantile"] <= 2400
    assert sim == {**out["predicted"], "samples": 256}


def test_greedy_baseline_is_on_time_and_not_cheaper_than_exact(resnet_problem):
    problem = parse_problem(resnet_problem)
    exact = plan_problem(problem, "exact")
    greedy = plan_problem(problem, "greedy")
    assert greedy["predicted"]["jct_seconds"]["quantile"] <= 2400
    assert exact["predicted"]["cost_usd"]["mean"] <= greedy["predicted"]["cost_usd"]["mean"] + 1e-9


def test_lower_bound_uses_most_efficient_gpu_count(resnet_problem):
    problem = parse_problem(resnet_problem)
    # g=1 on any p3 is cheapest per epoch: $3.06/h per GPU x 60 s; work = 64*1 + 16*3 + 4*12 + 1*48 epochs
    assert np.isclose(lower_bound_cost(problem), 208 * 60 * 3.06 / 3600)
