"""The planner at large quotas (issue 15): the bounded programme is exact, the coarse-to-fine search
is close, and a problem too large for the memory budget is an input error naming a field."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rubberband_airflow.planning import planner
from rubberband_airflow.planning.bounds import usable_instances
from rubberband_airflow.planning.budget import MemoryBudget
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.frontier import frontier
from rubberband_airflow.planning.planner import Evaluator, _cheapest_by_bound, plan_problem
from rubberband_airflow.planning.problem import parse_problem
from tests.planning import unbounded_frontier
from tests.planning.strategies import problems

RUBBERBAND = str(Path(sys.executable).parent / "rubberband")


@st.composite
def generous_problems(draw):
    """Noise-free problems of 2 to 4 stages whose quota is well above what the trials can occupy."""
    data = draw(problems(noise=False, max_instances=1, max_trials=24))
    data["sha"]["num_trials"] = draw(st.integers(data["sha"]["eta"], 24))
    for t in data["instance_types"]:
        t["max_instances"] = draw(st.integers(8, 14))
    problem = parse_problem(data)
    fastest = min(f[0].jct for t in problem.instance_types if problem.gpu_options(t)
                  and (f := unbounded_frontier.frontier(problem, t, fastest_only=True)))
    data["deadline_seconds"] = fastest * draw(st.floats(1.0, 3.0))
    return parse_problem(data)


def _cheapest_below(points, deadline: float) -> float:
    costs = [p.cost for p in points if p.jct <= deadline * (1 + 1e-12)]
    return min(costs) if costs else np.inf


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generous_problems())
def test_bounded_programme_finds_the_unbounded_optimum(problem):
    ev = Evaluator(problem)
    for t in problem.instance_types:
        if not problem.gpu_options(t):
            continue
        bounded = frontier(problem, t, problem.deadline_seconds)
        unbounded = unbounded_frontier.frontier(problem, t, problem.deadline_seconds)
        # The same cost/JCT trade-off: below every JCT either reaches, the same cheapest cost.
        for deadline in {p.jct for p in bounded + unbounded}:
            assert np.isclose(_cheapest_below(bounded, deadline), _cheapest_below(unbounded, deadline), rtol=1e-9)
        assert np.isclose(frontier(problem, t, fastest_only=True)[0].jct,
                          unbounded_frontier.frontier(problem, t, fastest_only=True)[0].jct, rtol=1e-12)
        # And the simulator picks a plan of the same billed cost from either.
        mine = _cheapest_by_bound(frontier(problem, t, problem.deadline_seconds, every_end_state=True), ev)
        theirs = _cheapest_by_bound(unbounded_frontier.frontier(problem, t, problem.deadline_seconds,
                                                                every_end_state=True), ev)
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert ev(mine).cost_mean == pytest.approx(ev(theirs).cost_mean, rel=1e-9)


def test_bounds_follow_the_trials(resnet_problem):
    resnet_problem["instance_types"][1]["max_instances"] = 4096  # p3.8xlarge, 4 GPUs
    problem = parse_problem(resnet_problem)
    b = usable_instances(problem, problem.instance_types[1])
    assert b.gpus == [1, 2, 4]
    # 64, 16, 4, 1 trials; 4, 2, 1 slots per instance; a stage keeps what the next can use.
    assert b.per_option.tolist() == [[16, 32, 64], [4, 8, 16], [1, 2, 4], [1, 1, 1]]
    assert b.live.tolist() == [64, 16, 4, 1, 0]
    state, extra = b.fold(0, np.array([3, 16, 40]))
    assert state.tolist() == [3, 16, 16] and extra.tolist() == [0, 0, 24 * 15]


def test_large_quota_plans_like_a_small_one(resnet_problem):
    small = plan_problem(parse_problem(resnet_problem))
    for t in resnet_problem["instance_types"]:
        t["max_instances"] = 4096
    large = plan_problem(parse_problem(resnet_problem))
    assert large["method"] == "exact"
    assert large["predicted"]["cost_usd"]["mean"] == pytest.approx(small["predicted"]["cost_usd"]["mean"])


@pytest.mark.parametrize("deadline", [5000, 8000])
def test_coarse_to_fine_within_one_percent_of_exact(resnet_problem, monkeypatch, deadline):
    resnet_problem["sha"] = {"num_trials": 256, "eta": 4, "min_epochs": 1}
    resnet_problem["deadline_seconds"] = deadline
    for t in resnet_problem["instance_types"]:
        t["max_instances"] = 256
    problem = parse_problem(resnet_problem)
    exact = plan_problem(problem)
    assert exact["method"] == "exact"
    monkeypatch.setattr(planner, "EXACT_WORK", 0)
    coarse = plan_problem(problem)
    assert coarse["method"] == "coarse-to-fine"
    assert coarse["predicted"]["jct_seconds"]["quantile"] <= deadline
    assert coarse["predicted"]["cost_usd"]["mean"] <= exact["predicted"]["cost_usd"]["mean"] * 1.01


def test_search_over_the_budget_names_the_quota(resnet_problem):
    for t in resnet_problem["instance_types"]:
        t["max_instances"] = 4096
    resnet_problem["sha"]["num_trials"] = 4096
    resnet_problem["deadline_seconds"] = 10**6
    with pytest.raises(ProblemError) as err:
        plan_problem(parse_problem(resnet_problem), budget=MemoryBudget(4 << 20))
    assert err.value.field.endswith(".max_instances") or err.value.field == "sha.num_trials"
    assert "memory budget" in err.value.message


def test_too_many_trials_exit_2_naming_the_field(resnet_problem, tmp_path):
    resnet_problem["sha"]["num_trials"] = 10**7
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(resnet_problem))
    r = subprocess.run([RUBBERBAND, "plan", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("rubberband: input error: sha.num_trials: ") and "memory budget" in r.stderr
    assert "Traceback" not in r.stderr
