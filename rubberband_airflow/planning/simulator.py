"""Monte Carlo simulator of docs/planning-model.md section 4, vectorised over samples with numpy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rubberband_airflow.planning.billing import billed_seconds
from rubberband_airflow.planning.plan import Plan
from rubberband_airflow.planning.problem import Problem


@dataclass(frozen=True)
class Draws:
    """Common random numbers: one standard normal per (sample, stage, trial) and per instance request.

    The same draws serve every candidate plan, so plans are compared on the same luck.
    """

    trial_z: np.ndarray  # (samples, stages, num_trials)
    pending_z: np.ndarray  # (samples, stages, max instances requested in one stage)
    _factors: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def samples(self) -> int:
        return self.trial_z.shape[0]

    def trial_factor(self, sigma: float) -> np.ndarray:
        """Straggler multipliers xi for every (sample, stage, trial)."""
        return self._factor("trial", self.trial_z, sigma)

    def pending_factor(self, sigma: float) -> np.ndarray:
        """Pending-latency multipliers for every (sample, stage, request)."""
        return self._factor("pending", self.pending_z, sigma)

    def _factor(self, kind: str, z: np.ndarray, sigma: float) -> np.ndarray:
        key = (kind, sigma)
        if key not in self._factors:
            self._factors[key] = lognormal_factor(z, sigma)
        return self._factors[key]

    @classmethod
    def for_problem(cls, problem: Problem, samples: int | None = None) -> Draws:
        """Draws from the problem's seed; a deterministic problem needs one sample only."""
        if samples is None:
            samples = 1 if problem.deterministic else problem.planner.samples
        rng = np.random.default_rng(problem.planner.seed)
        stages = problem.num_stages
        max_new = max(t.max_instances for t in problem.instance_types)
        if problem.workload.straggler_sigma > 0:
            trial_z = rng.standard_normal((samples, stages, problem.sha.num_trials))
        else:
            trial_z = np.zeros((samples, stages, problem.sha.num_trials))
        if any(t.pending_sigma > 0 for t in problem.instance_types):
            pending_z = rng.standard_normal((samples, stages, max_new))
        else:
            pending_z = np.zeros((samples, stages, max_new))
        return cls(trial_z, pending_z)


def lognormal_factor(z: np.ndarray, sigma: float) -> np.ndarray:
    """Mean-one lognormal multiplier exp(sigma Z - sigma^2 / 2)."""
    if sigma == 0:
        return np.ones_like(z)
    return np.exp(sigma * z - sigma * sigma / 2.0)


@dataclass(frozen=True)
class Outcome:
    """Per-sample results of simulating one plan."""

    jct: np.ndarray  # (samples,)
    cost: np.ndarray  # (samples,)
    stage_end: np.ndarray  # (samples, stages): E_i
    running: np.ndarray  # (samples, instances): when each instance, in request order, starts to bill
    terminated: np.ndarray  # (samples, instances): when it is terminated


def quantile(values: np.ndarray, q: float) -> float:
    """Smallest sampled value v with at least a fraction q of samples <= v (inverted CDF)."""
    return float(np.quantile(values, q, method="inverted_cdf"))


def summarize(outcome: Outcome, jct_quantile: float, samples: int | None = None) -> dict[str, Any]:
    """The statistics of section 6: JCT mean/p50/p95/quantile and cost mean/p50/p95."""
    j, c = outcome.jct, outcome.cost
    return {
        "jct_seconds": {"mean": float(j.mean()), "p50": quantile(j, 0.5), "p95": quantile(j, 0.95),
                        "quantile": quantile(j, jct_quantile)},
        "cost_usd": {"mean": float(c.mean()), "p50": quantile(c, 0.5), "p95": quantile(c, 0.95)},
        "samples": int(samples if samples is not None else len(j)),
    }


def schedule_stage(free: np.ndarray, durations: np.ndarray) -> np.ndarray:
    """Greedy list scheduling of trials in index order onto slots, for every sample at once.

    ``free`` (samples, slots) is when each slot is first free; ``durations`` (samples, trials).
    Each trial goes to the slot that is free earliest. Returns the latest finish time per sample.

    Which of two equally free slots a trial takes changes neither the free times that follow
    (as a set) nor any finish time, so only the sorted free times are kept. Trials are placed
    in batches: every slot free before the earliest free time plus the shortest duration is
    taken by the next trials in order of free time, exactly as one-by-one placement would take
    them, since each slot it refills becomes free later than all of them. Only the n earliest
    slots can ever be used by n trials.
    """
    n = durations.shape[1]
    free = np.sort(free, axis=1)[:, :n]
    samples = free.shape[0]
    shortest = durations.min(axis=1)[:, None]
    placed = np.zeros(samples, dtype=np.int64)
    end = np.full(samples, -np.inf)
    rows = np.arange(samples)[:, None]
    while True:
        left = n - placed
        most = int(left.max())
        if most == 0:
            return end
        free = free[:, :most]
        batch = np.minimum(np.count_nonzero(free < free[:, :1] + shortest, axis=1), left)
        width = int(batch.max())
        offsets = np.arange(width)
        take = offsets[None, :] < batch[:, None]
        trial = np.minimum(placed[:, None] + offsets[None, :], n - 1)
        starts = free[:, :width]
        finish = np.where(take, starts + durations[rows, trial], starts)
        end = np.maximum(end, np.where(take, finish, -np.inf).max(axis=1))
        free = np.sort(np.concatenate([free[:, width:], finish], axis=1), axis=1)
        placed += batch


def simulate_outcome(problem: Problem, plan: Plan, draws: Draws) -> Outcome:
    """Run the execution semantics of section 4 for every sample of ``draws``."""
    itype = problem.instance_type(plan.instance_type)
    w = problem.workload
    samples = draws.samples
    h = w.stage_overhead_seconds
    live: list[int] = []  # instance ids in request order (older first)
    running: list[np.ndarray] = []
    ready: list[np.ndarray] = []
    terminated: list[np.ndarray | None] = []
    stage_end = np.zeros((samples, len(plan.stages)))
    end = np.zeros(samples)
    for i, stage in enumerate(plan.stages):
        start = end + h
        while len(live) > stage.instances:  # LIFO scale-in
            terminated[live.pop()] = start
        pending = itype.pending_seconds * draws.pending_factor(itype.pending_sigma)[:, i, : stage.instances - len(live)]
        for k in range(stage.instances - len(live)):
            live.append(len(running))
            running.append(start + pending[:, k])
            ready.append(running[-1] + itype.boot_seconds)
            terminated.append(None)
        slots_per_instance = itype.gpus // stage.gpus_per_trial
        instance_free = np.maximum(start[:, None], np.stack([ready[k] for k in live], axis=1))
        free = np.repeat(instance_free, slots_per_instance, axis=1)
        n = problem.sha.trials(i + 1)
        train = problem.sha.new_epochs(i + 1) * w.epoch_seconds[stage.gpus_per_trial]
        durations = w.trial_overhead_seconds + train * draws.trial_factor(w.straggler_sigma)[:, i, :n]
        end = schedule_stage(free, durations)
        stage_end[:, i] = end
    for k in live:
        terminated[k] = end
    running_at = np.stack(running, axis=1)
    terminated_at = np.stack([t if t is not None else end for t in terminated], axis=1)
    billed = billed_seconds(running_at, terminated_at, problem.billing.minimum_seconds,
                            problem.billing.increment_seconds)
    cost = itype.price_per_hour / 3600.0 * billed.sum(axis=1) + problem.data_cost()
    return Outcome(jct=end, cost=cost, stage_end=stage_end, running=running_at, terminated=terminated_at)


def simulate(problem: Problem, plan: Plan, draws: Draws | None = None) -> dict[str, Any]:
    """Predicted JCT and cost statistics of a plan, as `rubberband simulate` prints them."""
    draws = draws or Draws.for_problem(problem)
    return summarize(simulate_outcome(problem, plan, draws), problem.planner.jct_quantile,
                     samples=problem.planner.samples)
