"""The Pareto programme as it was before the bounds of issue 15: every count up to max_instances.

Kept as the oracle of the bounded search (tests/planning/test_bounded_search.py); slow and
memory-hungry on large quotas, so for small problems only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rubberband_airflow.planning.frontier import _EPS, FrontierPoint, _fastest_by_group, _pareto_by_group, makespan
from rubberband_airflow.planning.plan import Plan
from rubberband_airflow.planning.problem import InstanceType, Problem


@dataclass(frozen=True)
class StageTable:
    """Per stage, for every (instances before, instances, GPU option): duration and instance-seconds."""

    gpus: list[int]
    seconds: np.ndarray  # (stages, max_instances + 1, max_instances, len(gpus))
    instance_seconds: np.ndarray  # same shape: live instance-seconds, before minimum billing and rounding
    slack_seconds: np.ndarray  # same shape: the most minimum billing and rounding can add for new instances


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
    slack = np.empty(shape)
    b = problem.billing
    for i in range(problem.num_stages):
        n = problem.sha.trials(i + 1)
        for k, g in enumerate(gpus):
            slots = itype.gpus // g
            d = w.trial_overhead_seconds + problem.sha.new_epochs(i + 1) * w.epoch_seconds[g]
            span = makespan(n, d, carried * slots, new * slots, delay)
            seconds[i, :, :, k] = h + span
            kept = np.where(after <= before, before * h + after * span, before * (h + span))
            first_life = np.maximum(0.0, span - pending)  # a new instance lives at least this long
            if i == problem.num_stages - 1:  # the instances live at the end bill until the teardown
                e = w.teardown_seconds
                kept = kept + carried * e + new * (np.maximum(0.0, span - pending + e) - first_life)
            inst_seconds[i, :, :, k] = kept + new * first_life
            slack[i, :, :, k] = new * (b.increment_seconds + np.maximum(0.0, b.minimum_seconds - first_life))
    return StageTable(gpus, seconds, inst_seconds, slack)


def frontier(problem: Problem, itype: InstanceType, deadline: float = np.inf,
             same_count: bool = False, fastest_only: bool = False, every_end_state: bool = False
             ) -> list[FrontierPoint]:
    """The noise-free cost/JCT frontier of plans on one instance type, fastest first.

    Only plans whose noise-free JCT is within ``deadline`` are kept; ``same_count`` keeps the
    instance count of stage 1 in every stage (the static-cluster plans); ``fastest_only`` keeps
    one point per state, the fastest, and so returns the fastest plan. With ``every_end_state``
    the frontier of each final instance count is returned, not only the overall one: plans that
    tie without minimum billing and rounding can differ with them.
    """
    table = stage_table(problem, itype)
    stages = problem.num_stages
    m = itype.max_instances
    allowed_c = np.arange(1, m + 1)
    # Lower bound on the time the stages after i still need, for deadline pruning.
    fastest = table.seconds.reshape(stages, -1).min(axis=1)
    remaining = np.concatenate([np.cumsum(fastest[::-1])[::-1][1:], [0.0]])

    state = np.zeros(1, dtype=np.int64)  # instances live after the stage
    time = np.zeros(1)
    cost = np.zeros(1)  # lower bound, instance-seconds
    slack = np.zeros(1)  # cost + slack bounds the billed instance-seconds from above
    history: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (parent, c, g index) per stage
    gi = np.arange(len(table.gpus))
    for i in range(stages):
        cc, gg = np.meshgrid(allowed_c, gi, indexing="ij")
        cc, gg = cc.ravel(), gg.ravel()
        dt = table.seconds[i][state[:, None], cc[None, :] - 1, gg[None, :]]
        dk = table.instance_seconds[i][state[:, None], cc[None, :] - 1, gg[None, :]]
        ds = table.slack_seconds[i][state[:, None], cc[None, :] - 1, gg[None, :]]
        new_time = (time[:, None] + dt).ravel()
        new_cost = (cost[:, None] + dk).ravel()
        new_slack = (slack[:, None] + ds).ravel()
        parent = np.repeat(np.arange(len(state)), len(cc))
        new_c = np.tile(cc, len(state))
        new_g = np.tile(gg, len(state))
        if same_count and i > 0:
            same = new_c == state[parent]
            new_time, new_cost, new_slack, parent, new_c, new_g = (
                x[same] for x in (new_time, new_cost, new_slack, parent, new_c, new_g))
        keep = new_time + remaining[i] <= deadline * (1 + _EPS)
        if fastest_only:
            keep &= _fastest_by_group(new_c, new_time, new_cost, keep)
        else:
            keep &= _pareto_by_group(new_c, new_time, new_cost, new_slack, keep)
        idx = np.nonzero(keep)[0]
        history.append((parent[idx], new_c[idx], new_g[idx]))
        state, time, cost, slack = new_c[idx], new_time[idx], new_cost[idx], new_slack[idx]
        if len(idx) == 0:
            return []
    if every_end_state:
        final = np.ones(len(state), dtype=bool)
    elif fastest_only:
        final = _fastest_by_group(np.zeros_like(state), time, cost, np.ones(len(state), dtype=bool))
    else:
        final = _pareto_by_group(np.zeros_like(state), time, cost, slack, np.ones(len(state), dtype=bool))
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
