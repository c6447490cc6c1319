"""Spot capacity in the planning model (docs/planning-model.md section 4.1): interruptions drawn per
trial, their cost in time and money, and the planner's choice between spot and on-demand."""

import copy
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rubberband_airflow.planning.errors import InfeasibleError, ProblemError
from rubberband_airflow.planning.plan import Plan, StageAllocation, parse_plan
from rubberband_airflow.planning.planner import plan_problem
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.planning.replan import parse_state, remaining_problem, replan
from rubberband_airflow.planning.simulator import (
    Draws,
    poisson_counts,
    schedule_stage,
    simulate,
    simulate_outcome,
)
from tests.planning.test_planner import _check_against_exhaustive, small_problems

EXAMPLES = Path(__file__).resolve().parents[2] / "rubberband_airflow" / "examples"

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


# --- both markets in one run (docs/planning-model.md sections 3 and 4, step 2) ---

def _two_stages(types: list[dict], deadline: float = 20000) -> dict:
    """Two stages, 3 trials then 1, no noise but the interruptions (none at rate 0)."""
    return {"sha": {"num_trials": 3, "eta": 3, "min_epochs": 1},
            "workload": {"epoch_seconds": {"1": 100}, "trial_overhead_seconds": 10, "stage_overhead_seconds": 5},
            "instance_types": types, "billing": {"minimum_seconds": 0, "increment_seconds": 1},
            "deadline_seconds": deadline, "planner": {"samples": 64, "jct_quantile": 0.9}}


def test_a_stage_that_releases_spot_ends_the_spot_fleet_at_its_start_and_runs_on_demand():
    """Stage 1 on 3 spot instances, stage 2 on 1 on-demand instance, releasing the spot ones: by
    the model's rules, with times and prices worked by hand."""
    problem = parse_problem(_two_stages([ON_DEMAND, _spot(0.0, price=0.3)]))
    plan = parse_plan({"instance_type": "g5.xlarge:spot", "stages": [
        {"gpus_per_trial": 1, "instances": 3},
        {"gpus_per_trial": 1, "instances": 1, "market": "on-demand", "release": "spot"}]}, problem)
    assert plan.stages[1] == StageAllocation(1, 1, None, "on-demand", "spot")
    out = simulate_outcome(problem, plan, Draws.for_problem(problem))
    # Stage 1: T1 = 5, the spot instances run at 35 and take trials at 95; 3 trials of 10 + 100 s end at 205.
    # Stage 2: T2 = 210, the spot ones terminated then; the on-demand one runs at 240, ready at 300;
    # its trial (10 + 2 * 100 s) ends at 510.
    assert out.stage_end[0].tolist() == [205.0, 510.0]
    assert out.running[0].tolist() == [35.0] * 3 + [240.0] and out.terminated[0].tolist() == [210.0] * 3 + [510.0]
    assert out.cost[0] == pytest.approx(3 * 175 * 0.3 / 3600 + 270 * 1.0 / 3600)
    without = replace(plan, stages=(plan.stages[0], replace(plan.stages[1], release=None)))
    kept = simulate_outcome(problem, without, Draws.for_problem(problem))
    # Without the release the stage keeps one spot instance (the oldest) and launches nothing.
    assert kept.stage_end[0].tolist() == [205.0, 420.0] and kept.running.shape == (1, 3)
    assert without.to_dict(problem)["stages"][1]["market"] == "on-demand"
    assert parse_plan(plan.to_dict(problem), problem) == plan


def test_a_mixed_fleet_interrupts_only_the_trials_on_its_spot_instances():
    """Stage 2 keeps a spot instance and adds an on-demand one (no release): its two trials run one
    on each, and only the one on the spot instance is interrupted."""
    problem = parse_problem({**_two_stages([ON_DEMAND, _spot(300.0, price=0.3)]),
                             "sha": {"num_trials": 4, "eta": 2, "min_epochs": 1}})
    plan = Plan("g5.xlarge:spot", (StageAllocation(1, 1), StageAllocation(1, 2, market="on-demand")))
    draws = Draws.for_problem(problem)
    mixed = simulate_outcome(problem, plan, draws)
    spot_only = simulate_outcome(problem, Plan.of("g5.xlarge:spot", [(1, 1), (1, 2)]), draws)
    demand = simulate_outcome(problem, Plan.of("g5.xlarge", [(1, 1), (1, 2)]), draws)
    assert (mixed.stage_end[:, 0] == spot_only.stage_end[:, 0]).all()  # the same stage 1, on spot
    stage_2 = [o.stage_end[:, 1] - o.stage_end[:, 0] for o in (demand, mixed, spot_only)]
    assert (stage_2[1] >= stage_2[0]).all() and (stage_2[1] <= stage_2[2]).all()
    assert stage_2[0].mean() < stage_2[1].mean() < stage_2[2].mean()


def test_scheduling_on_slots_of_one_kind_is_the_same_whichever_way():
    rng = np.random.default_rng(3)
    for slots, trials in ((1, 5), (4, 4), (6, 20), (3, 2)):
        free = rng.random((16, slots)) * 50
        durations = rng.random((16, trials)) * 100 + 1
        assert np.array_equal(schedule_stage(free, durations[None], np.zeros(slots, dtype=int)),
                              schedule_stage(free, durations))
        kinds = rng.integers(0, 2, slots)  # two kinds with the same durations: the same schedule too
        assert np.array_equal(schedule_stage(free, np.stack([durations, durations]), kinds),
                              schedule_stage(free, durations))


def test_a_stage_market_or_release_the_problem_cannot_run_is_refused_naming_the_field():
    problem = parse_problem(_two_stages([ON_DEMAND, _spot(0.1)]))
    stages = [{"gpus_per_trial": 1, "instances": 2}, {"gpus_per_trial": 1, "instances": 1}]
    for change, field, message in (
            ({"release": "spot"}, "plan.stages[1].release", "buys its instances spot"),
            ({"release": "reserved"}, "plan.stages[1].release", "must be 'spot' or 'on-demand'"),
            ({"market": "on-demand", "release": "spot", "launch_after_seconds": 5}, "plan.stages[1].release",
             "not pre-warmed")):
        with pytest.raises(ProblemError, match=re.escape(field) + ".*" + message):
            parse_plan({"instance_type": "g5.xlarge:spot", "stages": [stages[0], {**stages[1], **change}]}, problem)


def test_under_frequent_interruptions_and_a_tight_deadline_the_planner_buys_spot_then_on_demand():
    """The noisy g5 example with spot at 35% of the on-demand price and 2 interruptions per
    instance-hour, deadline 7600 s: no spot-only plan is on time, and spot for the early stages,
    released for on-demand instances for the last, is on time for less than 70% of the cheapest
    on-demand plan's cost."""
    base = json.loads((EXAMPLES / "problem-noisy-g5.json").read_text())
    spot = [{**t, "name": t["name"] + ":spot", "market": "spot", "interruptions_per_hour": 2.0,
             "price_per_hour": round(t["price_per_hour"] * 0.35, 4)} for t in base["instance_types"]]
    planner = {k: v for k, v in base["planner"].items() if k != "samples"}  # the default: 1024 with spot
    both = {**base, "deadline_seconds": 7600, "instance_types": base["instance_types"] + spot, "planner": planner}
    on_demand = plan_problem(parse_problem({**both, "instance_types": base["instance_types"]}),
                             static_baselines=False)
    with pytest.raises(InfeasibleError):
        plan_problem(parse_problem({**both, "instance_types": spot}), static_baselines=False)
    problem = parse_problem(both)
    chosen = plan_problem(problem, static_baselines=False)
    markets = [s["market"] for s in chosen["stages"]]
    assert markets[0] == "spot" and markets[-1] == "on-demand", chosen
    switch = markets.index("on-demand")
    assert chosen["stages"][switch].get("release") == "spot"
    assert chosen["predicted"]["jct_seconds"]["quantile"] <= 7600
    assert chosen["predicted"]["cost_usd"]["mean"] < 0.7 * on_demand["predicted"]["cost_usd"]["mean"]
    # On 4000 samples the planner never saw, it is on time as often as its quantile says, within noise.
    assert problem.planner.samples == 1024
    check = parse_problem({**both, "planner": {**planner, "samples": 4000, "seed": 99}})
    outcome = simulate_outcome(check, parse_plan(chosen, check), Draws.for_problem(check))
    assert (outcome.jct <= 7600).mean() >= problem.planner.jct_quantile - 0.01


@st.composite
def _spot_twin_problems(draw):
    """Small noisy problems of one type offered in both markets, spot cheaper and interrupted."""
    data = copy.deepcopy(draw(small_problems(noise=True)).to_dict())
    own = {**data["instance_types"][0], "max_instances": min(2, data["instance_types"][0]["max_instances"])}
    spot = {**own, "name": own["name"] + ":spot", "market": "spot",
            "price_per_hour": own["price_per_hour"] * draw(st.floats(0.2, 0.9)),
            "interruptions_per_hour": draw(st.sampled_from([5.0, 50.0, 500.0]))}
    return parse_problem({**data, "instance_types": [own, spot]})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_spot_twin_problems())
def test_a_plan_offered_both_markets_is_within_one_percent_of_the_exhaustive_optimum(problem):
    """The exhaustive reference tries every stage's market and release too (each plan once)."""
    _check_against_exhaustive(problem)


def test_a_re_plan_before_the_switching_stage_releases_the_live_spot_fleet():
    """The g5 example at 2 interruptions an hour, deadline 7600 s, re-planned before its last
    stage with three spot instances live: keeping one spot instance for the last stage misses the
    deadline, releasing them for an on-demand one meets it; the re-plan releases them."""
    base = json.loads((EXAMPLES / "problem-noisy-g5.json").read_text())
    spot = [{**t, "name": t["name"] + ":spot", "market": "spot", "interruptions_per_hour": 2.0,
             "price_per_hour": round(t["price_per_hour"] * 0.35, 4)} for t in base["instance_types"]]
    problem = parse_problem({**base, "deadline_seconds": 7600, "instance_types": base["instance_types"] + spot})
    state = parse_state({"next_stage": 5, "elapsed_seconds": 3650.0, "spent_usd": 15.0, "fleet": [
        {"instance_type": "g5.12xlarge:spot", "running_at_seconds": 1000.0 + k, "ready_at_seconds": 1130.0 + k}
        for k in range(3)]}, problem)
    rest = remaining_problem(problem, state)
    kept = simulate(rest, Plan("g5.12xlarge", (StageAllocation(4, 1),)))
    assert kept["jct_seconds"]["quantile"] > 7600
    out = replan(problem, state)
    [stage] = out["stages"]
    assert out["instance_type"] == "g5.12xlarge" and stage["release"] == "spot"  # on demand, releasing spot
    assert out["predicted"]["jct_seconds"]["quantile"] <= 7600
