"""Executing a plan stage by stage, as docs/planning-model.md section 4 says, on any backend.

This module is the one home of a stage's logic: which instances to launch or drop (LIFO),
where each trial runs and for how many epochs, what it is expected to take, and which trials
are promoted. The tuning DAG's tasks call these functions one by one (and may retry them);
``run_sha`` strings them together for use without Airflow. Every function takes the run's
storage, its backend and the plan it executes, parsed into the planning core's types.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rubberband_airflow.execution import recovery
from rubberband_airflow.execution.backends.base import ComputeBackend, Market
from rubberband_airflow.execution.recovery import hung_reason
from rubberband_airflow.execution.results import Mode, TrialState, best_trial, is_done, ranked, trial_id
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.plan import Plan, StageAllocation, parse_plan
from rubberband_airflow.planning.problem import SHA, InstanceType, Problem, parse_problem
from rubberband_airflow.planning.validation import describe

__all__ = ["RunSpec", "TrialTimeout", "RunPlan", "LaunchBatch", "StageOutcome", "StageFailed", "start_run",
           "stage_trials", "unfinished", "wanted_instances", "carry_over", "begin_stage", "note_start_try",
           "start_retry_wait", "reconcile", "hung_reason",
           "scale_targets", "stage_targets", "launch_batches", "scale_out", "scale_in", "recorded_launches", "scale",
           "start_stage",
           "prewarm_due", "prewarm", "place", "stage_placement", "assign_stage", "stage_results", "wait_stage",
           "recover_trials", "promote", "promote_stage", "report_failure", "cleared_since_failure", "rerun_due",
           "rerun_failed", "stop_instances", "run_sha", "summarize", "trial_id"]

log = logging.getLogger(__name__)

# A heartbeat this old (or a trial this far past its limit and not ended) means the agent is hung.
HUNG_SECONDS = recovery.HUNG_SECONDS
# What an idle agent allows beyond the longest stage it may wait through: the orchestrator's
# task scheduling and retries between stages.
IDLE_MARGIN_SECONDS = 600.0


@dataclass(frozen=True)
class TrialTimeout:
    """How long a trial may run in a stage: ``factor`` times the plan's expected time of a trial
    of that stage, and never less than ``floor_seconds`` (stage i trains eta^(i-1) times longer
    than stage 1, so one flat limit would kill a healthy final stage or miss a hang in the first)."""

    factor: float = 3.0
    floor_seconds: float = 600.0

    def limit(self, expected_seconds: float) -> float:
        return max(self.floor_seconds, self.factor * expected_seconds)


@dataclass(frozen=True)
class RunSpec:
    """What every trial of the run shares."""

    trainable: str  # "package.module:function"
    metric: str
    mode: Mode = Mode.MAX
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in tuple(Mode):
            raise ValueError(f"mode must be 'max' or 'min', got {self.mode!r}")
        object.__setattr__(self, "mode", Mode(self.mode))


@dataclass(frozen=True)
class RunPlan:
    """The plan a run executes with the problem it was made for: the JSON a planning task returns, parsed.

    ``markets`` is each stage's ``market`` in the plan JSON ("spot" or "on-demand"; None where a
    stage names none, and the backend's own, from the spec, applies)."""

    problem: Problem
    plan: Plan
    markets: tuple[Market | None, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunPlan:
        """Parse a plan as `plan_problem` returns it with its ``problem`` beside it (errors name the field)."""
        problem = parse_problem(data.get("problem"))
        plan = parse_plan(data, problem)
        return cls(problem, plan, _markets(data["stages"]))

    def to_json(self) -> dict[str, Any]:
        """The plan, its per-stage trials and epochs, and the problem: what ``from_json`` reads back."""
        out = {**self.plan.to_dict(self.problem), "problem": self.problem.to_dict(),
               "gpus_per_instance": self.instance_type.gpus}
        for entry, market in zip(out["stages"], self.markets):
            if market is not None:
                entry["market"] = str(market)
        return out

    def market(self, stage: int) -> Market | None:
        """Where the stage's new instances are bought, if the plan says (else the backend's default)."""
        self.allocation(stage)
        return self.markets[stage - 1] if stage <= len(self.markets) else None

    @property
    def sha(self) -> SHA:
        return self.problem.sha

    @property
    def stages(self) -> int:
        return len(self.plan.stages)

    @property
    def instance_type(self) -> InstanceType:
        return self.problem.instance_type(self.plan.instance_type)

    def has_stage(self, stage: int) -> bool:
        return 1 <= stage <= self.stages

    def allocation(self, stage: int) -> StageAllocation:
        """GPUs per trial and instances of a stage (1-based)."""
        if not self.has_stage(stage):
            raise ValueError(f"the plan has {self.stages} stages, not a stage {stage}")
        return self.plan.stages[stage - 1]

    def slots_per_instance(self, stage: int) -> int:
        return self.instance_type.gpus // self.allocation(stage).gpus_per_trial

    def trial_seconds(self, stage: int) -> float:
        """A trial's expected time in a stage: u + d_i * epoch_seconds[g_i] (section 4, step 4)."""
        w = self.problem.workload
        epoch = w.epoch_seconds[self.allocation(stage).gpus_per_trial]
        return w.trial_overhead_seconds + self.sha.new_epochs(stage) * epoch

    def trial_limit(self, stage: int, timeout: TrialTimeout) -> float:
        """Seconds a trial of the stage may run before it is failed as timed out."""
        return timeout.limit(self.trial_seconds(stage))

    def agent_idle_seconds(self, timeout: TrialTimeout) -> float:
        """How long an agent with nothing to run waits before it exits (its orchestrator is gone).

        An agent of a healthy run idles only while the stage it is in finishes elsewhere (at most
        every wave of the stage's trials running to its limit) and through the stage barrier (the
        orchestrator's overhead, the launch of new instances, a margin for scheduling and retries).
        """
        stages = range(1, self.stages + 1)
        longest = max((self._waves(i) * self.trial_limit(i, timeout) for i in stages), default=0.0)
        return longest + self.launch_seconds + self.problem.workload.stage_overhead_seconds + IDLE_MARGIN_SECONDS

    def _waves(self, stage: int) -> int:
        """Trials one slot runs one after another in the stage, at most."""
        slots = self.allocation(stage).instances * self.slots_per_instance(stage)
        return math.ceil(self.sha.trials(stage) / max(1, slots))

    @property
    def launch_seconds(self) -> float:
        """Expected time from a launch request until the instance takes trials (pending and boot)."""
        return self.instance_type.pending_seconds + self.instance_type.boot_seconds


def _markets(stages: list[Any]) -> tuple[Market | None, ...]:
    """Each plan stage's optional ``market`` (the stages are already checked to be objects); () when
    no stage names one."""
    out: list[Market | None] = []
    for i, entry in enumerate(stages):
        value = entry.get("market")
        if value is not None and value not in tuple(Market):
            raise ProblemError(f"plan.stages[{i}].market", f"must be 'spot' or 'on-demand', got {describe(value)}")
        out.append(None if value is None else Market(value))
    return tuple(out) if any(m is not None for m in out) else ()


@dataclass(frozen=True)
class LaunchBatch:
    """Instances one scaling task launches together (in ``market``; None: the backend's default);
    the name finds the batch again on a retry."""

    name: str
    count: int
    market: Market | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batch": self.name, "count": self.count}
        if self.market is not None:
            out["market"] = str(self.market)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LaunchBatch:
        market = data.get("market")
        return cls(str(data["batch"]), int(data["count"]), None if market is None else Market(market))


@dataclass(frozen=True)
class StageOutcome:
    """What a stage ended with: its trials, those promoted to the next stage, those that failed."""

    stage: int
    trials: list[str]
    promoted: list[str]
    failed: list[str]
    last: bool

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "promoted": self.promoted, "failed": self.failed}


class StageFailed(RuntimeError):
    """Every trial of a stage failed: there is nothing to promote."""


# --- starting a run ---------------------------------------------------------------------------


def start_run(storage: RunStorage, spec: RunSpec, configs: list[dict[str, Any]], plan: dict[str, Any],
              gpus_per_instance: int) -> list[str]:
    """Write the run's spec, plan and one config per trial; returns the trial ids (idempotent: a
    retry keeps the first attempt's start time, from which the run's JCT is measured)."""
    before = storage.read_json("run.json")
    started = before["started"] if before and "started" in before else time.time()
    storage.write_json({"trainable": spec.trainable, "metric": spec.metric, "mode": str(spec.mode),
                        "seed": spec.seed, "gpus_per_instance": gpus_per_instance, "started": started}, "run.json")
    storage.write_json(plan, "plan.json")
    trials = [trial_id(i) for i in range(len(configs))]
    for trial, config in zip(trials, configs):
        storage.write_config(trial, config)
    storage.write_json({"trials": trials}, "stages", "1", "trials.json")
    return trials


# What a carried result keeps of its attempt's timing, under "carried" (the new attempt's stages are timed anew).
_CARRIED_TIMING = ("started", "finished", "spawned", "instance", "slots")


def carry_over(earlier: RunStorage, storage: RunStorage, earlier_attempt: int) -> dict[str, Any]:
    """Keep what an earlier attempt of the run finished (its spec and plan are this one's): each
    trial's done results, stage by stage (the newest try's), with its checkpoint and metrics, so
    that the trial is not trained again; a failed trial (by its own fault or by loss) is not
    carried and runs again. A carried result says ``carried_from`` (the attempt whose instances
    trained it, and whose ledger paid for it) and keeps that attempt's timing under ``carried``.
    Writes and returns ``carried.json``."""
    stages: dict[str, list[str]] = {}
    for stage in sorted(int(s) for s in earlier.listdir("stages") if s.isdigit()):
        found = earlier.read_json("stages", str(stage), "trials.json")
        results = earlier.read_results(stage, list(found["trials"])) if found else {}
        for trial, result in results.items():
            if result is None or not is_done(result):
                continue
            kept = {k: v for k, v in result.items() if k not in _CARRIED_TIMING}
            timing = {k: result[k] for k in _CARRIED_TIMING if k in result}
            storage.write_result(trial, stage, {**kept, "carried_from": earlier_attempt, "carried": timing}, 1)
            stages.setdefault(str(stage), []).append(trial)
    for trial in sorted({t for trials in stages.values() for t in trials}):
        for name in earlier.listdir("trials", trial, "metrics"):
            data = earlier.read_bytes("trials", trial, "metrics", name)
            if data is not None and name.endswith(".json"):
                storage.write_bytes(data, "trials", trial, "metrics", name)
        state = earlier.read_bytes("trials", trial, "checkpoint.pt")
        if state is not None:
            storage.write_bytes(state, "trials", trial, "checkpoint.pt")
    record = {"from_attempt": earlier_attempt, "from": earlier.uri, "results": stages}
    storage.write_json(record, "carried.json")
    return record


def stage_trials(storage: RunStorage, stage: int) -> list[str]:
    data = storage.read_json("stages", str(stage), "trials.json")
    if data is None:
        raise RuntimeError(f"stage {stage} has no trials yet: the stage before it was not promoted")
    return list(data["trials"])


def note_start_try(storage: RunStorage, stage: int, try_number: int, first_of_clear: bool,
                   continued: int = 0) -> None:
    """Record, once per try, when a try of the stage's start began (``stages/<i>/start-tries/<try>.json``),
    whether it was the first try of its clear (Airflow's) and in which continuation of the run's
    attempt (``continued``: clears of failed tasks since the attempt began): the stage overhead a
    run measures leaves out the time its start waited to be tried again (``start_retry_wait``).
    A file per try, written once: two live tries (a zombie and its successor) keep both records,
    and the same try's body tried again in a storage burst keeps its first."""
    storage.create_json({"try": try_number, "time": time.time(), "first_of_clear": first_of_clear,
                         "continued": continued}, "stages", str(stage), "start-tries", f"{try_number}.json")


def start_tries(storage: RunStorage, stage: int) -> list[dict[str, Any]]:
    """Every recorded try of the stage's start, by when it began (with those of a run recorded
    before each try had a file of its own, in ``start-tries.json``)."""
    names = [n for n in storage.listdir("stages", str(stage), "start-tries") if n.endswith(".json")]
    tries = [t for t in storage.read_json_many([("stages", str(stage), "start-tries", n) for n in names])
             if isinstance(t, dict)]
    seen = {t.get("try") for t in tries}
    tries += [t for t in storage.read_json("stages", str(stage), "start-tries.json") or [] if t.get("try") not in seen]
    return sorted(tries, key=lambda t: float(t["time"]))


def start_retry_wait(storage: RunStorage, stage: int, first_trial: float, barrier: float) -> float | None:
    """Seconds the stage waited after its ``barrier`` for its start to be tried again (an Airflow
    retry, or a clear of a start that failed at night): from its first try's beginning (or the
    barrier, if later) to that of the try that placed its trials (the placement names it; else the
    latest try before ``first_trial``). 0 where the start ran once (or recorded no try: a run from
    before the record); None where the wait is unknown: a try before the earliest recorded one left
    no record (the earliest was not its clear's first, or was the first of a clear of a later
    continuation that was not the task's first try: its host was gone, or its storage failed)."""
    tries = start_tries(storage, stage)
    placing = (storage.read_json("stages", str(stage), "placement.json") or {}).get("start_try")
    before = [t for t in tries if float(t["time"]) <= first_trial] if placing is None else \
        tries[:1 + next((k for k, t in enumerate(tries) if t.get("try") == placing), len(tries) - 1)]
    if not before:
        return 0.0
    earliest = before[0]
    if not earliest.get("first_of_clear", True) or (earliest.get("continued", 0) > 0 and earliest.get("try", 1) > 1):
        return None
    return max(0.0, float(before[-1]["time"]) - max(float(earliest["time"]), barrier))


def begin_stage(storage: RunStorage, stage: int) -> None:
    """Record when the stage started: by the try that places its trials (a retried task keeps the
    time of the try that placed them; a try cleared in the morning, of a start that failed at night
    before placing them, starts the stage in the morning)."""
    if storage.read_json("stages", str(stage), "start.json") is None \
            or not storage.exists("stages", str(stage), "placement.json"):
        storage.write_json({"stage": stage, "time": time.time()}, "stages", str(stage), "start.json")


# --- scaling ----------------------------------------------------------------------------------


def reconcile(backend: ComputeBackend, hung_after: float = HUNG_SECONDS) -> list[str]:
    """The run's live instances, once those that are gone (the cloud says so), whose agent quit
    (its heartbeat says it stopped, e.g. idle) or whose agent is hung (see ``hung_reason``) are
    terminated and so recorded: they get no more trials, and a stage that needs instances
    launches replacements. Why a hung one was retired is in ``instances/<id>/retired.json``.
    Instances a lost launch reply or ledger write left out of the ledger are adopted first."""
    backend.adopt()
    live = backend.live()
    if not live:
        return []
    states = backend.describe(live)
    beats = backend.storage.read_json_many([("instances", i, "heartbeat.json") for i in live])
    written = backend.storage.modified("instances")  # by the store's clock: an instance's may be off
    gone = [i for i, beat in zip(live, beats)
            if states.get(i) == "terminated" or (beat or {}).get("state") == "stopping"]
    now = time.time()
    for instance, beat in zip(live, beats):
        stamp = written.get(f"{instance}/heartbeat.json")
        reason = None if instance in gone else hung_reason(beat, now, hung_after, stamp)
        if reason is not None:
            log.warning("retiring %s: %s", instance, reason)
            backend.storage.write_json({"instance": instance, "reason": reason, "time": now},
                                       "instances", instance, "retired.json")
            gone.append(instance)
    if gone:
        backend.terminate(gone)
    return [i for i in live if i not in gone]


def scale_targets(live: Sequence[str], want: int) -> tuple[int, list[str]]:
    """To go from ``live`` (oldest request first) to ``want`` instances: how many to launch, and
    which to terminate, most recently requested first (LIFO, section 4 step 2)."""
    return max(0, want - len(live)), list(live[want:])[::-1]


def launch_batches(stage: int, count: int, batch_size: int, continued: int = 0,
                   market: Market | None = None, first: int = 0) -> list[LaunchBatch]:
    """``count`` new instances of a stage in batches of at most ``batch_size``, in ``market``,
    numbered from ``first``. ``continued`` counts the clears after which this attempt went on (a
    clear of failed tasks only): their batches get new names, so that a batch the earlier
    teardown terminated is not found and adopted again."""
    suffix = f"-clear-{continued}" if continued else ""
    return [LaunchBatch(f"stage-{stage}-batch-{first + k}{suffix}", min(batch_size, count - start), market)
            for k, start in enumerate(range(0, count, batch_size))]


def unfinished(storage: RunStorage, stage: int) -> list[str]:
    """The trials of a stage with no result yet (all of them, unless results were carried over)."""
    trials = stage_trials(storage, stage)
    return [t for t, r in storage.read_results(stage, trials).items() if r is None]


def wanted_instances(storage: RunStorage, run_plan: RunPlan, stage: int, todo: list[str] | None = None) -> int:
    """The instances a stage runs on: the plan's, or none when every trial of the stage has its
    result already (carried over from an earlier attempt); ``todo``: its ``unfinished`` trials, if read."""
    planned = run_plan.allocation(stage).instances
    if todo is None and storage.read_json("stages", str(stage), "trials.json") is None:  # not promoted to yet
        return planned
    return planned if (unfinished(storage, stage) if todo is None else todo) else 0


def stage_targets(backend: ComputeBackend, run_plan: RunPlan, stage: int, live: Sequence[str],
                  want: int) -> tuple[int, list[str]]:
    """``scale_targets`` for a stage: where the plan has it release a market (section 4, step 2),
    the live instances bought in that market are terminated first and the stage counts without them;
    never the stage's own (launched for it, pre-warmed or recovered: a retried start, whose spot
    batch fell back to on demand, must not release what it launched)."""
    release = run_plan.allocation(stage).release
    released = []
    if release is not None and want:
        entries = {e["instance"]: e for e in backend.storage.ledger()}
        own = f"stage-{stage}-"
        released = [i for i in live if i in entries and entries[i].get("market") == release
                    and not str(entries[i].get("batch", "")).startswith(own)]
    missing, surplus = scale_targets([i for i in live if i not in released], want)
    return missing, released[::-1] + surplus


def scale_out(backend: ComputeBackend, run_plan: RunPlan, stage: int, batch_size: int,
              continued: int = 0) -> list[LaunchBatch]:
    """The batches of instances a stage adds to the live fleet (none when it adds none), in the
    market the plan gives the stage."""
    want = wanted_instances(backend.storage, run_plan, stage)
    missing, _ = stage_targets(backend, run_plan, stage, reconcile(backend), want)
    return launch_batches(stage, missing, batch_size, continued, run_plan.market(stage))


def scale_in(backend: ComputeBackend, run_plan: RunPlan, stage: int, batch_size: int) -> list[list[str]]:
    """The batches of instances a stage drops: those of a market it releases, then the most
    recently requested first."""
    want = wanted_instances(backend.storage, run_plan, stage)
    _, surplus = stage_targets(backend, run_plan, stage, reconcile(backend), want)
    return [surplus[k:k + batch_size] for k in range(0, len(surplus), batch_size)]


def _launches(stage: int, continued: int, n: int) -> tuple[str, ...]:
    return "stages", str(stage), f"launches-{n}{f'-clear-{continued}' if continued else ''}.json"


def recorded_launches(storage: RunStorage, stage: int, continued: int = 0) -> list[list[LaunchBatch]]:
    """The launch decisions a stage's tries recorded, in order (``stages/<i>/launches-<n>.json``)."""
    out: list[list[LaunchBatch]] = []
    while (found := storage.read_json(*_launches(stage, continued, len(out) + 1))) is not None:
        out.append([LaunchBatch.from_json(b) for b in found])
    return out


def scale(backend: ComputeBackend, run_plan: RunPlan, stage: int, batch_size: int = 8,
          continued: int = 0, todo: list[str] | None = None) -> dict[str, list[str]]:
    """Grow or shrink the fleet for a stage in one go: terminate the newest first (those of a market
    the stage releases before them), or launch the missing in batches. Each launch is decided once
    and recorded before any of its batches is launched: a retry (of a try that failed mid-launch)
    launches the recorded batches again, each found by its name and launched only where missing,
    and then launches what the stage still lacks (an instance lost between the tries) under new
    names, recorded likewise."""
    storage = backend.storage
    want = wanted_instances(storage, run_plan, stage, todo)
    missing, terminated = stage_targets(backend, run_plan, stage, reconcile(backend), want)
    if terminated:
        backend.terminate(terminated)
    launched: list[str] = []
    decisions = recorded_launches(storage, stage, continued) if want else []
    for batch in (b for decision in decisions for b in decision):
        launched += backend.launch(batch.name, batch.count, batch.market)
    if decisions:
        missing, _ = scale_targets(backend.live(), want)
    if missing:
        batches = launch_batches(stage, missing, batch_size, continued, run_plan.market(stage),
                                 first=sum(len(d) for d in decisions))
        if not storage.create_json([b.to_json() for b in batches], *_launches(stage, continued, len(decisions) + 1)):
            batches = recorded_launches(storage, stage, continued)[len(decisions)]  # a concurrent try's stands
        for batch in batches:
            launched += backend.launch(batch.name, batch.count, batch.market)
    return {"launched": launched, "terminated": terminated, "live": backend.live()}


def start_stage(storage: RunStorage, backend: ComputeBackend, run_plan: RunPlan, stage: int,
                timeout: TrialTimeout = TrialTimeout(), clear: int = 0, batch_size: int = 8,
                continued: int = 0, start_try: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Start a stage: record its start, grow or shrink the fleet to the plan's, and place its
    trials (``stage_placement``, whose placement it returns; ``start_try``: the Airflow try of the
    stage's start, which the placement names). The stage's results are read once for both
    (hundreds of trials are hundreds of reads)."""
    begin_stage(storage, stage)
    todo = unfinished(storage, stage)
    scaled = scale(backend, run_plan, stage, batch_size, continued, todo)
    log.info("stage %d: launched %s, terminated %s", stage, scaled["launched"], scaled["terminated"])
    return stage_placement(storage, backend, run_plan, stage, timeout, clear, todo, start_try)


def prewarm_due(storage: RunStorage, run_plan: RunPlan, stage: int) -> float | None:
    """When the instances the next stage adds are to be requested during this stage (Unix time:
    the stage's start plus the next stage's ``launch_after_seconds``), or None: the plan does not
    pre-warm the next stage, or the next stage adds no instance (section 4, step 2)."""
    if not run_plan.has_stage(stage + 1):
        return None
    lead = run_plan.allocation(stage + 1).launch_after
    if lead is None or run_plan.allocation(stage + 1).instances <= run_plan.allocation(stage).instances:
        return None
    start = storage.read_json("stages", str(stage), "start.json")
    return None if start is None else float(start["time"]) + lead


def prewarm(storage: RunStorage, backend: ComputeBackend, run_plan: RunPlan, stage: int, batch_size: int = 8,
            continued: int = 0, poll: float = 1.0) -> list[str]:
    """Pre-warm the next stage: once ``prewarm_due``, request the instances it adds (c_(i+1) - c_i),
    unless every trial of this stage has a result by then (the barrier came first); returns those
    launched. They are live when the next stage scales (it launches only what is still missing),
    and a retry finds their batches (``stage-<i+1>-batch-<k>-prewarm``) and launches nothing again.
    Without a due time it returns at once, launching nothing."""
    due = prewarm_due(storage, run_plan, stage)
    if due is None:
        return []
    trials = stage_trials(storage, stage)

    def ended() -> bool:
        return all(r is not None for r in stage_results(storage, stage, trials).values())

    while time.time() < due:
        if ended():
            return []
        time.sleep(max(0.0, min(poll, due - time.time())))
    if ended():
        return []
    count = run_plan.allocation(stage + 1).instances - run_plan.allocation(stage).instances
    launched: list[str] = []
    for batch in launch_batches(stage + 1, count, batch_size, continued, run_plan.market(stage + 1)):
        launched += backend.launch(f"{batch.name}-prewarm", batch.count, batch.market)
    log.info("pre-warmed stage %d: %s", stage + 1, launched)
    return launched


# --- placement --------------------------------------------------------------------------------


def place(trials: list[str], instances: list[str], ready_in: dict[str, float], slots_per_instance: int,
          gpus: int, duration: float, start_epoch: int, stop_epoch: int) -> dict[str, list[dict[str, Any]]]:
    """Assign trials in index order to the slot expected free earliest (older instance first on ties).

    ``ready_in`` is each instance's expected seconds until ready (0 if ready); ``duration`` a
    trial's expected seconds. Each instance runs its list in order on its slots.
    """
    heap = [(ready_in.get(inst, 0.0), age, slot) for age, inst in enumerate(instances)
            for slot in range(slots_per_instance)]
    heapq.heapify(heap)
    out: dict[str, list[dict[str, Any]]] = {inst: [] for inst in instances}
    for trial in trials:
        free, age, slot = heapq.heappop(heap)
        out[instances[age]].append({"trial": trial, "gpus": gpus, "start_epoch": start_epoch,
                                    "stop_epoch": stop_epoch})
        heapq.heappush(heap, (free + duration, age, slot))
    return out


def stage_placement(storage: RunStorage, backend: ComputeBackend, run_plan: RunPlan, stage: int,
                    timeout: TrialTimeout = TrialTimeout(), clear: int = 0,
                    todo: list[str] | None = None, start_try: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Place the stage's trials on the live fleet's slots as the plan expects them to run, each
    with its time limit, and write the assignments the agents read. An instance whose agent has
    not reported yet is expected ready after the plan's pending and boot latency. The placement
    is written once: a retried (or concurrent) place returns the one written first, so a trial
    is never placed on two instances. ``clear`` is Airflow's clear number of the run then, kept
    with it, and ``start_try`` the try of the stage's start that placed them; ``todo``: the stage's
    ``unfinished`` trials, where already read."""
    placement = _written_placement(storage, stage)
    if placement is None:
        placement = _new_placement(storage, backend, run_plan, stage, timeout, todo)
        if not storage.create_json({"stage": stage, "placement": placement, "clear": clear, "start_try": start_try},
                                   "stages", str(stage), "placement.json"):
            placement = _written_placement(storage, stage)
            assert placement is not None
    for instance, tasks in placement.items():  # a first attempt may have stopped before writing them all
        if not storage.exists("stages", str(stage), f"{instance}.json"):
            storage.create_json({"stage": stage, "tasks": tasks}, "stages", str(stage), f"{instance}.json")
    return placement


def placed_trials(placement: dict[str, list[dict[str, Any]]], trials: list[str] | None = None) -> list[str]:
    """The trials of a stage in the order ``place`` returns them, the map index of a trial's wait:
    those of its placement (its instances sorted), then those of ``trials`` it left out (their
    results carried over from an earlier attempt)."""
    placed = [t["trial"] for instance in sorted(placement) for t in placement[instance]]
    return placed + [t for t in trials or [] if t not in set(placed)]


def _written_placement(storage: RunStorage, stage: int) -> dict[str, list[dict[str, Any]]] | None:
    data = storage.read_json("stages", str(stage), "placement.json")
    return None if data is None else dict(data["placement"])


def _new_placement(storage: RunStorage, backend: ComputeBackend, run_plan: RunPlan, stage: int,
                   timeout: TrialTimeout, todo: list[str] | None) -> dict[str, list[dict[str, Any]]]:
    # A result carried over from an earlier attempt is not run again.
    trials = unfinished(storage, stage) if todo is None else todo
    live = backend.live()
    if trials and not live:
        raise RuntimeError(f"stage {stage} has {len(trials)} trials and no live instance to run them")
    beats = storage.read_json_many([("instances", i, "heartbeat.json") for i in live])
    ready_in = {i: 0.0 if beat else run_plan.launch_seconds for i, beat in zip(live, beats)}
    placement = place(trials, live, ready_in, run_plan.slots_per_instance(stage),
                      run_plan.allocation(stage).gpus_per_trial, run_plan.trial_seconds(stage),
                      run_plan.sha.epochs(stage - 1), run_plan.sha.epochs(stage))
    limit = run_plan.trial_limit(stage, timeout)
    return {i: [{**t, "limit_seconds": limit} for t in tasks] for i, tasks in placement.items()}


def assign_stage(storage: RunStorage, stage: int, placement: dict[str, list[dict[str, Any]]]) -> None:
    for instance, tasks in placement.items():
        storage.write_assignment(stage, instance, tasks)


# --- results and promotion --------------------------------------------------------------------


def stage_results(storage: RunStorage, stage: int, trials: list[str]) -> dict[str, dict[str, Any] | None]:
    """Each trial's result in the stage: that of its newest try (None: none yet)."""
    return storage.read_results(stage, trials)


def _fail(storage: RunStorage, trial: str, stage: int, reason: str) -> dict[str, Any]:
    """Record the trial as failed, unless a result was recorded first (which then stands)."""
    result = {"state": str(TrialState.FAILED), "stage": stage, "error": reason}
    if storage.write_result(trial, stage, result):
        return result
    return storage.read_result(trial, stage) or result


def wait_stage(storage: RunStorage, backend: ComputeBackend, stage: int, trials: list[str], timeout: float,
               poll: float = 0.5, run_plan: RunPlan | None = None, liveness_interval: float = 2.0,
               silent_seconds: float = recovery.SILENT_SECONDS) -> dict[str, dict[str, Any]]:
    """Wait until every trial of the stage has a result. Given the plan, the trials of an instance
    found lost are placed again and resume (``recover_trials``); without it, trials are failed
    when every instance of the run is gone. Trials still without a result at the timeout are
    recorded as failed (nothing is silently dropped)."""
    deadline = time.monotonic() + timeout
    watch = recovery.LossWatch(storage, backend, stage, silent_seconds, recovery.BOOT_SECONDS)
    checked = float("-inf")
    while True:
        results = stage_results(storage, stage, trials)
        missing = [t for t, r in results.items() if r is None]
        if not missing:
            return {t: r for t, r in results.items() if r is not None}
        reason = None
        if time.monotonic() > deadline:
            reason = f"no result within {timeout:g} s"
        elif run_plan is not None:
            if time.monotonic() - checked >= liveness_interval:
                checked = time.monotonic()
                for lost, why in watch.lost(missing).items():
                    recover_trials(storage, backend, run_plan, stage, lost, why)
        else:
            live = backend.live()
            states = backend.describe(live) if live else {}
            if live and all(s == "terminated" for s in states.values()):
                reason = "every instance of the run is gone"
        if reason is not None:
            failed = {t: _fail(storage, t, stage, reason) for t in missing}
            return {t: r if r is not None else failed[t] for t, r in results.items()}
        time.sleep(poll)


def recover_trials(storage: RunStorage, backend: ComputeBackend, run_plan: RunPlan, stage: int, lost: str,
                   reason: str) -> dict[str, Any]:
    """Place the unfinished trials of an instance lost in a stage again (idle slots of the live
    fleet, else a replacement batch), to resume from their last checkpoint; idempotent and safe
    to call from several tasks at once. Returns the loss's record (see ``recovery``)."""
    return recovery.recover_trials(storage, backend, run_plan, stage, lost, reason)


def promote(storage: RunStorage, stage: int, results: Mapping[str, Mapping[str, Any] | None], keep: int,
            mode: Mode | str) -> list[str]:
    """Write and return the ``keep`` best trials that finished (failed trials are never promoted)."""
    chosen = ranked(results, mode)[:keep]
    storage.write_json({"trials": chosen, "from_stage": stage}, "stages", str(stage + 1), "trials.json")
    return chosen


def promote_stage(storage: RunStorage, backend: ComputeBackend, run_plan: RunPlan, stage: int,
                  mode: Mode | str) -> StageOutcome:
    """End a stage: a trial without a result is recorded as failed (never dropped); the best
    ``n_(i+1)`` that finished are promoted; after the last stage the fleet is released at once,
    as the plan assumes. Raises StageFailed when no trial of the stage finished.

    Once per stage (``recovery.once`` on its outcome, ``promoted.json``): the next stage's start
    and the stage's own promote task both end it, and whichever comes second reads what the first wrote."""
    record = recovery.once(storage, ("stages", str(stage), "promoted.json"),
                           functools.partial(_promote_stage, storage, backend, run_plan, stage, mode),
                           f"the promotion of stage {stage}")
    trials = list(record.get("results") or stage_trials(storage, stage))
    return StageOutcome(stage, trials, list(record["promoted"]), list(record["failed"]), stage == run_plan.stages)


def _promote_stage(storage: RunStorage, backend: ComputeBackend, run_plan: RunPlan, stage: int,
                   mode: Mode | str) -> dict[str, Any]:
    """The claimed promotion: record missing results as failed, promote, write the stage's outcome."""
    trials = stage_trials(storage, stage)
    results = stage_results(storage, stage, trials)
    for t, r in results.items():
        if r is None:
            results[t] = _fail(storage, t, stage, "no result was recorded")
    if storage.read_json("stages", str(stage), "end.json") is None:
        storage.write_json({"stage": stage, "time": time.time()}, "stages", str(stage), "end.json")
    failed = sorted(t for t, r in results.items() if not is_done(r))
    if len(failed) == len(trials):
        raise StageFailed(f"every trial of stage {stage} failed: {failed}")
    last = stage == run_plan.stages
    if last:
        stop_instances(storage, backend)
        promoted: list[str] = []
    else:
        promoted = promote(storage, stage, results, run_plan.sha.trials(stage + 1), mode)
    # With every result of the stage, which the next re-plan reads in one request, not one per trial.
    record = {**StageOutcome(stage, trials, promoted, failed, last).to_json(),
              "results": {t: results[t] for t in trials}}
    storage.write_json(record, "stages", str(stage), "promoted.json")
    return record


# --- a failed trial run again (a clear of the failed tasks) -----------------------------------


def report_failure(storage: RunStorage, trial: str, stage: int, task_try: int) -> None:
    """Record that the trial's wait, in its task's try ``task_try``, failed with the failure of the
    trial's newest try of the stage (``stages/<i>/reported/<trial>.json``)."""
    storage.write_json({"trial_try": storage.current_try(trial, stage), "task_try": task_try, "time": time.time()},
                       "stages", str(stage), "reported", f"{trial}.json")


def cleared_since_failure(storage: RunStorage, trial: str, stage: int, task_try: int) -> bool:
    """Whether the trial's newest try of the stage failed and its wait, now in its task's try
    ``task_try``, reported that failure in an earlier try: the wait was cleared since. (Airflow's
    clear number of the run grows with a clear of any of its tasks, so it cannot tell.)"""
    result = storage.read_result(trial, stage)
    if result is None or is_done(result):
        return False
    reported = storage.read_json("stages", str(stage), "reported", f"{trial}.json")
    return (reported is not None and int(reported["trial_try"]) == storage.current_try(trial, stage)
            and int(reported["task_try"]) < task_try)


def rerun_due(storage: RunStorage, trial: str, stage: int, task_try: int) -> bool:
    """Whether a trial's failure is to be run again: ``cleared_since_failure``, and the stage is
    not promoted yet (once it is, a trial run again could not take part: the run's later stages
    went on without it)."""
    return (cleared_since_failure(storage, trial, stage, task_try)
            and not storage.exists("stages", str(stage), "promoted.json"))


def rerun_failed(storage: RunStorage, backend: ComputeBackend, run_plan: RunPlan, stage: int,
                 clear: int, only: Collection[str] | None = None) -> dict[str, Any]:
    """Run the failed trials of a stage again (those of ``only``, the trials whose waits the clear
    reset, where known), once for the clear numbered ``clear`` however many tasks ask: a new try
    of each (its result ``stage-<i>.try-<k>.json``, written once as the first's), placed on the
    live fleet, or on a batch of its own (``stage-<i>-retry-<k>``) when the run has none (its
    teardown ran); each resumes from its last checkpoint. Returns the try's record
    (``stages/<i>/retries/<k>.json``)."""
    while True:
        records = storage.retries(stage)
        mine = [r for r in records if int(r["clear"]) == clear]
        if mine:
            return mine[0]
        k = max((int(r["try"]) for r in records), default=1) + 1
        record = recovery.once(storage, ("stages", str(stage), "retries", f"{k}.json"),
                               functools.partial(_rerun, storage, backend, run_plan, stage, clear, k, only),
                               f"try {k} of stage {stage}")
        if int(record["clear"]) == clear:
            return record


def _rerun(storage: RunStorage, backend: ComputeBackend, run_plan: RunPlan, stage: int, clear: int,
           k: int, only: Collection[str] | None) -> dict[str, Any]:
    """The claimed retry: place the stage's failed trials (of ``only``, where given; launching
    instances if none is live), write the record."""
    trials = stage_trials(storage, stage)
    results = stage_results(storage, stage, trials)
    failed = [t for t in trials if results[t] is not None and not is_done(results[t]) and (only is None or t in only)]
    where = recovery.trial_instances(storage, stage)
    live = reconcile(backend)
    launched = None
    if failed and not live:
        slots = run_plan.slots_per_instance(stage)
        count = min(run_plan.allocation(stage).instances, math.ceil(len(failed) / max(1, slots)))
        batch = f"stage-{stage}-retry-{k}"
        live = backend.launch(batch, count, run_plan.market(stage))
        launched = {"batch": batch, "instances": live}
    beats = storage.read_json_many([("instances", i, "heartbeat.json") for i in live])
    ready_in = {i: 0.0 if beat else run_plan.launch_seconds for i, beat in zip(live, beats)}
    placed = place(failed, live, ready_in, run_plan.slots_per_instance(stage),
                   run_plan.allocation(stage).gpus_per_trial, run_plan.trial_seconds(stage),
                   run_plan.sha.epochs(stage - 1), run_plan.sha.epochs(stage)) if failed else {}
    limits = {t: where[t][1].get("limit_seconds") for t in failed if t in where}
    placement = {i: [{**task, "try": k, **({"limit_seconds": limits[task["trial"]]}
                                           if limits.get(task["trial"]) else {})} for task in tasks]
                 for i, tasks in placed.items() if tasks}
    record = {"stage": stage, "try": k, "clear": clear, "time": time.time(), "trials": failed,
              "placement": placement, "launched": launched,
              "failed_before": {t: (results[t] or {}).get("error") for t in failed}}
    storage.write_json(record, "stages", str(stage), "retries", f"{k}.json")
    log.warning("try %d of stage %d after clear %d: %s", k, stage, clear,
                ", ".join(f"{t} -> {i}" for i, tasks in placement.items() for t in (x["trial"] for x in tasks)))
    return record


def stop_instances(storage: RunStorage, backend: ComputeBackend) -> list[str]:
    """Teardown: terminate every instance the run still has, then ask their agents to stop (a
    storage error writing the stop files leaves them terminated all the same)."""
    ids = backend.terminate_all()
    for instance in ids:
        try:
            storage.write_bytes(b"", "instances", instance, "stop")
        except OSError as e:
            log.warning("could not write the stop file of %s (it is terminated): %s", instance, e)
    return ids


# --- without Airflow --------------------------------------------------------------------------


def run_sha(storage: RunStorage, backend: ComputeBackend, spec: RunSpec, configs: list[dict[str, Any]],
            plan: dict[str, Any], stage_timeout: float = 3600.0, batch_size: int = 8,
            trial_timeout: TrialTimeout = TrialTimeout()) -> dict[str, Any]:
    """Run successive halving under ``plan`` (a plan with its ``problem``, as `plan_problem` and
    the planning task return it) from start to teardown, with the same stage functions the DAG's
    tasks call; returns a summary. Instances are always terminated at the end, however the run ends."""
    run_plan = RunPlan.from_json(plan)
    if len(configs) != run_plan.sha.num_trials:
        raise ValueError(f"the plan is for {run_plan.sha.num_trials} trials, got {len(configs)} configurations")
    started = time.time()
    start_run(storage, spec, configs, plan, run_plan.instance_type.gpus)
    stages_out = []
    try:
        for stage in range(1, run_plan.stages + 1):
            placement = start_stage(storage, backend, run_plan, stage, trial_timeout, batch_size=batch_size)
            wait_stage(storage, backend, stage, [t["trial"] for tasks in placement.values() for t in tasks],
                       stage_timeout, run_plan=run_plan)
            outcome = promote_stage(storage, backend, run_plan, stage, spec.mode)
            stages_out.append({"stage": stage, "trials": outcome.trials, "promoted": outcome.promoted,
                               "failed": outcome.failed, "ended": time.time()})
    finally:
        stop_instances(storage, backend)
    return summarize(storage, spec, stages_out, started)


def summarize(storage: RunStorage, spec: RunSpec, stages: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """Best trial, per-stage outcome and the ledger of the run."""
    best = None
    final = stages[-1] if stages else None
    if final:
        results = stage_results(storage, final["stage"], final["trials"])
        trial = best_trial(results, spec.mode)
        if trial is not None:
            best = {"trial": trial, "metric": results[trial]["metric"],  # type: ignore[index]
                    "config": storage.read_config(trial)}
    return {"best": best, "stages": stages, "ledger": storage.ledger(), "started": started, "ended": time.time()}
