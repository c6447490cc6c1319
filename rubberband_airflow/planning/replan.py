"""Re-planning a run in flight (docs/planning-model.md section 7): the state JSON, the workload
corrected by what the run observed, and the cheapest plan of the remaining stages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from rubberband_airflow.planning.budget import MemoryBudget
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.planner import plan_problem
from rubberband_airflow.planning.problem import MARKETS, Problem
from rubberband_airflow.planning.start import LiveInstance, Start
from rubberband_airflow.planning.validation import Reader, gpu_count, kind, number


@dataclass(frozen=True)
class Observed:
    """What a run measured so far; None (or absent) where it has not measured a quantity yet."""

    epoch_seconds: dict[int, float]  # per profiled GPU count
    trial_overhead_seconds: float | None = None
    stage_overhead_seconds: float | None = None
    launch_seconds: dict[str, float] | None = None  # pending + boot, per instance type name


@dataclass(frozen=True)
class RunState:
    next_stage: int  # 1-based: stages before it are done
    start: Start
    observed: Observed


def _ratio(observed: Mapping[Any, float], profiled: Mapping[Any, float]) -> float:
    """Observed over profiled, summed over the observed keys; 1 where nothing profiled was observed."""
    total = sum(profiled[k] for k in observed)
    return sum(observed.values()) / total if total > 0 else 1.0


def corrected(problem: Problem, observed: Observed) -> Problem:
    """The problem with what the run observed: each observed quantity replaces its profiled value;
    an unobserved epoch time (per GPU count) or launch latency (per instance type) is the profile's
    scaled by the ratio of the observed to the profiled values of its kind (sums over the observed
    ones); an unobserved overhead keeps its profiled value."""
    w = problem.workload
    scale = _ratio(observed.epoch_seconds, w.epoch_seconds)
    epochs = {g: observed.epoch_seconds.get(g, s * scale) for g, s in w.epoch_seconds.items()}
    workload = replace(
        w, epoch_seconds=epochs,
        trial_overhead_seconds=(w.trial_overhead_seconds if observed.trial_overhead_seconds is None
                                else observed.trial_overhead_seconds),
        stage_overhead_seconds=(w.stage_overhead_seconds if observed.stage_overhead_seconds is None
                                else observed.stage_overhead_seconds))
    launch = observed.launch_seconds or {}
    profiled = {t.name: t.pending_seconds + t.boot_seconds for t in problem.instance_types}
    launch_scale = _ratio(launch, profiled)
    types = []
    for t in problem.instance_types:
        total = profiled[t.name]
        if t.name in launch and total == 0:  # nothing to scale: the observed latency counts as boot
            types.append(replace(t, boot_seconds=launch[t.name]))
            continue
        k = launch[t.name] / total if t.name in launch else launch_scale
        types.append(replace(t, pending_seconds=t.pending_seconds * k, boot_seconds=t.boot_seconds * k))
    return replace(problem, workload=workload, instance_types=tuple(types))


def remaining_problem(problem: Problem, state: RunState) -> Problem:
    """The problem of the stages from ``state.next_stage`` on, started from the run's state, with
    the workload corrected by its observations."""
    sha = replace(problem.sha, done=state.next_stage - 1)
    return replace(corrected(problem, state.observed), sha=sha, start=state.start)


def replan(problem: Problem, state: RunState, budget: MemoryBudget = MemoryBudget()) -> dict[str, Any]:
    """The cheapest plan of the remaining stages, as ``plan_problem`` returns it (its stages are
    the stages from ``next_stage`` on, its cost includes what was spent, its JCT counts from the
    run's start; of the baselines only the lower bound), plus ``first_stage``. Raises
    InfeasibleError like ``plan_problem``."""
    out = plan_problem(remaining_problem(problem, state), budget=budget, static_baselines=False)
    return {"first_stage": state.next_stage, **out}


def parse_state(data: Any, problem: Problem) -> RunState:
    """Build a RunState from its JSON form (section 7) for the problem; errors name the field."""
    r = Reader(data, "state")
    next_stage = r.integer("next_stage", minimum=1, maximum=problem.num_stages)
    elapsed = r.number("elapsed_seconds")
    spent = r.number("spent_usd", 0.0)
    raw_fleet = r.raw("fleet", [])
    if not isinstance(raw_fleet, list):
        raise ProblemError("state.fleet", f"must be a list, got {kind(raw_fleet)}")
    names = [t.name for t in problem.instance_types]
    live = []
    for k, raw in enumerate(raw_fleet):
        f = Reader(raw, f"state.fleet[{k}]")
        name = f.string("instance_type")
        if name not in names:
            raise ProblemError(f.name("instance_type"), f"{name!r} is not an instance type of the problem "
                               f"({', '.join(names)})")
        running = f.number("running_at_seconds")
        ready = f.number("ready_at_seconds")
        if ready < running:
            raise ProblemError(f.name("ready_at_seconds"), f"must not be before running_at_seconds "
                               f"({running:g}), got {ready:g}")
        f.done()
        live.append(LiveInstance(name, running, ready))
    observed = _parse_observed(r.raw("observed", {}), problem)
    buy = None
    if "buy_markets" in r.data:
        raw_buy = r.raw("buy_markets")
        if not isinstance(raw_buy, list) or not raw_buy or any(m not in MARKETS for m in raw_buy):
            raise ProblemError(r.name("buy_markets"), f"must be a non-empty list of 'spot' and 'on-demand', "
                               f"got {kind(raw_buy)}")
        buy = tuple(raw_buy)
        if not any(t.market in buy for t in problem.instance_types):
            raise ProblemError(r.name("buy_markets"), f"the problem offers no instance type in "
                               f"{' or '.join(buy)}: nothing could be bought")
    r.done()
    return RunState(next_stage, Start(elapsed, spent, tuple(live), buy), observed)


def _parse_observed(data: Any, problem: Problem) -> Observed:
    r = Reader(data, "state.observed")
    raw_epochs = r.raw("epoch_seconds", {})
    if not isinstance(raw_epochs, Mapping):
        raise ProblemError(r.name("epoch_seconds"), f"must be an object of GPU count to seconds, "
                           f"got {kind(raw_epochs)}")
    epochs: dict[int, float] = {}
    for key, seconds in raw_epochs.items():
        name = f"{r.name('epoch_seconds')}.{key}"
        g = gpu_count(key, name)
        if g not in problem.workload.epoch_seconds:
            raise ProblemError(name, f"GPU count {g} is not profiled in workload.epoch_seconds")
        epochs[g] = number(seconds, name, positive=True)
    trial = r.number("trial_overhead_seconds") if "trial_overhead_seconds" in r.data else None
    stage = r.number("stage_overhead_seconds") if "stage_overhead_seconds" in r.data else None
    raw_launch = r.raw("launch_seconds", {})
    if not isinstance(raw_launch, Mapping):
        raise ProblemError(r.name("launch_seconds"), f"must be an object of instance type to seconds, "
                           f"got {kind(raw_launch)}")
    names = {t.name for t in problem.instance_types}
    launch = {}
    for key, seconds in raw_launch.items():
        name = f"{r.name('launch_seconds')}.{key}"
        if key not in names:
            raise ProblemError(name, "not an instance type of the problem")
        launch[key] = number(seconds, name, positive=False)
    r.done()
    return Observed(epochs, trial, stage, launch)
