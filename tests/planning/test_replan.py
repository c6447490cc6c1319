import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rubberband_airflow.planning.errors import InfeasibleError, ProblemError
from rubberband_airflow.planning.exhaustive import exhaustive_optimum
from rubberband_airflow.planning.plan import Plan, parse_plan
from rubberband_airflow.planning.planner import Evaluator
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.planning.replan import corrected, parse_state, remaining_problem, replan
from rubberband_airflow.planning.simulator import simulate
from tests.conftest import WORKED_PLAN
from tests.planning.reference import assert_simulator_matches
from tests.planning.strategies import plans, problems, states
from tests.planning.test_planner import small_problems

# The worked example of section 4 after its first stage: four p3.8xlarge running since 55 s.
AFTER_STAGE_1 = {"next_stage": 2, "elapsed_seconds": 465, "spent_usd": 0,
                 "fleet": [{"instance_type": "p3.8xlarge", "running_at_seconds": 55, "ready_at_seconds": 145}] * 4}


def _tail(plan: dict, first: int) -> Plan:
    return Plan.of(plan["instance_type"], [(s["gpus_per_trial"], s["instances"]) for s in plan["stages"][first - 1:]])


def test_resuming_the_worked_example_after_stage_1_gives_its_jct_and_cost(resnet_problem):
    problem = parse_problem(resnet_problem)
    rest = remaining_problem(problem, parse_state(AFTER_STAGE_1, problem))
    out = simulate(rest, _tail(WORKED_PLAN, 2))
    assert out["jct_seconds"]["quantile"] == 2334.0
    assert round(out["cost_usd"]["mean"], 4) == round(14.2766 + 21 * 0.1 * 0.0, 4)


def test_replan_without_deviation_keeps_the_deadline_at_no_more_cost(resnet_problem):
    problem = parse_problem(resnet_problem)
    out = replan(problem, parse_state(AFTER_STAGE_1, problem))
    assert out["first_stage"] == 2 and len(out["stages"]) == 3
    assert set(out["baselines"]) == {"lower_bound"}
    assert [s["trials"] for s in out["stages"]] == [16, 4, 1]
    assert [s["epochs"] for s in out["stages"]] == [4, 16, 64]
    assert out["predicted"]["jct_seconds"]["quantile"] <= 2400
    assert out["predicted"]["cost_usd"]["mean"] <= 14.2766 + 1e-9


def test_slower_workload_is_rescued_by_the_replan(resnet_problem):
    problem = parse_problem(resnet_problem)
    state = parse_state({**AFTER_STAGE_1, "observed": {"epoch_seconds": {"1": 90}}}, problem)
    rest = remaining_problem(problem, state)
    assert rest.workload.epoch_seconds[4] == pytest.approx(18 * 1.5)  # unobserved: scaled by the ratio
    old = simulate(rest, _tail(WORKED_PLAN, 2))
    assert old["jct_seconds"]["quantile"] > 2400  # the first plan now misses
    out = replan(problem, state)
    assert out["predicted"]["jct_seconds"]["quantile"] <= 2400
    assert simulate(rest, _tail(out, 1))["jct_seconds"]["quantile"] == out["predicted"]["jct_seconds"]["quantile"]


def test_corrections_replace_observed_and_scale_the_rest(resnet_problem):
    problem = parse_problem(resnet_problem)
    state = parse_state({**AFTER_STAGE_1, "observed": {
        "epoch_seconds": {"1": 120, "4": 18}, "trial_overhead_seconds": 5, "launch_seconds": {"p3.8xlarge": 260}}},
        problem)
    fixed = corrected(problem, state.observed)
    ratio = (120 + 18) / (60 + 18)  # the observed over the profiled, summed
    assert fixed.workload.epoch_seconds == pytest.approx({1: 120, 2: 33 * ratio, 4: 18, 8: 11 * ratio})
    assert fixed.workload.trial_overhead_seconds == 5
    assert fixed.workload.stage_overhead_seconds == 15
    p38 = fixed.instance_type("p3.8xlarge")
    assert (p38.pending_seconds, p38.boot_seconds) == pytest.approx((80, 180))
    p32 = fixed.instance_type("p3.2xlarge")  # unobserved: scaled by the same ratio, 2
    assert (p32.pending_seconds, p32.boot_seconds) == pytest.approx((80, 180))


@pytest.mark.parametrize(("state", "field"), [
    ({"elapsed_seconds": 1}, "state.next_stage"),
    ({"next_stage": 5, "elapsed_seconds": 1}, "state.next_stage"),
    ({"next_stage": 2}, "state.elapsed_seconds"),
    ({"next_stage": 2, "elapsed_seconds": -1}, "state.elapsed_seconds"),
    ({"next_stage": 2, "elapsed_seconds": 1, "spent_usd": "3"}, "state.spent_usd"),
    ({"next_stage": 2, "elapsed_seconds": 1, "fleet": {}}, "state.fleet"),
    ({"next_stage": 2, "elapsed_seconds": 1, "fleet": [{"instance_type": "m5", "running_at_seconds": 0,
                                                        "ready_at_seconds": 0}]}, "state.fleet[0].instance_type"),
    ({"next_stage": 2, "elapsed_seconds": 1, "fleet": [{"instance_type": "p3.8xlarge", "running_at_seconds": 9,
                                                        "ready_at_seconds": 3}]}, "state.fleet[0].ready_at_seconds"),
    ({"next_stage": 2, "elapsed_seconds": 1, "fleet": [{"instance_type": "p3.8xlarge", "running_at_seconds": 9}]},
     "state.fleet[0].ready_at_seconds"),
    ({"next_stage": 2, "elapsed_seconds": 1, "observed": {"epoch_seconds": {"16": 3}}},
     "state.observed.epoch_seconds.16"),
    ({"next_stage": 2, "elapsed_seconds": 1, "observed": {"epoch_seconds": {"1": 0}}},
     "state.observed.epoch_seconds.1"),
    ({"next_stage": 2, "elapsed_seconds": 1, "observed": {"launch_seconds": {"x": 3}}},
     "state.observed.launch_seconds.x"),
    ({"next_stage": 2, "elapsed_seconds": 1, "observed": {"stage_overhead_seconds": None}},
     "state.observed.stage_overhead_seconds"),
    ({"next_stage": 2, "elapsed_seconds": 1, "colour": 1}, "state.colour"),
    ({"next_stage": 2, "elapsed_seconds": 1, "buy_markets": ["reserved"]}, "state.buy_markets"),
    ({"next_stage": 2, "elapsed_seconds": 1, "buy_markets": []}, "state.buy_markets"),
    ({"next_stage": 2, "elapsed_seconds": 1, "buy_markets": ["spot"]}, "state.buy_markets"),  # on demand only
    ([], "state"),
])
def test_state_errors_name_the_field(resnet_problem, state, field):
    with pytest.raises(ProblemError) as err:
        parse_state(state, parse_problem(resnet_problem))
    assert err.value.field == field


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_simulation_from_a_state_equals_event_by_event(data):
    problem = parse_problem(data.draw(problems()))
    rest = remaining_problem(problem, parse_state(data.draw(states(problem)), problem))
    plan = parse_plan(data.draw(plans(rest)), rest)
    assert_simulator_matches(rest, plan)


def _check_replan_against_exhaustive(problem, state_data):
    state = parse_state(state_data, problem)
    rest = remaining_problem(problem, state)
    ev = Evaluator(rest)
    best = exhaustive_optimum(rest, ev)
    if best is None:
        with pytest.raises(InfeasibleError):
            replan(problem, state)
        return
    out = replan(problem, state)
    plan = parse_plan(_tail(out, 1).to_dict(), rest)
    assert ev.on_time(plan)
    assert out["predicted"]["cost_usd"]["mean"] <= ev(best).cost_mean * 1.01 + 1e-9


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_noise_free_replan_is_the_exhaustive_optimum(data):
    problem = data.draw(small_problems(noise=False))
    state = data.draw(states(problem, pending=data.draw(st.booleans())))
    state["elapsed_seconds"] = min(state["elapsed_seconds"], problem.deadline_seconds * 0.5)
    state["fleet"] = [x for x in state["fleet"] if x["running_at_seconds"] <= state["elapsed_seconds"] + 300]
    _check_replan_against_exhaustive(problem, state)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_noisy_replan_within_one_percent_of_exhaustive_optimum(data):
    problem = data.draw(small_problems(noise=True))
    state = data.draw(states(problem, observed=False))
    state["elapsed_seconds"] = min(state["elapsed_seconds"], problem.deadline_seconds * 0.5)
    _check_replan_against_exhaustive(problem, state)


def test_faster_workload_replans_cheaper_than_first_predicted(resnet_problem):
    problem = parse_problem(resnet_problem)
    state = parse_state({**AFTER_STAGE_1, "observed": {"epoch_seconds": {"1": 42}}}, problem)
    out = replan(problem, state)
    assert out["predicted"]["jct_seconds"]["quantile"] <= 2400
    assert out["predicted"]["cost_usd"]["mean"] < 14.2766 - 0.5
