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

from rubberband_airflow.planning.plan import Plan
from rubberband_airflow.planning.problem import InstanceType, Problem

_EPS = 1e-9


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


@dataclass(frozen=True)
class StageTable:
    """Per stage, for every (instances before, instances, GPU option): duration and instance-seconds."""

    gpus: list[int]
    seconds: np.ndarray  # (stages, max_instances + 1, max_instances, len(gpus)); inf where not allowed
    instance_seconds: np.ndarray  # same shape


def stage_table(problem: Problem, itype: InstanceType) -> StageTable:
    w = problem.workload
    gpus = problem.gpu_options(itype)
    m = itype.max_instances
    h, pending = w.stage_overhead_seconds, itype.pending_seconds
    delay = pending + itype.boot_seconds
    before = np.arange(m + 1)[:, None]
    after = np.arange(1, m + 1)[None, :]
    carried = np.minimum(before, after)
    new = after - carried
    shape = (problem.num_stages, m + 1, m, len(gpus))
    seconds = np.empty(shape)
    inst_seconds = np.empty(shape)
    for i in range(problem.num_stages):
        n = problem.sha.trials(i + 1)
        for k, g in enumerate(gpus):
            slots = itype.gpus // g
            d = w.trial_overhead_seconds + problem.sha.new_epochs(i + 1) * w.epoch_seconds[g]
            span = makespan(n, d, carried * slots, new * slots, delay)
            seconds[i, :, :, k] = h + span
            kept = np.where(after <= before, before * h + after * span, before * (h + span))
            inst_seconds[i, :, :, k] = kept + new * np.maximum(0.0, span - pending)
    return StageTable(gpus, seconds, inst_seconds)


def frontier(problem: Problem, itype: InstanceType, deadline: float = np.inf,
             counts: list[int] | None = None, fastest_only: bool = False) -> list[FrontierPoint]:
    """The noise-free cost/JCT frontier of plans on one instance type, fastest first.

    Only plans whose noise-free JCT is within ``deadline`` are kept; ``counts`` limits the
    instance counts a stage may use (``[c]`` gives the static-cluster plans of c instances);
    ``fastest_only`` keeps one point per state, the fastest, and so returns the fastest plan.
    """
    table = stage_table(problem, itype)
    stages = problem.num_stages
    m = itype.max_instances
    allowed_c = np.arange(1, m + 1) if counts is None else np.asarray(counts)
    # Lower bound on the time the stages after i still need, for deadline pruning.
    fastest = table.seconds.reshape(stages, -1).min(axis=1)
    remaining = np.concatenate([np.cumsum(fastest[::-1])[::-1][1:], [0.0]])

    state = np.zeros(1, dtype=np.int64)  # instances live after the stage
    time = np.zeros(1)
    cost = np.zeros(1)
    history: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (parent, c, g index) per stage
    gi = np.arange(len(table.gpus))
    for i in range(stages):
        cc, gg = np.meshgrid(allowed_c, gi, indexing="ij")
        cc, gg = cc.ravel(), gg.ravel()
        dt = table.seconds[i][state[:, None], cc[None, :] - 1, gg[None, :]]
        dk = table.instance_seconds[i][state[:, None], cc[None, :] - 1, gg[None, :]]
        new_time = (time[:, None] + dt).ravel()
        new_cost = (cost[:, None] + dk).ravel()
        parent = np.repeat(np.arange(len(state)), len(cc))
        new_c = np.tile(cc, len(state))
        new_g = np.tile(gg, len(state))
        keep = new_time + remaining[i] <= deadline * (1 + _EPS)
        keep &= (_fastest_by_group if fastest_only else _pareto_by_group)(new_c, new_time, new_cost, keep)
        idx = np.nonzero(keep)[0]
        history.append((parent[idx], new_c[idx], new_g[idx]))
        state, time, cost = new_c[idx], new_time[idx], new_cost[idx]
        if len(idx) == 0:
            return []
    final = (_fastest_by_group if fastest_only else _pareto_by_group)(
        np.zeros_like(state), time, cost, np.ones(len(state), dtype=bool))
    points = []
    scale = itype.price_per_hour / 3600.0
    for j in np.nonzero(final)[0][np.argsort(time[final], kind="stable")]:
        allocation = []
        k = j
        for parent, c, g in reversed(history):
            allocation.append((table.gpus[g[k]], int(c[k])))
            k = parent[k]
        points.append(FrontierPoint(float(time[j]), float(cost[j] * scale + problem.data_cost()),
                                    Plan.of(itype.name, allocation[::-1])))
    return points


def _pareto_by_group(group: np.ndarray, time: np.ndarray, cost: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask of points, among ``mask``, that no other point of the same group beats on time and cost."""
    out = np.zeros(len(time), dtype=bool)
    idx = np.nonzero(mask)[0]
    if len(idx) == 0:
        return out
    # Sort by group, then time, then cost; a point survives if its cost is below every earlier one's.
    order = idx[np.lexsort((cost[idx], time[idx], group[idx]))]
    g, c = group[order], cost[order]
    starts = np.r_[True, g[1:] != g[:-1]]
    seg = np.cumsum(starts) - 1
    # Running minimum of cost within each group: shift groups apart so one accumulate serves all.
    span = c.max() - c.min() + 1.0
    shifted = c - seg * span * 2
    running = np.minimum.accumulate(shifted)
    best = running + seg * span * 2
    prev_best = np.r_[np.inf, best[:-1]]
    prev_best[starts] = np.inf
    with np.errstate(invalid="ignore"):
        out[order] = np.isinf(prev_best) | (c < prev_best - _EPS * np.maximum(1.0, np.abs(prev_best)))
    return out


def _fastest_by_group(group: np.ndarray, time: np.ndarray, cost: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask of the fastest point (cheapest among equally fast) of each group, among ``mask``."""
    out = np.zeros(len(time), dtype=bool)
    idx = np.nonzero(mask)[0]
    order = idx[np.lexsort((cost[idx], time[idx], group[idx]))]
    first = np.r_[True, group[order][1:] != group[order][:-1]] if len(order) else np.zeros(0, dtype=bool)
    out[order[first]] = True
    return out
