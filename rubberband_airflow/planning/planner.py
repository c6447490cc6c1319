"""The planner: the cheapest plan whose JCT at the quantile meets the deadline, and the baselines.

The ``exact`` method searches the noise-free frontier of every instance type exactly
(frontier.py), picks the cheapest frontier plan that the Monte Carlo simulator finds on time,
and polishes it with the simulator by local moves (which also settles minimum billing and
noise). The ``greedy`` method is the seed's cost-marginal-benefit search, kept as a baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from rubberband_airflow.planning.errors import InfeasibleError
from rubberband_airflow.planning.frontier import FrontierPoint, frontier, stage_table
from rubberband_airflow.planning.plan import Plan
from rubberband_airflow.planning.problem import InstanceType, Problem
from rubberband_airflow.planning.simulator import Draws, simulate_outcome, summarize

METHODS = ("exact", "greedy")
# Frontier plans simulated on each side of the feasibility boundary, and local-search limits.
_WINDOW = 6
_POLISH_ROUNDS = 8


@dataclass(frozen=True)
class Prediction:
    jct_quantile: float
    cost_mean: float
    summary: dict[str, Any]


class Evaluator:
    """Simulates plans on the problem's common random numbers, remembering each result."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.draws = Draws.for_problem(problem)
        self.cache: dict[Plan, Prediction] = {}

    def __call__(self, plan: Plan) -> Prediction:
        if plan not in self.cache:
            outcome = simulate_outcome(self.problem, plan, self.draws)
            s = summarize(outcome, self.problem.planner.jct_quantile, samples=self.problem.planner.samples)
            self.cache[plan] = Prediction(s["jct_seconds"]["quantile"], s["cost_usd"]["mean"], s)
        return self.cache[plan]

    def on_time(self, plan: Plan) -> bool:
        return self(plan).jct_quantile <= self.problem.deadline_seconds * (1 + 1e-12)


def _cheapest_on_time(points: list[FrontierPoint], ev: Evaluator) -> Plan | None:
    """Cheapest plan of one frontier (fastest first) that the simulator finds on time.

    Simulated JCT grows along the frontier, so a binary search finds the last plan on time;
    a window around it is simulated in full to settle billing details and noise.
    """
    if not points or not ev.on_time(points[0].plan):
        return None
    lo, hi = 0, len(points) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ev.on_time(points[mid].plan):
            lo = mid
        else:
            hi = mid - 1
    window = points[max(0, lo - _WINDOW): lo + _WINDOW + 1]
    on_time = [p.plan for p in window if ev.on_time(p.plan)]
    return min(on_time, key=lambda plan: ev(plan).cost_mean)


def _best(plans: Iterable[Plan | None], ev: Evaluator) -> Plan | None:
    found = [p for p in plans if p is not None]
    return min(found, key=lambda plan: (ev(plan).cost_mean, ev(plan).jct_quantile)) if found else None


def _neighbours(problem: Problem, plan: Plan) -> list[Plan]:
    """Plans one move away: one stage's count up or down, its GPUs per trial changed, or its count
    set to a neighbouring stage's."""
    itype = problem.instance_type(plan.instance_type)
    options = problem.gpu_options(itype)
    stages = [(s.gpus_per_trial, s.instances) for s in plan.stages]
    out: set[Plan] = set()
    for i, (g, c) in enumerate(stages):
        counts = {c - 1, c + 1}
        if i > 0:
            counts.add(stages[i - 1][1])
        if i + 1 < len(stages):
            counts.add(stages[i + 1][1])
        moves = [(g, k) for k in counts if 1 <= k <= itype.max_instances and k != c]
        moves += [(other, c) for other in options if other != g]
        for move in moves:
            changed = list(stages)
            changed[i] = move
            out.add(Plan.of(plan.instance_type, changed))
    return sorted(out, key=lambda p: [(s.gpus_per_trial, s.instances) for s in p.stages])


def _polish(plan: Plan, ev: Evaluator) -> Plan:
    """Local search with the simulator: move to the cheapest on-time neighbour while one is cheaper."""
    for _ in range(_POLISH_ROUNDS):
        current = ev(plan).cost_mean
        better = [p for p in _neighbours(ev.problem, plan) if ev.on_time(p) and ev(p).cost_mean < current - 1e-9]
        if not better:
            break
        plan = min(better, key=lambda p: ev(p).cost_mean)
    return plan


def _fastest(candidates: Iterable[Plan], ev: Evaluator) -> Plan:
    return min(candidates, key=lambda plan: (ev(plan).jct_quantile, ev(plan).cost_mean))


def _fastest_plan(problem: Problem, itype: InstanceType) -> Plan | None:
    points = frontier(problem, itype, fastest_only=True)
    return points[0].plan if points else None


def _usable_types(problem: Problem) -> list[InstanceType]:
    return [t for t in problem.instance_types if problem.gpu_options(t)]


def _infeasible(problem: Problem, ev: Evaluator, candidates: list[Plan]) -> InfeasibleError:
    plan = _fastest(candidates, ev)
    return InfeasibleError(problem.deadline_seconds, ev(plan).jct_quantile, plan.to_dict(problem))


def plan_exact(problem: Problem, ev: Evaluator) -> Plan:
    """Cheapest on-time plan: exact frontier search, simulator selection, local polish."""
    types = _usable_types(problem)
    chosen = _best((_cheapest_on_time(frontier(problem, t, problem.deadline_seconds), ev) for t in types), ev)
    if chosen is None:
        raise _infeasible(problem, ev, [p for t in types if (p := _fastest_plan(problem, t))])
    return _polish(chosen, ev)


def plan_greedy(problem: Problem, ev: Evaluator) -> Plan:
    """The seed's planner: from the fastest plan, take the neighbour with the best cost-marginal
    benefit M = (cost_now - cost_new) / (JCT_new - JCT_now) while one lowers the cost on time."""
    starts = [p for t in _usable_types(problem) if (p := _fastest_plan(problem, t))]
    results = []
    for plan in starts:
        if not ev.on_time(plan):
            continue
        while True:
            now = ev(plan)
            best, best_m = None, -np.inf
            for cand in _neighbours(problem, plan):
                new = ev(cand)
                if not ev.on_time(cand) or new.cost_mean >= now.cost_mean - 1e-9:
                    continue
                slower = new.jct_quantile - now.jct_quantile
                m = np.inf if slower <= 0 else (now.cost_mean - new.cost_mean) / slower
                if m > best_m:
                    best, best_m = cand, m
            if best is None:
                break
            plan = best
        results.append(plan)
    chosen = _best(results, ev)
    if chosen is None:
        raise _infeasible(problem, ev, starts)
    return chosen


def _static_allocation_frontier(problem: Problem, itype: InstanceType) -> list[FrontierPoint]:
    """Every plan with the same (g, c) in each stage, as noise-free frontier points."""
    table = stage_table(problem, itype)
    stages = problem.num_stages
    points = []
    for k, g in enumerate(table.gpus):
        for c in range(1, itype.max_instances + 1):
            before = [0] + [c] * (stages - 1)
            t = sum(table.seconds[i, before[i], c - 1, k] for i in range(stages))
            s = sum(table.instance_seconds[i, before[i], c - 1, k] for i in range(stages))
            cost = s * itype.price_per_hour / 3600.0 + problem.data_cost()
            points.append(FrontierPoint(float(t), float(cost), Plan.of(itype.name, [(g, c)] * stages)))
    return _pareto(points)


def _static_cluster_frontier(problem: Problem, itype: InstanceType) -> list[FrontierPoint]:
    """Every plan with the same instance count in each stage (GPUs per trial free), on the frontier."""
    points = [p for c in range(1, itype.max_instances + 1) for p in frontier(problem, itype, counts=[c])]
    return _pareto(points)


def _pareto(points: list[FrontierPoint]) -> list[FrontierPoint]:
    out: list[FrontierPoint] = []
    for p in sorted(points, key=lambda p: (p.jct, p.cost)):
        if not out or p.cost < out[-1].cost - 1e-12:
            out.append(p)
    return out


def _baseline(problem: Problem, ev: Evaluator,
              frontier_of: Callable[[Problem, InstanceType], list[FrontierPoint]]) -> dict[str, Any]:
    fronts = [frontier_of(problem, t) for t in _usable_types(problem)]
    plan = _best((_cheapest_on_time(f, ev) for f in fronts), ev)
    if plan is None:
        fastest = _fastest([f[0].plan for f in fronts if f], ev)
        return {"feasible": False, "fastest": _with_prediction(problem, fastest, ev)}
    return {"feasible": True, **_with_prediction(problem, plan, ev)}


def lower_bound_cost(problem: Problem) -> float:
    """All work at the most cost-efficient g and instance type, no idle GPU, no overheads."""
    work = sum(problem.sha.trials(i) * problem.sha.new_epochs(i) for i in range(1, problem.num_stages + 1))
    per_epoch = min(t.price_per_hour / 3600.0 / t.gpus * g * problem.workload.epoch_seconds[g]
                    for t in _usable_types(problem) for g in problem.gpu_options(t))
    return work * per_epoch + problem.data_cost()


def _with_prediction(problem: Problem, plan: Plan, ev: Evaluator) -> dict[str, Any]:
    s = ev(plan).summary
    return {**plan.to_dict(problem), "predicted": {"jct_seconds": s["jct_seconds"], "cost_usd": s["cost_usd"]}}


def plan_problem(problem: Problem, method: str = "exact") -> dict[str, Any]:
    """The chosen plan with its prediction and the baselines, as `rubberband plan` prints it.

    Raises InfeasibleError when no plan meets the deadline.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    ev = Evaluator(problem)
    plan = plan_exact(problem, ev) if method == "exact" else plan_greedy(problem, ev)
    out = _with_prediction(problem, plan, ev)
    out["gpus_per_instance"] = problem.instance_type(plan.instance_type).gpus
    out["deadline_seconds"] = problem.deadline_seconds
    out["jct_quantile"] = problem.planner.jct_quantile
    out["samples"] = problem.planner.samples
    out["method"] = method
    out["baselines"] = {
        "static_allocation": _baseline(problem, ev, _static_allocation_frontier),
        "static_cluster": _baseline(problem, ev, _static_cluster_frontier),
        "lower_bound": {"cost_usd": lower_bound_cost(problem)},
    }
    return out
