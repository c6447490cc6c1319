"""Exhaustive search over every plan: the exact optimum for small problems (tests, benchmarks)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from rubberband_airflow.planning.plan import Plan
from rubberband_airflow.planning.planner import Evaluator
from rubberband_airflow.planning.problem import Problem


def all_plans(problem: Problem) -> Iterator[Plan]:
    """Every plan of the problem: each stage any allowed (GPUs per trial, instances), any type."""
    for t in problem.instance_types:
        choices = [(g, c) for g in problem.gpu_options(t) for c in range(1, t.max_instances + 1)]
        for stages in itertools.product(choices, repeat=problem.num_stages):
            yield Plan.of(t.name, list(stages))


def count_plans(problem: Problem) -> int:
    return sum((len(problem.gpu_options(t)) * t.max_instances) ** problem.num_stages for t in problem.instance_types)


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
