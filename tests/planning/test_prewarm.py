import pytest

from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.plan import parse_plan
from rubberband_airflow.planning.planner import Evaluator, _prewarm
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.planning.simulator import Draws, simulate_outcome

# The worked example's problem with a plan that grows from 1 to 4 instances at stage 2.
GROWING = {"instance_type": "p3.8xlarge",
           "stages": [{"gpus_per_trial": 1, "instances": 1}, {"gpus_per_trial": 1, "instances": 4},
                      {"gpus_per_trial": 1, "instances": 1}, {"gpus_per_trial": 4, "instances": 1}]}


def _run(problem, plan):
    outcome = simulate_outcome(problem, parse_plan(plan, problem), Draws.for_problem(problem))
    return outcome.stage_end[0].tolist(), float(outcome.cost[0])


def test_prewarmed_instances_are_ready_at_the_barrier(resnet_problem):
    problem = parse_problem(resnet_problem)
    # Stage 1: T1 = 15, one instance ready at 145, 64 trials of 80 s on 4 slots: E1 = 1425.
    # Without pre-warming, stage 2's three added instances are requested at T2 = 1440 and ready
    # at 1570: 4 trials of 200 s start at 1440, 12 at 1570, so E2 = 1770.
    cold_ends, cold_cost = _run(problem, GROWING)
    assert cold_ends[:2] == [1425.0, 1770.0]
    # Requested 1295 s after T1 (at 1310), they are running at 1350 and ready at 1440 = T2.
    warm = {**GROWING, "stages": [GROWING["stages"][0], {**GROWING["stages"][1], "launch_after_seconds": 1295},
                                  *GROWING["stages"][2:]]}
    warm_ends, warm_cost = _run(problem, warm)
    assert warm_ends == [1425.0, 1640.0, 2395.0, 3294.0]
    # Billed: 1 instance 55..3294, 3 instances 1350..1655 (released at T3 = 1640 + 15): 3239 + 3 x 305 s.
    assert warm_cost == pytest.approx(12.24 / 3600 * (3239 + 3 * 305))
    assert warm_cost < cold_cost


def test_a_launch_after_the_barrier_changes_nothing(resnet_problem):
    problem = parse_problem(resnet_problem)
    late = {**GROWING, "stages": [GROWING["stages"][0], {**GROWING["stages"][1], "launch_after_seconds": 5000},
                                  *GROWING["stages"][2:]]}
    assert _run(problem, late) == _run(problem, GROWING)


def test_planner_chooses_the_lead_that_readies_added_instances_at_the_barrier(resnet_problem):
    resnet_problem["deadline_seconds"] = 4000
    problem = parse_problem(resnet_problem)
    ev = Evaluator(problem)
    warmed = _prewarm(parse_plan(GROWING, problem), ev)
    assert [s.launch_after for s in warmed.stages] == [None, 1295.0, None, None]
    assert ev(warmed).cost_mean == pytest.approx(12.24 / 3600 * (3239 + 3 * 305))


def test_launch_after_on_the_first_stage_is_an_error(resnet_problem):
    problem = parse_problem(resnet_problem)
    bad = {**GROWING, "stages": [{**GROWING["stages"][0], "launch_after_seconds": 10}, *GROWING["stages"][1:]]}
    with pytest.raises(ProblemError) as err:
        parse_plan(bad, problem)
    assert err.value.field == "plan.stages[0].launch_after_seconds"
