"""Exhaustive search over every plan: the exact optimum for small problems (tests, benchmarks)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from rubberband_airflow.planning.plan import Plan, StageAllocation
from rubberband_airflow.planning.planner import Evaluator, carried_markets
from rubberband_airflow.planning.problem import Problem


def all_plans(problem: Problem) -> Iterator[Plan]:
    """Every plan of the problem: each stage any allowed (GPUs per trial, instances), any type; on
    a type with a twin in the other market, also each stage's market, and with or without
    releasing the other market's instances wherever some may be live (bought before, or carried);
    buying only in the markets the problem buys in (each plan once: on the on-demand entry of such
    a family, where it buys on demand)."""
    for t in problem.instance_types:
        twin = problem.twin(t)
        if not problem.buys(t.market) or (twin is not None and t.market == "spot" and problem.buys(twin.market)):
            continue
        choices = [(g, c) for g in problem.gpu_options(t) for c in range(1, t.max_instances + 1)]
        family = [t.market] + ([twin.market] if twin else [])
        markets = [m for m in family if problem.buys(m)]
        carried = carried_markets(problem, t)
        for stages in itertools.product(choices, repeat=problem.num_stages):
            for bought in itertools.product(markets, repeat=problem.num_stages):
                options = [[None] + [m for m in family if m != bought[i] and m in carried | set(bought[:i])]
                           for i in range(len(bought))]
                for release in itertools.product(*options):
                    yield Plan(t.name, tuple(StageAllocation(g, c, None, None if m == t.market else m, r)
                                             for (g, c), m, r in zip(stages, bought, release)))


def exhaustive_optimum(problem: Problem, ev: Evaluator | None = None) -> Plan | None:
    """The cheapest plan (mean cost) whose JCT at the quantile meets the deadline, or None."""
    ev = ev or Evaluator(problem)
    best, best_cost = None, float("inf")
    for plan in all_plans(problem):
        p = ev(plan)
        if ev.on_time(plan) and p.cost_mean < best_cost:
            best, best_cost = plan, p.cost_mean
        del ev.cache[plan]  # keep memory flat over many plans
    if best is not None:
        ev(best)
    return best
