"""The planner: the cheapest plan whose JCT at the quantile meets the deadline, and the baselines.

The ``exact`` method searches the noise-free frontier of every instance type exactly
(frontier.py, within the bounds of bounds.py; coarse to fine, grid.py, where the exact programme
would be too large), picks the cheapest frontier plan that the Monte Carlo simulator finds on time,
and polishes it with the simulator by local moves (which also settles minimum billing and
noise). The ``greedy`` method is the seed's cost-marginal-benefit search, kept as a baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np

from rubberband_airflow.planning.bounds import usable_instances
from rubberband_airflow.planning.budget import MemoryBudget
from rubberband_airflow.planning.errors import InfeasibleError
from rubberband_airflow.planning.frontier import (
    Counts,
    FrontierPoint,
    SearchTooLarge,
    frontier,
    initial_point,
    stage_costs,
)
from rubberband_airflow.planning.grid import coarse_counts, refined_counts
from rubberband_airflow.planning.plan import Plan
from rubberband_airflow.planning.problem import InstanceType, PlannerSettings, Problem
from rubberband_airflow.planning.simulator import Draws, Prefixes, quantile, simulate_outcome, summarize

METHODS = ("exact", "greedy")
# Frontier plans simulated on each side of the feasibility boundary.
_WINDOW = 2
# Noise-free problems: at most this many frontier plans simulated in order of their cost bound.
_BOUND_EVALS = 400
# Noisy problems: at most this many more on-time frontier plans simulated in order of their cost bound.
_NOISY_EVALS = 24
# Local search: at most this many rounds, and at most this much simulated work (trials x samples)
# per search.
_POLISH_ROUNDS = 8
_POLISH_WORK = 2e7
# Share of the memory budget for the fleets after plan prefixes that simulations start from.
_PREFIX_SHARE = 0.25
# Noisy problems: the frontier also keeps partial plans that another beats by less than this share
# of their noise-free cost, since noise can make them the cheaper (tests/planning/test_planner.py:
# GAP, 1.4% apart noise-free and 7% the other way with stragglers).
NOISY_MARGIN = 0.02
# The exact programme is tried while it evaluates at most this many candidates per instance type;
# beyond, the coarse-to-fine search runs instead.
EXACT_WORK = 6e6


@dataclass(frozen=True)
class Prediction:
    jct_quantile: float
    cost_mean: float
    summary: dict[str, Any]


class Evaluator:
    """Simulates plans on the problem's common random numbers, remembering each result."""

    def __init__(self, problem: Problem, budget: MemoryBudget = MemoryBudget()) -> None:
        self.problem = problem
        self.budget = budget
        samples = 1 if problem.deterministic else problem.planner.samples
        # The draws, their factors and one stage's durations: three arrays of samples x stages x trials.
        budget.check(3 * 8 * samples * problem.num_stages * problem.sha.num_trials,
                     "planner.samples" if samples > PlannerSettings.samples else "sha.num_trials",
                     "the Monte Carlo draws (samples x stages x trials)")
        self.draws = Draws.for_problem(problem)
        self.prefixes = Prefixes(problem, self.draws, int(budget.bytes * _PREFIX_SHARE))
        self.cache: dict[Plan, Prediction] = {}
        trials = sum(problem.sha.trials(i) for i in range(1, problem.num_stages + 1))
        self.work_per_run = trials * self.draws.samples

    def __call__(self, plan: Plan) -> Prediction:
        if plan not in self.cache:
            itype = self.problem.instance_type(plan.instance_type)
            slots = max(s.instances * (itype.gpus // s.gpus_per_trial) for s in plan.stages)
            self.budget.check(4 * 8 * self.draws.samples * slots,
                              f"instance_types[{self.problem.instance_types.index(itype)}].max_instances",
                              "simulating a plan (samples x GPU slots)")
            outcome = simulate_outcome(self.problem, plan, self.draws, self.prefixes)
            s = summarize(outcome, self.problem.planner.jct_quantile, samples=self.problem.planner.samples)
            self.cache[plan] = Prediction(s["jct_seconds"]["quantile"], s["cost_usd"]["mean"], s)
        return self.cache[plan]

    def on_time(self, plan: Plan) -> bool:
        return self(plan).jct_quantile <= self.problem.deadline_seconds


def pruning_deadline(problem: Problem) -> float:
    """Deadline for the noise-free search: the real one, relaxed where noise can help.

    At a low quantile, or with high noise, the JCT at the quantile can be shorter than the
    noise-free JCT: one mean-one lognormal factor exp(sigma Z - sigma^2/2) sits at
    exp(sigma z_q - sigma^2/2) at quantile q. Plans over the deadline by at most the inverse of
    that factor are kept for the simulator to judge.
    """
    sigma = max([problem.workload.straggler_sigma] + [t.pending_sigma for t in problem.instance_types])
    z = NormalDist().inv_cdf(min(problem.planner.jct_quantile, 1 - 1e-12))
    # The noise-free search counts spot interruptions at their mean; most trials see none.
    w = problem.workload
    stretch = max(t.interrupted_seconds(1.0, max(w.epoch_seconds.values()), w.trial_overhead_seconds)
                  for t in problem.instance_types)
    return problem.deadline_seconds * float(np.exp(max(0.0, sigma * sigma / 2 - sigma * z))) * 1.01 * stretch


def _cheapest_on_time(points: list[FrontierPoint], ev: Evaluator) -> Plan | None:
    """Cheapest plan of one frontier (fastest first) that the simulator finds on time.

    Simulated JCT grows along the frontier, so a binary search finds the last plan on time;
    a window around it is simulated in full to settle billing details and noise. Noise and billing
    increments can make a faster plan cheaper on average than the window's choice: the on-time
    side is then scanned in order of noise-free cost while that stays below the choice's mean cost.
    """
    if not points:
        return None
    lo, hi = 0, len(points) - 1
    if ev.on_time(points[0].plan):
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ev.on_time(points[mid].plan):
                lo = mid
            else:
                hi = mid - 1
    window = points[max(0, lo - _WINDOW): lo + _WINDOW + 1]
    chosen = _cheapest([p.plan for p in window], ev)
    return _cheapest_by_bound(points[:lo + 1], ev, chosen, _NOISY_EVALS) if chosen is not None else None


def _cheapest_by_bound(points: list[FrontierPoint], ev: Evaluator, best: Plan | None = None,
                       evals: int = _BOUND_EVALS) -> Plan | None:
    """Simulate plans in order of their noise-free cost (a lower bound on the billed cost of a
    noise-free problem) until the bound passes the cheapest on-time plan found, from ``best``."""
    for evaluated, p in enumerate(sorted(points, key=lambda p: (p.cost, p.jct))):
        if best is not None and (p.cost > ev(best).cost_mean + 1e-9 or evaluated >= evals):
            break
        if ev.on_time(p.plan) and (best is None or ev(p.plan).cost_mean < ev(best).cost_mean - 1e-12):
            best = p.plan
    return best


def _cheapest(plans: Iterable[Plan | None], ev: Evaluator) -> Plan | None:
    """The on-time plan of lowest mean cost (then lowest JCT), or None."""
    found = [p for p in plans if p is not None and ev.on_time(p)]
    return min(found, key=lambda plan: (ev(plan).cost_mean, ev(plan).jct_quantile)) if found else None


def _neighbours(problem: Problem, plan: Plan, family: str = "elastic") -> list[Plan]:
    """Plans one move away: a stage's count up or down or set to a neighbouring stage's, or its
    GPUs per trial changed, or (``elastic``, not ``one_market``) a market move (``_market_moves``).
    In the ``static_cluster`` and ``static_allocation`` families a move changes every stage, so
    that the plan stays in its family."""
    itype = problem.instance_type(plan.instance_type)
    options = problem.gpu_options(itype)
    stages = [(s.gpus_per_trial, s.instances) for s in plan.stages]
    out: set[Plan] = set()

    def add(changed: list[tuple[int, int]]) -> None:  # each stage keeps its pre-warming
        if all(1 <= c <= itype.max_instances for _, c in changed) and changed != stages:
            out.add(Plan(plan.instance_type, tuple(replace(s, gpus_per_trial=g, instances=c)
                                                   for (g, c), s in zip(changed, plan.stages))))

    if family in ("elastic", "one_market"):
        for i, (g, c) in enumerate(stages):
            counts = {c - 1, c + 1} | {stages[j][1] for j in (i - 1, i + 1) if 0 <= j < len(stages)}
            for move in [(g, k) for k in counts] + [(other, c) for other in options]:
                add(stages[:i] + [move] + stages[i + 1:])
        if family == "elastic":
            out.update(_market_moves(problem, plan))
    else:
        c = stages[0][1]
        for k in (c - 1, c + 1):
            add([(g, k) for g, _ in stages])
        if family == "static_cluster":
            for i in range(len(stages)):
                for other in options:
                    add(stages[:i] + [(other, c)] + stages[i + 1:])
        else:
            for other in options:
                add([(other, c)] * len(stages))
    return sorted(out, key=_order)


def _order(plan: Plan) -> list[tuple]:
    """A total order of plans, so that a search's ties fall the same way in every process."""
    return [(s.gpus_per_trial, s.instances, s.market or "", s.release or "",
             -1.0 if s.launch_after is None else s.launch_after) for s in plan.stages] + [(plan.instance_type,)]


def _market_moves(problem: Problem, plan: Plan) -> set[Plan]:
    """Where the plan's type has a twin in the other market: the plan with one stage, its first
    stages or its last stages buying in the other market than now, their fleets mixed or each
    stage that changes market releasing the other's instances; and a stage's release undone or
    done (where the other market's instances may be live then: bought before, or carried)."""
    itype = problem.instance_type(plan.instance_type)
    other = problem.twin(itype)
    if other is None:
        return set()
    now = plan.markets(problem)
    flip = {itype.market: other.market, other.market: itype.market}
    carried = carried_markets(problem, itype)
    n = len(now)
    spans = {(i, i + 1) for i in range(n)} | {(0, k) for k in range(1, n + 1)} | {(i, n) for i in range(n)}
    out = set()
    for i, j in spans:
        markets = now[:i] + tuple(flip[m] for m in now[i:j]) + now[j:]
        if not all(problem.buys(m) for m in markets[i:j]):
            continue
        stages = [replace(s, market=None if m == itype.market else m, release=None, launch_after=None)
                  for s, m in zip(plan.stages, markets)]
        out.add(canonical(problem, Plan(plan.instance_type, tuple(stages))))
        before = [carried | set(markets[:k]) for k in range(n)]  # markets that may be live before stage k
        released = [replace(s, release=flip[m] if flip[m] in before[k] and (k == 0 or markets[k - 1] != m) else None)
                    for k, (s, m) in enumerate(zip(stages, markets))]
        out.add(canonical(problem, Plan(plan.instance_type, tuple(released))))
    for k in range(n):
        if flip[now[k]] in carried | set(now[:k]):
            stages = list(plan.stages)
            stages[k] = replace(stages[k], release=None if plan.stages[k].release else flip[now[k]],
                                launch_after=None)
            out.add(canonical(problem, Plan(plan.instance_type, tuple(stages))))
    out.discard(plan)
    return out


def carried_markets(problem: Problem, itype: InstanceType) -> set[str]:
    """The markets of the live instances a plan on the type starts with (a re-plan's)."""
    return {problem.instance_type(x.instance_type).market for x in problem.carried(itype)}


def canonical(problem: Problem, plan: Plan) -> Plan:
    """One name for one plan: a plan whose every stage buys in its type's twin's market is a plan
    on the twin."""
    other = problem.twin(problem.instance_type(plan.instance_type))
    if other is None or any(s.market != other.market for s in plan.stages):
        return plan
    return Plan(other.name, tuple(replace(s, market=None) for s in plan.stages))


def _descend(plan: Plan, ev: Evaluator, score: Callable[[Plan], tuple | None], family: str = "elastic",
             done: Callable[[Plan], bool] = lambda plan: False) -> Plan:
    """Local search with the simulator: move to the neighbour of lowest score (None: not allowed)
    while that improves the score, looking two moves away when one does not help, within a fixed
    amount of simulated work so large jobs still plan in seconds."""
    budget = max(1, int(_POLISH_WORK / ev.work_per_run))
    for _ in range(_POLISH_ROUNDS):
        if done(plan):
            break
        single = _neighbours(ev.problem, plan, family)
        rings = [single, sorted({q for p in single for q in _neighbours(ev.problem, p, family)} - {plan},
                                key=_order)]
        moved = False
        for candidates in rings:
            fresh = sum(p not in ev.cache for p in candidates)
            if fresh > budget:
                return plan
            budget -= fresh
            scored = [(sc, p) for p in candidates if (sc := score(p)) is not None]
            current = score(plan)
            if scored:
                best_score, best = min(scored, key=lambda x: x[0])
                if current is None or best_score < current:
                    plan, moved = best, True
                    break
        if not moved:
            break
    return plan


def _polish(plan: Plan, ev: Evaluator, family: str = "elastic") -> Plan:
    """Cheapen an on-time plan while it stays on time."""
    def score(p: Plan) -> tuple | None:
        return (round(ev(p).cost_mean, 9), ev(p).jct_quantile) if ev.on_time(p) else None
    return _descend(plan, ev, score, family)


def _prewarm(plan: Plan, ev: Evaluator) -> Plan:
    """Choose each growing stage's pre-warming (section 4, rule 2): request its added instances a
    lead before its expected start (the previous stage's simulated duration at the 10% and 50%
    quantiles, plus h), the lead 0.5, 1 or 1.5 times pending plus boot; keep the choice that makes
    the on-time plan cheapest, if any does."""
    problem = ev.problem
    itype = problem.instance_type(plan.instance_type)
    h = problem.workload.stage_overhead_seconds
    for i in range(1, len(plan.stages)):
        if plan.stages[i].instances <= plan.stages[i - 1].instances or plan.stages[i].release is not None:
            continue
        bought = problem.offer(itype, plan.stages[i].market)
        latency = bought.pending_seconds + bought.boot_seconds
        if latency == 0:
            continue
        outcome = simulate_outcome(problem, plan, ev.draws, ev.prefixes)
        before = outcome.stage_end[:, i - 2] if i >= 2 else np.full(ev.draws.samples, _elapsed(problem))
        duration = outcome.stage_end[:, i - 1] - (before + h)
        offsets = {max(0.0, round(quantile(duration, q) + h - latency * m, 3))
                   for q in (0.1, 0.5) for m in (0.5, 1.0, 1.5)}
        candidates = [Plan(plan.instance_type, plan.stages[:i] + (replace(plan.stages[i], launch_after=a),)
                           + plan.stages[i + 1:]) for a in sorted(offsets)]
        plan = min([plan] + [p for p in candidates if ev.on_time(p)],
                   key=lambda p: (round(ev(p).cost_mean, 9), ev(p).jct_quantile))
    return plan


def _elapsed(problem: Problem) -> float:
    return problem.start.elapsed_seconds if problem.start is not None else 0.0


def _speed_up(plan: Plan, ev: Evaluator, family: str = "elastic") -> Plan:
    """Shorten the JCT at the quantile until the plan is on time, or as far as moves go."""
    return _descend(plan, ev, lambda p: (ev(p).jct_quantile, ev(p).cost_mean), family, done=ev.on_time)


def _fastest(candidates: Iterable[Plan], ev: Evaluator) -> Plan:
    return min(candidates, key=lambda plan: (ev(plan).jct_quantile, ev(plan).cost_mean))


def _margin(problem: Problem) -> float:
    return 0.0 if problem.deterministic else NOISY_MARGIN


def _search(problem: Problem, itype: InstanceType, budget: MemoryBudget, **options: Any
            ) -> tuple[list[FrontierPoint], bool]:
    """The frontier by the exact programme, or on the coarse grid where that would be too large;
    and whether it was exact."""
    options.setdefault("margin", _margin(problem))
    try:
        return frontier(problem, itype, budget=budget, work_limit=EXACT_WORK, **options), True
    except SearchTooLarge:
        counts = coarse_counts(problem, itype, usable_instances(problem, itype))
        return frontier(problem, itype, counts=counts, budget=budget, **options), False


def _fastest_plan(problem: Problem, itype: InstanceType, budget: MemoryBudget) -> Plan | None:
    points, _ = _search(problem, itype, budget, fastest_only=True)
    return points[0].plan if points else None


def _usable_types(problem: Problem) -> list[InstanceType]:
    return [t for t in problem.instance_types if problem.gpu_options(t) and problem.buys(t.market)]


def _infeasible(problem: Problem, ev: Evaluator, candidates: list[Plan]) -> InfeasibleError:
    plan = _fastest(candidates, ev)
    return InfeasibleError(problem.deadline_seconds, ev(plan).jct_quantile, plan.to_dict(problem))


def _pick(points: list[FrontierPoint], ev: Evaluator) -> Plan | None:
    """The simulator's choice from one instance type's frontier (step 2 of section 5)."""
    return _cheapest_by_bound(points, ev) if ev.problem.deterministic else _cheapest_on_time(points, ev)


def _cheapest_of_type(problem: Problem, itype: InstanceType, deadline: float, ev: Evaluator
                      ) -> tuple[Plan | None, bool, Plan | None]:
    """The frontier's cheapest on-time plan of one type, whether the programme was exact, and a
    rival to polish too.

    Where it is not exact, the coarse grid's choice is refined with every count near its own. On
    an interruptible spot type with an on-demand twin, the cheapest on-time plan that buys its
    first stages spot and, from some stage on, releases them for on-demand instances competes:
    the cheaper of the two is the choice, the other the rival (a local search from one seldom
    reaches the other's shape).
    """
    options: dict[str, Any] = {"deadline": deadline, "every_end_state": problem.deterministic,
                               "margin": _margin(problem)}
    points, exact = _search(problem, itype, ev.budget, **options)
    chosen = _pick(points, ev)
    if not exact and chosen is not None:
        bounds = usable_instances(problem, itype)
        counts: Counts = refined_counts(coarse_counts(problem, itype, bounds), bounds, chosen)
        refined = frontier(problem, itype, counts=counts, budget=ev.budget, **options)
        chosen = _cheapest([chosen, _pick(refined, ev)], ev)
    twin = problem.twin(itype)
    if itype.market != "spot" or itype.interruptions_per_hour == 0 or twin is None:
        return chosen, exact, None
    if chosen is None:  # on spot alone, noise can make the frontier's fastest plans on time
        fastest = _fastest_plan(problem, itype, ev.budget)
        chosen = _cheapest([_speed_up(fastest, ev, "one_market")] if fastest is not None else [], ev)
    mixed = None
    # From stage k on, on demand; stage 0 too in a re-plan whose live fleet has spot instances.
    for k in range(0 if itype.market in carried_markets(problem, itype) else 1, problem.num_stages):
        switched = [replace(p, plan=canonical(problem, switched_plan(p.plan, k, twin.market))) for p in points]
        mixed = _cheapest([mixed, _cheapest_on_time(switched, ev)], ev)
    best = _cheapest([chosen, mixed], ev)
    return best, exact, (mixed if best == chosen else chosen)


def switched_plan(plan: Plan, k: int, market: str) -> Plan:
    """The plan with its stages from ``k`` (0-based) on in ``market``, the first of them releasing
    the instances of the plan's own market."""
    own = [s if i < k else replace(s, market=market, launch_after=None) for i, s in enumerate(plan.stages)]
    return Plan(plan.instance_type, tuple(own[:k]) + (replace(own[k], release="spot" if market != "spot"
                                                              else "on-demand"),) + tuple(own[k + 1:]))


def plan_exact(problem: Problem, ev: Evaluator, baselines: Iterable[Plan] = ()) -> tuple[Plan, str]:
    """Cheapest on-time plan: frontier search, simulator selection, local polish; and the search
    used: "exact", or "coarse-to-fine" where the exact programme was too large for some type.

    ``baselines`` are on-time plans found otherwise (the static baselines); the result is never
    more expensive than any of them.
    """
    types = _usable_types(problem)
    deadline = pruning_deadline(problem)
    found = [_cheapest_of_type(problem, t, deadline, ev) for t in types]
    method = "exact" if all(exact for _, exact, _ in found) else "coarse-to-fine"
    chosen = _cheapest([p for p, _, _ in found] + list(baselines), ev)
    if chosen is None:  # noise can make plans the noise-free model finds slower the faster ones
        fastest = [_speed_up(p, ev) for t in types if (p := _fastest_plan(problem, t, ev.budget))]
        chosen = _cheapest(fastest, ev)
        if chosen is None:
            raise _infeasible(problem, ev, fastest)
    rivals = [rival for p, _, rival in found if rival is not None and p == chosen]
    plan = _cheapest([_polish(p, ev) for p in [chosen, *rivals]], ev)
    assert plan is not None
    warmed = _prewarm(plan, ev)
    return (plan if warmed == plan else _polish(warmed, ev)), method


def plan_greedy(problem: Problem, ev: Evaluator) -> Plan:
    """The seed's planner: from the fastest plan, take the neighbour with the best cost-marginal
    benefit M = (cost_now - cost_new) / (JCT_new - JCT_now) while one lowers the cost on time."""
    starts = [p for t in _usable_types(problem) if (p := _fastest_plan(problem, t, ev.budget))]
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
    chosen = _cheapest(results, ev)
    if chosen is None:
        raise _infeasible(problem, ev, starts)
    return chosen


def _static_allocation_frontier(problem: Problem, itype: InstanceType, budget: MemoryBudget) -> list[FrontierPoint]:
    """Every plan with the same (g, c) in each stage, up to the bounds, as noise-free frontier points."""
    bounds = usable_instances(problem, itype)
    stages = problem.num_stages
    points = []
    time0, billed0, _ = initial_point(problem, itype)
    live = np.int64(len(problem.carried(itype)))
    for k, g in enumerate(bounds.gpus):
        counts = np.arange(1, int(bounds.per_option[0, k]) + 1)
        seconds, instance_seconds = np.full(len(counts), time0[0]), np.full(len(counts), billed0[0])
        for i in range(stages):
            t, s, _ = stage_costs(problem, itype, i, g, np.full_like(counts, live) if i == 0 else counts, counts)
            seconds, instance_seconds = seconds + t, instance_seconds + s
        cost = instance_seconds * itype.price_per_hour / 3600.0 + problem.data_cost() + problem.fixed_cost(itype)
        points += [FrontierPoint(float(t), float(x), Plan.of(itype.name, [(g, int(c))] * stages))
                   for t, x, c in zip(seconds, cost, counts)]
    return _pareto(points)


def _static_cluster_frontier(problem: Problem, itype: InstanceType, budget: MemoryBudget) -> list[FrontierPoint]:
    """Every plan with the same instance count in each stage (GPUs per trial free), on the frontier."""
    return _search(problem, itype, budget, deadline=pruning_deadline(problem), same_count=True)[0]


def _pareto(points: list[FrontierPoint]) -> list[FrontierPoint]:
    out: list[FrontierPoint] = []
    for p in sorted(points, key=lambda p: (p.jct, p.cost)):
        if not out or p.cost < out[-1].cost - 1e-12:
            out.append(p)
    return out


def _static_baseline(problem: Problem, ev: Evaluator, family: str, also: Iterable[Plan] = ()) -> Plan | None:
    """The cheapest on-time plan of a static family, or None when none is on time."""
    frontier_of = _static_allocation_frontier if family == "static_allocation" else _static_cluster_frontier
    fronts = [frontier_of(problem, t, ev.budget) for t in _usable_types(problem)]
    plan = _cheapest([_cheapest_on_time(f, ev) for f in fronts] + list(also), ev)
    return _polish(plan, ev, family) if plan is not None else None


def _baseline_report(problem: Problem, ev: Evaluator, plan: Plan | None, family: str) -> dict[str, Any]:
    if plan is not None:
        return {"feasible": True, **_with_prediction(problem, plan, ev)}
    if family == "static_allocation":
        starts = [Plan.of(t.name, [(max(problem.gpu_options(t)), t.max_instances)] * problem.num_stages)
                  for t in _usable_types(problem)]
    else:
        starts = [f[0].plan for t in _usable_types(problem)
                  if (f := _search(problem, t, ev.budget, same_count=True, fastest_only=True)[0])]
    return {"feasible": False, "fastest": _with_prediction(problem, _fastest(starts, ev), ev)}


def lower_bound_cost(problem: Problem) -> float:
    """All work at the most cost-efficient g and instance type, no idle GPU, no overheads."""
    work = sum(problem.sha.trials(i) * problem.sha.new_epochs(i) for i in range(1, problem.num_stages + 1))
    per_epoch = min(t.price_per_hour / 3600.0 / t.gpus * g * problem.workload.epoch_seconds[g]
                    for t in _usable_types(problem) for g in problem.gpu_options(t))
    fixed = min(problem.fixed_cost(t) for t in _usable_types(problem))
    return work * per_epoch + problem.data_cost() + fixed


def _with_prediction(problem: Problem, plan: Plan, ev: Evaluator) -> dict[str, Any]:
    s = ev(plan).summary
    return {**plan.to_dict(problem), "predicted": {"jct_seconds": s["jct_seconds"], "cost_usd": s["cost_usd"]}}


def plan_problem(problem: Problem, method: str = "exact", budget: MemoryBudget = MemoryBudget(),
                 static_baselines: bool = True) -> dict[str, Any]:
    """The chosen plan with its prediction and the baselines, as `rubberband plan` prints it.

    Without ``static_baselines`` (a re-plan, where most of the time would go to them) only the
    lower bound is reported, and the static plans do not compete. Raises InfeasibleError when no
    plan meets the deadline, and ProblemError (naming the field to reduce) when planning would
    need more memory than ``budget``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    ev = Evaluator(problem, budget)
    static_allocation = static_cluster = None
    if static_baselines:
        static_allocation = _static_baseline(problem, ev, "static_allocation")
        static_cluster = _static_baseline(problem, ev, "static_cluster",
                                          [static_allocation] if static_allocation else [])
    if method == "exact":
        plan, method = plan_exact(problem, ev, [p for p in (static_allocation, static_cluster) if p])
    else:
        plan = plan_greedy(problem, ev)
    out = _with_prediction(problem, plan, ev)
    out["gpus_per_instance"] = problem.instance_type(plan.instance_type).gpus
    out["deadline_seconds"] = problem.deadline_seconds
    out["jct_quantile"] = problem.planner.jct_quantile
    out["samples"] = problem.planner.samples
    out["method"] = method
    out["baselines"] = {"lower_bound": {"cost_usd": lower_bound_cost(problem)}}
    if static_baselines:
        out["baselines"] |= {
            "static_allocation": _baseline_report(problem, ev, static_allocation, "static_allocation"),
            "static_cluster": _baseline_report(problem, ev, static_cluster, "static_cluster"),
        }
    return out
