"""A plain event-by-event simulator, written line by line from docs/planning-model.md section 4.

It is the oracle for the vectorised simulator: one sample at a time, a heap of slots, no numpy.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from rubberband_airflow.planning.plan import Plan
from rubberband_airflow.planning.problem import Problem
from rubberband_airflow.planning.simulator import Draws, simulate_outcome


def _factor(z: float, sigma: float) -> float:
    return math.exp(sigma * z - sigma * sigma / 2)


def _billed(running: float, terminated: float, minimum: float, increment: float) -> float:
    life = terminated - running
    if life <= 0:
        return 0.0
    return max(minimum, math.ceil(round(life / increment, 6)) * increment)


def reference_run(problem: Problem, plan: Plan, draws: Draws, sample: int) -> tuple[float, float, list[float]]:
    """(JCT, cost, stage end times) of one sample."""
    it = problem.instance_type(plan.instance_type)
    w = problem.workload
    # A run in flight (section 7) starts at its barrier with its live instances of the plan's type.
    end = problem.start.elapsed_seconds if problem.start is not None else 0.0
    live: list[dict] = [{"running": x.running_at_seconds, "ready": x.ready_at_seconds, "terminated": None}
                        for x in problem.carried(it)]  # in request order: oldest first
    every: list[dict] = list(live)
    ends = []
    previous_start = end
    for i, stage in enumerate(plan.stages):
        start = end + w.stage_overhead_seconds
        request = start  # pre-warming: the added instances are requested during the previous stage
        if i > 0 and stage.launch_after is not None and previous_start + stage.launch_after < start:
            request = previous_start + stage.launch_after
        previous_start = start
        while len(live) > stage.instances:
            live.pop()["terminated"] = start  # most recently requested first
        k = 0
        while len(live) < stage.instances:
            pending = it.pending_seconds * _factor(float(draws.pending_z[sample, i, k]), it.pending_sigma)
            inst = {"running": request + pending, "terminated": None}
            inst["ready"] = inst["running"] + it.boot_seconds
            live.append(inst)
            every.append(inst)
            k += 1
        heap = []
        for age, inst in enumerate(live):
            for slot in range(it.gpus // stage.gpus_per_trial):
                heapq.heappush(heap, (max(start, inst["ready"]), age, slot))
        d = problem.sha.epochs(i + 1) - problem.sha.epochs(i)
        latest = -math.inf
        for j in range(problem.sha.trials(i + 1)):
            free, age, slot = heapq.heappop(heap)
            xi = _factor(float(draws.trial_z[sample, i, j]), w.straggler_sigma)
            finish = free + w.trial_overhead_seconds + d * w.epoch_seconds[stage.gpus_per_trial] * xi
            latest = max(latest, finish)
            heapq.heappush(heap, (finish, age, slot))
        end = latest
        ends.append(end)
    for inst in live:
        inst["terminated"] = end + w.teardown_seconds
    b = problem.billing
    seconds = sum(_billed(x["running"], x["terminated"], b.minimum_seconds, b.increment_seconds) for x in every)
    first_restoring = 2 if problem.sha.done == 0 else 1  # stage 1 of the job restores nothing
    restores = sum(problem.sha.trials(i) for i in range(first_restoring, len(plan.stages) + 1))
    cost = it.price_per_hour / 3600 * seconds + b.data_price_per_gb * w.checkpoint_gb * restores
    if problem.start is not None:  # what was spent, and live instances of other types released at T_1
        release = problem.start.elapsed_seconds + w.stage_overhead_seconds
        for x in problem.start.live:
            if x.instance_type != it.name:
                other = problem.instance_type(x.instance_type)
                cost += other.price_per_hour / 3600 * _billed(x.running_at_seconds, release, b.minimum_seconds,
                                                              b.increment_seconds)
        cost += problem.start.spent_usd
    return end, cost, ends


def assert_simulator_matches(problem: Problem, plan: Plan) -> None:
    """The vectorised simulator gives every sample's JCT, cost and stage ends of ``reference_run``."""
    draws = Draws.for_problem(problem, samples=problem.planner.samples)
    outcome = simulate_outcome(problem, plan, draws)
    for s in range(draws.samples):
        jct, cost, ends = reference_run(problem, plan, draws, s)
        assert np.isclose(outcome.jct[s], jct, rtol=1e-9, atol=1e-9)
        assert np.isclose(outcome.cost[s], cost, rtol=1e-9, atol=1e-9)
        assert np.allclose(outcome.stage_end[s], ends, rtol=1e-9, atol=1e-9)
