"""Monte Carlo simulator of docs/planning-model.md section 4, vectorised over samples with numpy."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from rubberband_airflow.planning.billing import billed_seconds
from rubberband_airflow.planning.plan import Plan, StageAllocation
from rubberband_airflow.planning.problem import InstanceType, Problem


@dataclass(frozen=True)
class Draws:
    """Common random numbers: one standard normal per (sample, stage, trial) and per instance request.

    The same draws serve every candidate plan, so plans are compared on the same luck.
    """

    trial_z: np.ndarray  # (samples, stages, num_trials)
    pending_z: np.ndarray  # (samples, stages, max instances requested in one stage)
    interruption_u: np.ndarray | None = None  # (samples, stages, num_trials) uniforms; None: no spot type
    _factors: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def samples(self) -> int:
        return self.trial_z.shape[0]

    def trial_factor(self, sigma: float, stage: int, trials: int) -> np.ndarray:
        """Straggler multipliers xi of the first ``trials`` trials of ``stage`` (0-based), per sample.

        Computed once per stage and only for the trials the stage runs (n_i of num_trials), from
        the same normals as always: the draws, and so every result, do not depend on this.
        """
        key = ("trial", sigma, stage, trials)
        if key not in self._factors:
            self._factors[key] = lognormal_factor(self.trial_z[:, stage, :trials], sigma)
        return self._factors[key]

    def durations(self, stage: int, trials: int, overhead: float, train: float, sigma: float,
                  interruptions_per_hour: float = 0.0, per_interruption: float = 0.0) -> np.ndarray:
        """Trial durations (samples, trials) of a stage: ``overhead + train * xi``, remembered. On
        spot instances (section 4.1) each trial is also interrupted a Poisson number of times, with
        mean rate x that duration, each interruption costing ``per_interruption`` seconds."""
        key = ("durations", stage, trials, overhead, train, sigma, interruptions_per_hour, per_interruption)
        if key not in self._factors:
            base = overhead + train * self.trial_factor(sigma, stage, trials)
            if interruptions_per_hour > 0:
                assert self.interruption_u is not None, "the draws were made for a problem without spot types"
                counts = poisson_counts(self.interruption_u[:, stage, :trials], base * (interruptions_per_hour / 3600))
                base = base + counts * per_interruption
            self._factors[key] = base
        return self._factors[key]

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
        interruption_u = None  # drawn after the others, so problems without spot draw as before
        if any(t.interruptions_per_hour > 0 for t in problem.instance_types):
            # Stratified over samples for each trial: interruptions are rare events, and the samples
            # must hold each trial's share of them however few samples there are.
            shape = (samples, stages, problem.sha.num_trials)
            strata = rng.permuted(np.broadcast_to(np.arange(samples)[:, None, None], shape), axis=0)
            interruption_u = (strata + rng.random(shape)) / samples
        return cls(trial_z, pending_z, interruption_u)


def poisson_counts(u: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Inverse CDF of Poisson(mean) at the uniforms ``u``: the smallest k with P(N <= k) >= u."""
    counts = np.zeros(u.shape, dtype=np.int64)
    term = np.exp(-mean)
    cdf = term.copy()
    for k in range(1, 1000):
        above = u > cdf
        if not above.any():
            break
        counts += above
        term = term * mean / k
        cdf = cdf + term
    return counts


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


def schedule_stage(free: np.ndarray, durations: np.ndarray, kind: np.ndarray | None = None) -> np.ndarray:
    """Greedy list scheduling of trials in index order onto slots, for every sample at once.

    ``free`` (samples, slots) is when each slot is first free; ``durations`` (samples, trials).
    Each trial goes to the slot that is free earliest. Returns the latest finish time per sample.

    Which of two equally free slots a trial takes changes neither the free times that follow
    (as a set) nor any finish time, so only the sorted free times are kept. Trials are placed
    in batches: the next trials take the earliest free slots in order, one each, as long as no
    trial of the batch has finished before the slot the next one takes is free (else one-by-one
    placement would give the next trial that refilled slot); the batch then refills its slots.
    Only the n earliest slots can ever be used by n trials.

    With ``kind`` (slots,), slots are of several kinds and a trial's duration is that of the
    kind of slot it takes: ``kind`` indexes ``durations`` (kinds, samples, trials). Of equally
    free slots the one listed first is then taken first (slots are listed by instance, the one
    requested first first).
    """
    n = durations.shape[-1]
    if kind is None:
        free = np.sort(free, axis=1)[:, :n]
    else:
        rank = np.broadcast_to(np.arange(free.shape[1]), free.shape)
        order = np.lexsort((rank, free), axis=-1)[:, :n]
        kinds = np.broadcast_to(kind, free.shape)
        free, kind, rank = (np.take_along_axis(a, order, axis=1) for a in (free, kinds, rank))
    samples = free.shape[0]
    placed = np.zeros(samples, dtype=np.int64)
    end = np.full(samples, -np.inf)
    rows = np.arange(samples)[:, None]
    offsets = np.arange(free.shape[1])
    while True:
        left = n - placed
        most = int(left.max())
        if most == 0:
            return end
        free = free[:, :most]
        trial = np.minimum(placed[:, None] + offsets[:most], n - 1)
        if kind is None:
            finish = free + durations[rows, trial]
        else:
            kind, rank = kind[:, :most], rank[:, :most]
            finish = free + durations[kind, rows, trial]
        take = offsets[:most] < np.minimum(_batch_sizes(free, finish), left)[:, None]
        end = np.maximum(end, np.where(take, finish, -np.inf).max(axis=1))
        free = np.where(take, finish, free)
        if kind is None:
            free.sort(axis=1)
        else:
            order = np.lexsort((rank, free), axis=-1)
            free, kind, rank = (np.take_along_axis(a, order, axis=1) for a in (free, kind, rank))
        placed += take.sum(axis=1)


def _batch_sizes(free: np.ndarray, finish: np.ndarray) -> np.ndarray:
    """Per sample, how many of the next trials can take the sorted free slots in order: trial m
    takes slot m while no earlier trial of the batch finishes before slot m is free."""
    samples, width = free.shape
    if width == 1:
        return np.ones(samples, dtype=np.int64)
    blocked = np.minimum.accumulate(finish[:, :-1], axis=1) < free[:, 1:]
    return np.where(blocked.any(axis=1), blocked.argmax(axis=1) + 1, width)


@dataclass(frozen=True)
class Fleet:
    """A run after its first stages: all that a later stage and the final billing need.

    The state after stage i depends only on the plan's stages 1..i (and the draws), so plans that
    share their first stages share these states (``Prefixes``).
    """

    end: np.ndarray  # (samples,): when the last simulated stage ended (0 before the first)
    stage_end: tuple[np.ndarray, ...]  # E_1 .. E_i
    running: tuple[np.ndarray, ...]  # per instance ever requested, in request order: when it starts to bill
    terminated: tuple[np.ndarray | None, ...]  # when it was terminated; None while live
    live: tuple[int, ...]  # the live instances, in request order
    live_ready: np.ndarray  # (samples, len(live)): when each live instance is ready
    start: np.ndarray  # (samples,): T of the last simulated stage (pre-warming counts from it)
    offers: tuple[str, ...] = ()  # per instance ever requested: its instance type (its market's offer)

    @classmethod
    def initial(cls, problem: Problem, itype: InstanceType, samples: int) -> Fleet:
        """Before the problem's first stage: no fleet at 0, or a run in flight's live instances of
        this type and its twin (section 7; the others are released, their cost in
        ``Problem.fixed_cost``)."""
        carried = problem.carried(itype)
        elapsed = problem.start.elapsed_seconds if problem.start is not None else 0.0
        ready = np.array([[x.ready_at_seconds for x in carried]], dtype=float)
        return cls(np.full(samples, elapsed), (), tuple(np.full(samples, x.running_at_seconds) for x in carried),
                   (None,) * len(carried), tuple(range(len(carried))),
                   np.repeat(ready.reshape(1, len(carried)), samples, axis=0), np.full(samples, elapsed),
                   tuple(x.instance_type for x in carried))

    @property
    def nbytes(self) -> int:
        """An upper bound on the memory the arrays it refers to take (shared ones counted too)."""
        return self.end.nbytes * (len(self.running) + len(self.stage_end) + len(self.live) + 3)


class Prefixes:
    """Fleets after the first stages of plans simulated before, for one problem and its draws.

    Candidate plans often differ only in later stages; a plan's simulation starts from the fleet
    of its longest known prefix. At most ``max_bytes`` are kept, the least recently used dropped.
    """

    def __init__(self, problem: Problem, draws: Draws, max_bytes: int) -> None:
        self.problem, self.draws, self.max_bytes = problem, draws, max_bytes
        self._fleets: OrderedDict[tuple, Fleet] = OrderedDict()
        self._bytes = 0

    def longest(self, plan: Plan) -> tuple[int, Fleet | None]:
        """How many of the plan's first stages are known, and the fleet after them."""
        for i in range(len(plan.stages), 0, -1):
            fleet = self._fleets.get((plan.instance_type, plan.stages[:i]))
            if fleet is not None:
                self._fleets.move_to_end((plan.instance_type, plan.stages[:i]))
                return i, fleet
        return 0, None

    def store(self, plan: Plan, stages: int, fleet: Fleet) -> None:
        """Remember the fleet after the plan's first ``stages`` stages."""
        key = (plan.instance_type, plan.stages[:stages])
        if key in self._fleets or fleet.nbytes > self.max_bytes:
            return
        self._fleets[key] = fleet
        self._bytes += fleet.nbytes
        while self._bytes > self.max_bytes:
            self._bytes -= self._fleets.popitem(last=False)[1].nbytes


def run_stage(problem: Problem, itype: InstanceType, fleet: Fleet, i: int, stage: StageAllocation,
              draws: Draws) -> Fleet:
    """The fleet after stage ``i`` (0-based) of a plan on ``itype``: scale in or out (instances of
    either market kept, the added ones bought in the stage's), then schedule its trials."""
    w = problem.workload
    bought = problem.offer(itype, stage.market)
    start = fleet.end + w.stage_overhead_seconds
    terminated = list(fleet.terminated)
    if stage.release is not None:  # the other market's live instances go first
        released = [problem.instance_type(fleet.offers[k]).market == stage.release for k in fleet.live]
        kept = [j for j, gone in enumerate(released) if not gone]
        for k, gone in zip(fleet.live, released):
            if gone:
                terminated[k] = start
        fleet = replace(fleet, live=tuple(fleet.live[j] for j in kept), live_ready=fleet.live_ready[:, kept])
    keep = min(len(fleet.live), stage.instances)
    for k in fleet.live[keep:]:  # LIFO scale-in: the most recently requested go first
        terminated[k] = start
    new = stage.instances - keep
    request = start
    if stage.launch_after is not None and i > 0:  # pre-warming: during the previous stage, if it lasts
        request = np.minimum(start, fleet.start + stage.launch_after)
    running = request[:, None] + bought.pending_seconds * draws.pending_factor(bought.pending_sigma)[:, i, :new]
    live_ready = np.concatenate([fleet.live_ready[:, :keep], running + bought.boot_seconds], axis=1)
    slots = itype.gpus // stage.gpus_per_trial
    free = np.repeat(np.maximum(start[:, None], live_ready), slots, axis=1)
    offers = fleet.offers + (bought.name,) * new
    n = problem.sha.trials(i + 1)
    epoch = w.epoch_seconds[stage.gpus_per_trial]

    def durations(t: InstanceType) -> np.ndarray:  # the stage's trials' durations on instances of t
        return draws.durations(i, n, w.trial_overhead_seconds, problem.sha.new_epochs(i + 1) * epoch,
                               w.straggler_sigma, t.interruptions_per_hour,
                               t.interruption_seconds(epoch, w.trial_overhead_seconds))

    live = [offers[k] for k in fleet.live[:keep]] + [bought.name] * new
    kinds = sorted(set(live))
    if len(kinds) == 1:
        end = schedule_stage(free, durations(problem.instance_type(kinds[0])))
    else:  # a fleet of both markets: a trial's interruptions are those of the instance it runs on
        kind = np.repeat([kinds.index(name) for name in live], slots)
        end = schedule_stage(free, np.stack([durations(problem.instance_type(name)) for name in kinds]), kind)
    return Fleet(end=end, stage_end=fleet.stage_end + (end,), running=fleet.running + tuple(running.T),
                 terminated=tuple(terminated) + (None,) * new,
                 live=fleet.live[:keep] + tuple(range(len(fleet.running), len(fleet.running) + new)),
                 live_ready=live_ready, start=start, offers=offers)


def bill(problem: Problem, itype: InstanceType, fleet: Fleet) -> Outcome:
    """The outcome of a run whose every stage is done: the live instances are terminated the
    workload's ``teardown_seconds`` after it."""
    end = fleet.end
    running_at = np.stack(fleet.running, axis=1)
    teardown = end + problem.workload.teardown_seconds
    terminated_at = np.stack([t if t is not None else teardown for t in fleet.terminated], axis=1)
    billed = billed_seconds(running_at, terminated_at, problem.billing.minimum_seconds,
                            problem.billing.increment_seconds)
    prices = np.array([problem.instance_type(o).price_per_hour for o in fleet.offers]) / 3600.0
    cost = billed @ prices + problem.data_cost() + problem.fixed_cost(itype)
    return Outcome(jct=end, cost=cost, stage_end=np.stack(fleet.stage_end, axis=1), running=running_at,
                   terminated=terminated_at)


def simulate_outcome(problem: Problem, plan: Plan, draws: Draws, prefixes: Prefixes | None = None) -> Outcome:
    """Run the execution semantics of section 4 for every sample of ``draws``.

    With ``prefixes`` (made for this problem and these draws), the run starts after the plan's
    longest prefix simulated before, and the fleets after its later stages are remembered.
    """
    if prefixes is not None and (prefixes.problem is not problem or prefixes.draws is not draws):
        raise ValueError("prefixes were made for another problem or other draws")
    itype = problem.instance_type(plan.instance_type)
    done, fleet = prefixes.longest(plan) if prefixes is not None else (0, None)
    fleet = fleet or Fleet.initial(problem, itype, draws.samples)
    for i in range(done, len(plan.stages)):
        fleet = run_stage(problem, itype, fleet, i, plan.stages[i], draws)
        if prefixes is not None and i + 1 < len(plan.stages):
            prefixes.store(plan, i + 1, fleet)
    return bill(problem, itype, fleet)


def simulate(problem: Problem, plan: Plan, draws: Draws | None = None) -> dict[str, Any]:
    """Predicted JCT and cost statistics of a plan, as `rubberband simulate` prints them."""
    draws = draws or Draws.for_problem(problem)
    return summarize(simulate_outcome(problem, plan, draws), problem.planner.jct_quantile,
                     samples=problem.planner.samples)
