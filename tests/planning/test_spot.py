"""Spot capacity in the planning model (docs/planning-model.md section 4.1): interruptions drawn per
trial, their cost in time and money, and the planner's choice between spot and on-demand."""

import math

import numpy as np
import pytest

from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.plan import Plan
from rubberband_airflow.planning.planner import plan_problem
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.planning.simulator import Draws, poisson_counts, simulate_outcome

ON_DEMAND = {"name": "g5.xlarge", "gpus": 1, "price_per_hour": 1.0, "pending_seconds": 30, "boot_seconds": 60,
             "max_instances": 16}


def _spot(rate: float, price: float = 0.3) -> dict:
    return {**ON_DEMAND, "name": "g5.xlarge:spot", "market": "spot", "price_per_hour": price,
            "interruptions_per_hour": rate}


def _problem(types: list[dict], deadline: float = 20000, trials: int = 1, samples: int = 256, seed: int = 0) -> dict:
    return {"sha": {"num_trials": trials, "eta": 3, "min_epochs": 10},
            "workload": {"epoch_seconds": {"1": 360}, "trial_overhead_seconds": 20, "stage_overhead_seconds": 5},
            "instance_types": types, "billing": {"minimum_seconds": 0, "increment_seconds": 1},
            "deadline_seconds": deadline, "planner": {"samples": samples, "seed": seed, "jct_quantile": 0.9}}


def test_poisson_counts_invert_the_cdf():
    u = np.array([0.0, 0.2, 0.5, 0.9, 0.999])
    mean = np.full(5, 1.5)
    cdf = np.cumsum([math.exp(-1.5) * 1.5 ** k / math.factorial(k) for k in range(20)])
    expected = [int(np.searchsorted(cdf, x)) for x in u]  # smallest k with CDF(k) >= u
    assert poisson_counts(u, mean).tolist() == expected
    draws = poisson_counts(np.random.default_rng(1).random(200_000), np.full(200_000, 0.7))
    assert draws.mean() == pytest.approx(0.7, abs=0.01) and draws.var() == pytest.approx(0.7, abs=0.02)


def test_a_trial_on_spot_loses_the_interruptions_cost_in_time_and_money():
    # One trial of 10 epochs (3600 s + 20 s) on one instance: each interruption costs half an epoch
    # (180 s), the restart (20 s) and a replacement's launch (90 s): 290 s. At 0.5 interruptions
    # an hour, N ~ Poisson(0.5 x 3620 / 3600).
    problem = parse_problem(_problem([ON_DEMAND, _spot(0.5)], samples=20_000))
    draws = Draws.for_problem(problem)
    spot = simulate_outcome(problem, Plan.of("g5.xlarge:spot", [(1, 1)]), draws)
    calm = simulate_outcome(problem, Plan.of("g5.xlarge", [(1, 1)]), draws)
    base = 5 + 30 + 60 + 3620  # T1, pending, boot, the trial
    assert calm.jct.tolist() == [base] * 20_000
    delays = spot.jct - base
    counts = delays / 290
    assert np.allclose(counts, np.round(counts)) and counts.min() == 0
    mean = 0.5 * 3620 / 3600
    assert counts.mean() == pytest.approx(mean, abs=4 * math.sqrt(mean / 20_000))
    assert (counts == 0).mean() == pytest.approx(math.exp(-mean), abs=0.01)
    # Billed at the spot price for as long as the run lasts (from running at 35 s to the end).
    assert spot.cost == pytest.approx(0.3 / 3600 * (spot.jct - 35))


def test_spot_without_interruptions_is_on_demand_at_another_price():
    problem = parse_problem(_problem([ON_DEMAND, _spot(0.0, price=1.0)], trials=9))
    draws = Draws.for_problem(problem)
    for stages in ([(1, 3), (1, 2)], [(1, 1), (1, 1)]):
        a = simulate_outcome(problem, Plan.of("g5.xlarge", stages), draws)
        b = simulate_outcome(problem, Plan.of("g5.xlarge:spot", stages), draws)
        assert a.jct.tolist() == b.jct.tolist() and a.cost.tolist() == b.cost.tolist()
    assert problem.deterministic


def test_the_planner_buys_spot_when_it_is_cheaper_on_time_and_the_quantile_holds():
    data = _problem([ON_DEMAND, _spot(0.2)], deadline=40000, trials=9)
    out = plan_problem(parse_problem(data))
    assert out["instance_type"] == "g5.xlarge:spot"
    assert all(s["market"] == "spot" for s in out["stages"])
    # Judged on draws the planner never saw: the deadline is met at least at the planner's quantile.
    fresh = parse_problem({**data, "planner": {**data["planner"], "seed": 12345, "samples": 4000}})
    stages = [(s["gpus_per_trial"], s["instances"]) for s in out["stages"]]
    jct = simulate_outcome(fresh, Plan.of(out["instance_type"], stages), Draws.for_problem(fresh)).jct
    assert (jct <= data["deadline_seconds"]).mean() >= 0.9 - 0.02


def test_the_planner_keeps_on_demand_when_interruptions_would_miss_the_deadline():
    # Spot interrupted 20 times an hour is cheaper per hour but cannot finish a 1-hour trial in time.
    out = plan_problem(parse_problem(_problem([ON_DEMAND, _spot(20.0, price=0.1)], deadline=4000)))
    assert out["instance_type"] == "g5.xlarge" and "market" not in out["stages"][0]


@pytest.mark.parametrize(("change", "field"), [
    ({"market": "preemptible"}, "instance_types[0].market"),
    ({"interruptions_per_hour": 0.1}, "instance_types[0].interruptions_per_hour"),
    ({"market": "spot", "interruptions_per_hour": -1}, "instance_types[0].interruptions_per_hour"),
])
def test_bad_market_fields_name_the_field(change, field):
    with pytest.raises(ProblemError) as err:
        parse_problem(_problem([{**ON_DEMAND, **change}]))
    assert err.value.field == field


def test_a_problem_without_spot_keeps_its_json_and_draws():
    data = _problem([ON_DEMAND], trials=9)
    problem = parse_problem(data)
    assert problem.to_dict()["instance_types"] == [ON_DEMAND | {"pending_sigma": 0.0}]
    assert Draws.for_problem(problem).interruption_u is None
    spot = parse_problem(_problem([ON_DEMAND, _spot(0.1)]))
    assert spot.to_dict()["instance_types"][1]["interruptions_per_hour"] == 0.1
    assert parse_problem(spot.to_dict()) == spot
