"""Exact search over per-stage allocations: a Pareto dynamic programme on the noise-free model.

With no noise a stage's duration and instance-seconds depend only on the instances live before
it, its instance count c and its GPUs per trial g. So a plan is a path through states (stage,
c), and the plans worth keeping are the ones no other plan beats on both JCT and cost. The
programme keeps, per state, exactly those (time, cost) points, pruned by the deadline, and
returns the cost/JCT frontier of whole plans. Minimum billing and rounding are left to the
simulator, which re-evaluates the frontier's plans exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rubberband_airflow.planning.bounds import UsableInstances, usable_instances
from rubberband_airflow.planning.budget import MemoryBudget
from rubberband_airflow.planning.plan import Plan
from rubberband_airflow.planning.problem import InstanceType, Problem
from rubberband_airflow.planning.simulator import schedule_stage

_EPS = 1e-9
# Work of one stage-table entry (a makespan by binary search), in candidates of the programme.
TABLE_ENTRY_WORK = 8


@dataclass(frozen=True)
class FrontierPoint:
    jct: float  # noise-free JCT, seconds
    cost: float  # noise-free cost in USD, before minimum billing and rounding
    plan: Plan


def makespan(n: int, duration: float, carried_slots: np.ndarray, new_slots: np.ndarray, delay: float) -> np.ndarray:
    """Time from stage start until n equal trials finish on carried slots (free at 0) and new slots (free at delay).

    Greedy placement of equal trials makes the k-th start the k-th smallest element of the union
    of {j d} (once per carried slot) and {delay + j d} (once per new slot); the makespan is the
    n-th smallest start plus d. Vectorised over arrays of slot counts.
    """
    a = np.asarray(carried_slots, dtype=np.int64)
    b = np.asarray(new_slots, dtype=np.int64)
    a, b = np.broadcast_arrays(a, b)
    q = delay / duration

    def count_carried_start(j: np.ndarray) -> np.ndarray:  # starts <= j*d
        new_waves = np.where(j + _EPS >= q, np.floor(j - q + _EPS) + 1, 0)
        return a * (j + 1) + b * new_waves

    def count_new_start(j: np.ndarray) -> np.ndarray:  # starts <= delay + j*d
        return a * (np.floor(q + j + _EPS) + 1) + b * (j + 1)

    def first_reaching(count, slots: np.ndarray) -> np.ndarray:
        hi = np.where(slots > 0, -(-n // np.maximum(slots, 1)) - 1, 0).astype(np.int64)
        lo = np.zeros_like(hi)
        while np.any(lo < hi):
            mid = (lo + hi) // 2
            ok = count(mid.astype(float)) >= n
            hi = np.where(ok, mid, hi)
            lo = np.where(ok, lo, mid + 1)
        return lo.astype(float)

    with np.errstate(invalid="ignore"):
        t_carried = np.where(a > 0, first_reaching(count_carried_start, a) * duration, np.inf)
        t_new = np.where(b > 0, delay + first_reaching(count_new_start, b) * duration, np.inf)
    return np.minimum(t_carried, t_new) + duration


class SearchTooLarge(Exception):
    """The programme would evaluate more candidates than its work limit allows."""


# Instance counts the programme tries, ascending: counts[stage][GPU option].
Counts = list[list[np.ndarray]]


def every_count(bounds: UsableInstances) -> Counts:
    """Every count up to the bound of each stage and GPU option: the exact programme."""
    return [[np.arange(1, int(c) + 1) for c in row] for row in bounds.per_option]


def stage_costs(problem: Problem, itype: InstanceType, stage: int, g: int, before: np.ndarray,
                after: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Duration, live instance-seconds and billing slack of a stage (0-based) on g GPUs per trial.

    ``before`` instances are live when it starts and ``after`` run it (broadcast together).
    Instance-seconds come before minimum billing and rounding; the slack bounds what those can
    add for the instances it launches.
    """
    w, b = problem.workload, problem.billing
    h, pending = w.stage_overhead_seconds, itype.pending_seconds
    before, after = np.broadcast_arrays(np.asarray(before, dtype=np.int64), np.asarray(after, dtype=np.int64))
    carried = np.minimum(before, after)
    new = after - carried
    slots = itype.gpus // g
    d = itype.interrupted_seconds(w.trial_overhead_seconds + problem.sha.new_epochs(stage + 1) * w.epoch_seconds[g],
                                  w.epoch_seconds[g], w.trial_overhead_seconds)
    if stage == 0 and _waits_for_live(problem, itype):
        span = _first_makespan(problem, itype, d, slots, after)
    else:
        span = makespan(problem.sha.trials(stage + 1), d, carried * slots, new * slots, pending + itype.boot_seconds)
    kept = np.where(after <= before, before * h + after * span, before * (h + span))
    first_life = np.maximum(0.0, span - pending)  # a new instance lives at least this long
    slack = new * (b.increment_seconds + np.maximum(0.0, b.minimum_seconds - first_life))
    if stage == problem.num_stages - 1:  # the instances live at the end bill until the teardown
        e = w.teardown_seconds
        kept = kept + carried * e + new * (np.maximum(0.0, span - pending + e) - first_life)
    return h + span, kept + new * first_life, slack


def _quota_field(problem: Problem, itype: InstanceType, bounds: UsableInstances) -> str:
    """The field that sizes this programme: the quota where it binds, else the trials."""
    if int(bounds.live.max()) >= itype.max_instances:
        return f"instance_types[{problem.instance_types.index(itype)}].max_instances"
    return "sha.num_trials"


def frontier(problem: Problem, itype: InstanceType, deadline: float = np.inf,
             same_count: bool = False, fastest_only: bool = False, every_end_state: bool = False,
             counts: Counts | None = None, budget: MemoryBudget = MemoryBudget(),
             work_limit: float = np.inf, margin: float = 0.0) -> list[FrontierPoint]:
    """The noise-free cost/JCT frontier of plans on one instance type, fastest first.

    Only plans whose noise-free JCT is within ``deadline`` are kept; ``same_count`` keeps the
    instance count of stage 1 in every stage (the static-cluster plans); ``fastest_only`` keeps
    one point per state, the fastest, and so returns the fastest plan. With ``every_end_state``
    the frontier of each final instance count is returned, not only the overall one: plans that
    tie without minimum billing and rounding can differ with them.

    ``counts`` are the instance counts tried (default: every count within the bounds, which is
    exact). A ``margin`` above 0 also keeps the points that another beats by less than that share
    of their cost (for noisy problems, where noise can reorder them). Raises SearchTooLarge when
    more than ``work_limit`` candidates would be evaluated, and ProblemError when the budget
    cannot hold the search.
    """
    bounds = usable_instances(problem, itype)
    field = _quota_field(problem, itype, bounds)
    stages = problem.num_stages
    gpus = bounds.gpus
    if same_count:  # any count up to what some stage can use, kept throughout
        widest = int(bounds.live[0])
        first = np.arange(1, widest + 1) if counts is None else np.unique(np.concatenate(counts[0]))
        counts = [[first[first <= widest]] * len(gpus)] + [[np.arange(1, widest + 1)] * len(gpus)] * (stages - 1)
    elif counts is None:
        counts = every_count(bounds)
    remaining = _remaining_lower_bound(problem, itype, counts)
    chunk = budget.candidates()

    state_vals = np.zeros(1, dtype=np.int64)  # instances live after the stage (folded), per state
    point_state = np.zeros(1, dtype=np.int64)
    time, cost, slack = initial_point(problem, itype)
    state_vals[0] = len(problem.carried(itype))
    history: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (parent, c, g index) per stage
    work = 0.0
    for i in range(stages):
        diagonal = same_count and i > 0
        width = len(gpus) if diagonal else sum(len(c) for c in counts[i])
        work += len(time) * width + TABLE_ENTRY_WORK * len(state_vals) * width
        if work > work_limit:
            raise SearchTooLarge(f"{work:.3g} candidates by stage {i + 1} of {itype.name}")
        if diagonal:  # each point keeps its count: options are the GPU choices
            opt_c = np.zeros(0, dtype=np.int64)
            opt_k = np.arange(len(gpus))
            columns = [stage_costs(problem, itype, i, g, state_vals[:, None], state_vals[:, None]) for g in gpus]
            table = [np.concatenate([col[j] for col in columns], axis=1) for j in range(3)]
            extra = np.zeros(len(gpus))
        else:
            opt_c = np.concatenate(counts[i]).astype(np.int64)
            opt_k = np.repeat(np.arange(len(gpus)), [len(c) for c in counts[i]])
            budget.check(len(state_vals) * len(opt_c) * 8 * 14, field, f"the stage table of stage {i + 1}")
            columns = [stage_costs(problem, itype, i, g, state_vals[:, None], counts[i][k][None, :])
                       for k, g in enumerate(gpus)]
            table = [np.concatenate([col[j] for col in columns], axis=1) for j in range(3)]
            del columns
            target, extra = (opt_c, np.zeros(len(opt_c))) if same_count else bounds.fold(i, opt_c)
        kept: list[tuple[np.ndarray, ...]] = []
        held = 0
        rows = max(1, chunk // width)
        for start in range(0, len(time), rows):
            p = np.arange(start, min(len(time), start + rows))
            s = point_state[p]
            new_time = (time[p][:, None] + table[0][s]).ravel()
            new_cost = (cost[p][:, None] + table[1][s] + extra[None, :]).ravel()
            new_slack = (slack[p][:, None] + table[2][s]).ravel()
            idx = np.nonzero(new_time + remaining[i] <= deadline * (1 + _EPS))[0]
            parent, opt = p[idx // width], idx % width
            if diagonal:
                c, k = state_vals[point_state[parent]], opt_k[opt]
                group = c
            else:
                c, k, group = opt_c[opt], opt_k[opt], target[opt]
            batch = (group, new_time[idx], new_cost[idx], new_slack[idx], parent, c, k)
            kept.append(_prune(batch, fastest_only, margin))
            held += len(kept[-1][0])
            if held > chunk and len(kept) > 1:
                kept = [_prune(_concat(kept), fastest_only, margin)]
                held = len(kept[0][0])
        group, time, cost, slack, parent, c, k = _prune(_concat(kept), fastest_only, margin)
        history.append((parent, c, k))
        budget.check(sum(len(h[0]) for h in history) * 24 + len(time) * 40, field,
                     f"the partial plans kept by stage {i + 1}")
        if len(time) == 0:
            return []
        state_vals, point_state = np.unique(group, return_inverse=True)
    if every_end_state:
        final = np.ones(len(time), dtype=bool)
    elif fastest_only:
        final = _fastest_by_group(np.zeros(len(time), dtype=np.int64), time, cost, np.ones(len(time), dtype=bool))
    else:
        final = _pareto_by_group(np.zeros(len(time), dtype=np.int64), time, cost, slack,
                                 np.ones(len(time), dtype=bool), margin)
    points = []
    scale = itype.price_per_hour / 3600.0
    for j in np.nonzero(final)[0][np.argsort(time[final], kind="stable")]:
        allocation = []
        q = j
        for parent, c, k in reversed(history):
            allocation.append((gpus[k[q]], int(c[q])))
            q = parent[q]
        points.append(FrontierPoint(float(time[j]), float(cost[j] * scale + problem.data_cost()
                                                          + problem.fixed_cost(itype)),
                                    Plan.of(itype.name, allocation[::-1])))
    return points


def _ready_offsets(problem: Problem, itype: InstanceType) -> np.ndarray:
    """When each live instance of a run in flight is ready, from its first stage's start (0 if it is)."""
    if problem.start is None:
        return np.zeros(0)
    start = problem.start.elapsed_seconds + problem.workload.stage_overhead_seconds
    return np.maximum(0.0, np.array([x.ready_at_seconds for x in problem.carried(itype)]) - start)


def _waits_for_live(problem: Problem, itype: InstanceType) -> bool:
    return bool(np.any(_ready_offsets(problem, itype) > 0))


def _first_makespan(problem: Problem, itype: InstanceType, duration: float, slots: int,
                    after: np.ndarray) -> np.ndarray:
    """Makespan of a re-plan's first stage on ``after`` instances when some live ones are still
    pending or booting: list scheduling (as the simulator does) of its equal trials on the oldest
    live instances, each ready at its own time, and new ones ready after pending and boot."""
    n = problem.sha.trials(1)
    offsets = _ready_offsets(problem, itype)
    counts, where = np.unique(after, return_inverse=True)
    carried_free = np.repeat(offsets, slots)[None, :]
    carried_ok = (np.arange(len(offsets) * slots) // slots)[None, :] < counts[:, None]
    new_ok = np.arange(n)[None, :] < (np.maximum(0, counts - len(offsets)) * slots)[:, None]
    free = np.concatenate([np.where(carried_ok, carried_free, np.inf),
                           np.where(new_ok, itype.pending_seconds + itype.boot_seconds, np.inf)], axis=1)
    span = schedule_stage(free, np.full((len(counts), n), duration))
    return span[where].reshape(np.shape(after))


def initial_point(problem: Problem, itype: InstanceType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Time, instance-seconds and slack before the first stage: zero, or for a run in flight
    (section 7) its elapsed time and its live instances' billing so far.

    The programme counts carried instances as ready at the stage's start and billed from the
    barrier; the simulator settles instances still pending or booting exactly.
    """
    if problem.start is None:
        return np.zeros(1), np.zeros(1), np.zeros(1)
    elapsed, b = problem.start.elapsed_seconds, problem.billing
    carried = problem.carried(itype)
    billed = sum(elapsed - x.running_at_seconds for x in carried)
    slack = sum(b.increment_seconds + max(0.0, b.minimum_seconds - max(0.0, elapsed - x.running_at_seconds))
                for x in carried)
    return np.array([elapsed]), np.array([billed]), np.array([float(slack)])


def _remaining_lower_bound(problem: Problem, itype: InstanceType, counts: Counts) -> np.ndarray:
    """Per stage, a lower bound on the time the stages after it still need (all instances carried)."""
    fastest = np.array([min(float(stage_costs(problem, itype, i, g, c, c)[0].min()) for g, c in
                            zip(problem.gpu_options(itype), counts[i]) if len(c)) for i in range(len(counts))])
    return np.concatenate([np.cumsum(fastest[::-1])[::-1][1:], [0.0]])


def _concat(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate(cols) for cols in zip(*parts))


def _prune(batch: tuple[np.ndarray, ...], fastest_only: bool, margin: float) -> tuple[np.ndarray, ...]:
    """The candidates (group, time, cost, slack, ...) that survive the pruning within their group."""
    group, time, cost, slack = batch[:4]
    everything = np.ones(len(time), dtype=bool)
    keep = (_fastest_by_group(group, time, cost, everything) if fastest_only
            else _pareto_by_group(group, time, cost, slack, everything, margin))
    return tuple(x[keep] for x in batch)


def _pareto_by_group(group: np.ndarray, time: np.ndarray, low: np.ndarray, slack: np.ndarray,
                     mask: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Mask of the points, among ``mask``, that no other point of the same group surely beats.

    Costs are known between ``low`` and ``low + slack`` (minimum billing and rounding), so a
    point is dropped only when an earlier-or-equal point of its group costs at most its ``low``
    (less ``margin`` of it) even at worst, or is an exact duplicate of one kept.
    """
    out = np.zeros(len(time), dtype=bool)
    idx = np.nonzero(mask)[0]
    if len(idx) == 0:
        return out
    high = low + slack
    order = idx[_sort_order(group[idx], time[idx], high[idx])]
    g, t, lo, hi = group[order], time[order], low[order], high[order]
    starts = np.r_[True, g[1:] != g[:-1]]
    seg = np.cumsum(starts) - 1
    # Running minimum of the upper bound within each group: shifting each group below the ones
    # before it lets one accumulate serve all groups.
    shift = (hi.max() - hi.min() + 1.0) * 2 * seg
    best_high = np.minimum.accumulate(hi - shift) + shift
    before = np.r_[np.inf, best_high[:-1]]
    before[starts] = np.inf
    duplicate = ~starts & np.r_[False, (t[1:] == t[:-1]) & (lo[1:] == lo[:-1]) & (hi[1:] == hi[:-1])]
    with np.errstate(invalid="ignore"):
        beaten = np.isfinite(before) & (before <= lo * (1 - margin) + _EPS * np.maximum(1.0, np.abs(lo)))
    out[order] = ~beaten & ~duplicate
    return out


def _sort_order(group: np.ndarray, time: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Indices that sort by group, then time, then high: np.lexsort's order, in half its time
    where groups fit 16 bits (numpy's stable sort of those is a radix sort)."""
    if len(group) == 0 or group.min() < 0 or group.max() >= 2 ** 15:
        return np.lexsort((high, time, group))
    order = np.argsort(high)
    order = order[np.argsort(time[order], kind="stable")]
    return order[np.argsort(group[order].astype(np.int16), kind="stable")]


def _fastest_by_group(group: np.ndarray, time: np.ndarray, cost: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask of the fastest point (cheapest among equally fast) of each group, among ``mask``."""
    out = np.zeros(len(time), dtype=bool)
    idx = np.nonzero(mask)[0]
    order = idx[np.lexsort((cost[idx], time[idx], group[idx]))]
    first = np.r_[True, group[order][1:] != group[order][:-1]] if len(order) else np.zeros(0, dtype=bool)
    out[order[first]] = True
    return out
