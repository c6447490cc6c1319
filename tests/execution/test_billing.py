"""Predicted and actual cost follow one billing rule: the same timeline costs the same to the cent."""

import numpy as np
from hypothesis import given, settings, strategies as st

from rubberband_airflow.execution.backends.base import billed_cost
from rubberband_airflow.planning.plan import parse_plan
from rubberband_airflow.planning.problem import Billing, parse_problem
from rubberband_airflow.planning.simulator import Draws, simulate_outcome
from tests.conftest import WORKED_PLAN
from tests.planning.strategies import plans, problems


def _ledger(outcome, sample: int, itype: str) -> list[dict]:
    """The instance ledger a run would record if it went exactly as this simulated sample."""
    return [{"instance": f"i-{k}", "type": itype, "running": float(r), "terminated": float(t)}
            for k, (r, t) in enumerate(zip(outcome.running[sample], outcome.terminated[sample]))]


def test_worked_example_ledger_costs_what_the_plan_predicts(resnet_problem):
    problem = parse_problem(resnet_problem)
    plan = parse_plan(WORKED_PLAN, problem)
    outcome = simulate_outcome(problem, plan, Draws.for_problem(problem))
    ledger = _ledger(outcome, 0, plan.instance_type)
    assert round(billed_cost(ledger, {plan.instance_type: 12.24}, problem.billing), 4) == 14.2766


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_any_simulated_timeline_bills_the_same_as_its_ledger(data):
    problem = parse_problem(data.draw(problems()))
    plan = parse_plan(data.draw(plans(problem)), problem)
    outcome = simulate_outcome(problem, plan, Draws.for_problem(problem, samples=3))
    price = problem.instance_type(plan.instance_type).price_per_hour
    for sample in range(3):
        actual = billed_cost(_ledger(outcome, sample, plan.instance_type), {plan.instance_type: price},
                             problem.billing) + problem.data_cost()
        assert round(actual, 2) == round(float(outcome.cost[sample]), 2)
        assert abs(actual - outcome.cost[sample]) <= 1e-9 * max(1.0, actual)


def test_rounding_rule_is_shared():
    billing = Billing(minimum_seconds=60, increment_seconds=10)
    prices = {"x": 3600.0}  # a dollar a second
    ledger = [{"instance": "a", "type": "x", "running": 0.0, "terminated": 61.0000000001},  # 70 s
              {"instance": "b", "type": "x", "running": 0.0, "terminated": 120.00000000001},  # float noise: 120 s
              {"instance": "c", "type": "x", "running": 5.0, "terminated": 10.0},  # minimum 60 s
              {"instance": "d", "type": "x", "running": None, "terminated": 10.0}]  # never running: free
    assert billed_cost(ledger, prices, billing) == 70 + 120 + 60
    assert np.isclose(billed_cost([{"instance": "e", "type": "x", "running": 0.0, "terminated": None}], prices,
                                  billing, now=15.0), 60)
