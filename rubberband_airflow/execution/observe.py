"""A run's state at a stage barrier, from its files: what a re-plan starts from (the state JSON of
docs/planning-model.md section 7). Times are seconds from the run's start (``run.json``'s ``started``).

- ``elapsed_seconds``: the end of the last stage run (its last trial's finish, done or failed, as the
  report measures it).
- ``spent_usd``: the instances already terminated (the ledger, billed by the problem's rule) and
  the checkpoints already restored (stages 2 to j-1).
- ``fleet``: the live instances of the plan's type, oldest request first; one still pending or
  booting is expected running and ready after the problem's latencies.
- ``observed``: per GPU count, the mean epoch time in the latest stage that ran trials on that many
  GPUs (the gaps between the ends of a trial's epochs in a stage, which its result records as
  ``epoch_ends``; a trial with one epoch in the stage counts from its worker's start; a trial resumed
  from a checkpoint counts only its own worker's epochs); the trial overhead (the time a finished
  trial held its slot, from its process's start or the end of the trial, finished or failed,
  before it on the same slot, to its result, less its epochs); the stage overhead (from a stage
  barrier to the first trial's start, less the launch latency of its instance when that instance
  was requested after the barrier, and less the time the stage's start waited to be tried again,
  ``runner.start_retry_wait``: a stage where that is unknown is not counted; stage 1's barrier is
  the run's start); the launch latency per
  offer (``offer_name``: request to first heartbeat).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from rubberband_airflow.execution import runner
from rubberband_airflow.execution.backends.base import billed_cost, offer_name
from rubberband_airflow.execution.results import is_done
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.problem import Problem


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class StageResults:
    """The results of a run's stages, by trial, each stage's read once (a re-plan looks at a
    stage's results several times; hundreds of trials are hundreds of reads each time)."""

    def __init__(self, storage: RunStorage,
                 known: Mapping[int, Mapping[str, dict[str, Any] | None]] | None = None) -> None:
        """``known``: the results of stages already read, by stage (None: a trial without one)."""
        self.storage = storage
        self._by_stage = {k: {t: r for t, r in v.items() if r is not None} for k, v in (known or {}).items()}

    def __call__(self, stage: int) -> dict[str, dict[str, Any]]:
        """The stage's finished (done) results."""
        return {t: r for t, r in self.every(stage).items() if is_done(r)}

    def every(self, stage: int) -> dict[str, dict[str, Any]]:
        """Every result of the stage, done or failed."""
        if stage not in self._by_stage:
            # A promoted stage's outcome holds its results (the newest try's); else each trial's is read.
            outcome = self.storage.read_json("stages", str(stage), "promoted.json") or {}
            if "results" in outcome:
                found = dict(outcome["results"])
            else:
                chosen = self.storage.read_json("stages", str(stage), "trials.json") or {}
                found = self.storage.read_results(stage, list(chosen.get("trials") or []))
            self._by_stage[stage] = {t: r for t, r in found.items() if r is not None}
        return self._by_stage[stage]

    def end(self, stage: int) -> float | None:
        """When a stage ended: its last trial's finish, done or failed (else its end record; None if
        it has not ended)."""
        ends = [r["finished"] for r in self.every(stage).values() if r.get("finished")]
        if ends:
            return float(max(ends))
        end = self.storage.read_json("stages", str(stage), "end.json")
        return None if end is None else float(end["time"])


def _trial_gpus(storage: RunStorage, stage: int) -> dict[str, int]:
    placement = (storage.read_json("stages", str(stage), "placement.json") or {}).get("placement") or {}
    return {t["trial"]: int(t["gpus"]) for tasks in placement.values() for t in tasks}


def _epoch_ends(metrics: list[dict[str, Any]], stage: int) -> list[float]:
    """When each of the stage's epochs ended, by epoch, from a trial's epoch records."""
    records = [m for m in metrics if m.get("stage") == stage and "time" in m]
    return [float(m["time"]) for m in sorted(records, key=lambda m: m["epoch"])]


def _epoch_times(ends: list[float], result: Mapping[str, Any]) -> tuple[list[float], int]:
    """The seconds of the epochs a trial's worker ran in the stage, from when they ended, and how
    many it ran (a trial with one epoch in the stage counts it from its worker's start). A trial
    resumed from a checkpoint (after a lost instance, or a clear) counts only its own worker's
    epochs, and its first from the one before (not across the loss, nor its restore)."""
    started = result.get("started")
    if started is not None:
        ends = [e for e in ends if e >= float(started)]  # the epochs before it ended on the worker before
    if len(ends) >= 2:
        return [b - a for a, b in zip(ends, ends[1:])], len(ends)
    if ends and started is not None and result.get("resumed_from_epoch") is None:
        return [ends[0] - float(started)], 1
    return [], len(ends)


def _slot_seconds(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """How long each trial held its slot: from its process's start, or from the end of the trial
    before it on the same slots (the agent's pause between two trials is part of a trial's time)."""
    by_slot: dict[tuple[str, str], list[tuple[float, float, str]]] = defaultdict(list)
    for trial, r in results.items():
        start = r.get("spawned", r.get("started"))
        if start is not None and r.get("finished") is not None:
            by_slot[(str(r.get("instance")), str(r.get("slots")))].append((float(start), float(r["finished"]), trial))
    out = {}
    for runs in by_slot.values():
        previous = None
        for start, end, trial in sorted(runs):
            out[trial] = end - (previous if previous is not None and previous <= start else start)
            previous = end
    return out


def _stage_epochs(storage: RunStorage, results: Mapping[str, Mapping[str, Any]], stage: int,
                  every: Mapping[str, Mapping[str, Any]]) -> tuple[dict[int, float], dict[str, tuple[int, float, int]]]:
    """Mean epoch seconds per GPU count in a stage, and per finished trial (gpus, slot seconds, epochs
    run), from its finished ``results`` (its slots' use from ``every`` result: a failed trial held
    its slot too). A result records when its epochs ended (``epoch_ends``); the epoch records of a
    trial whose result does not (a run written before results did) are read, all such trials together."""
    gpus = _trial_gpus(storage, stage)
    held = _slot_seconds(every)
    counted = [t for t in results if t in gpus and t in held]
    older = storage.metrics_many([t for t in counted if "epoch_ends" not in results[t]])
    per_g: dict[int, list[float]] = defaultdict(list)
    trials = {}
    for trial in counted:
        result = results[trial]
        ends = [float(x) for x in result["epoch_ends"]] if "epoch_ends" in result else _epoch_ends(older[trial], stage)
        epochs, count = _epoch_times(ends, result)
        per_g[gpus[trial]] += epochs
        trials[trial] = (gpus[trial], held[trial], count)
    return {g: sum(v) / len(v) for g, v in per_g.items() if v}, trials


def _stage_overhead(storage: RunStorage, stage: int, results: Mapping[str, Mapping[str, Any]], barrier: float,
                    ledger: Mapping[str, Mapping[str, Any]]) -> float | None:
    """From the barrier before a stage to its first trial's start, less its instance's launch
    latency when that instance was requested after the barrier, and less the time the stage's start
    waited to be tried again (None where that is unknown)."""
    starts = [float(s) for r in results.values() if (s := r.get("spawned", r.get("started"))) is not None]
    wait = runner.start_retry_wait(storage, stage, min(starts), barrier) if starts else 0.0
    if wait is None:
        return None
    began = barrier + wait  # about when the try that started the stage began: launches before it are not its
    out = []
    for result in results.values():
        start = result.get("spawned", result.get("started"))
        entry = ledger.get(str(result.get("instance")), {})
        if start is None:
            continue
        requested, ready = entry.get("requested"), entry.get("ready")
        launch = ready - requested if requested is not None and ready is not None and requested >= began else 0.0
        out.append(float(start) - barrier - wait - max(0.0, launch))
    return max(0.0, min(out)) if out else None


def observed(storage: RunStorage, next_stage: int, results: StageResults | None = None) -> dict[str, Any]:
    """What the stages before ``next_stage`` measured (section 7's ``observed``)."""
    results = StageResults(storage) if results is None else results
    run = storage.read_json("run.json") or {}
    ledger_list = storage.ledger()
    ledger = {e["instance"]: e for e in ledger_list}
    epochs: dict[int, float] = {}
    overheads: list[float] = []
    stage_overheads: list[float] = []
    barrier = run.get("started")
    for stage in range(1, next_stage):
        per_g, trials = _stage_epochs(storage, results(stage), stage, results.every(stage))
        epochs.update(per_g)  # the latest stage that ran on g GPUs wins
        for g, seconds, n in trials.values():
            if n and g in per_g:
                overheads.append(max(0.0, seconds - n * per_g[g]))
        if barrier is not None:
            h = _stage_overhead(storage, stage, results.every(stage), float(barrier), ledger)
            if h is not None:
                stage_overheads.append(h)
        barrier = results.end(stage)
    launches: dict[str, list[float]] = defaultdict(list)
    for e in ledger_list:
        if e.get("requested") is not None and e.get("ready") is not None:
            launches[offer_name(e)].append(max(0.0, float(e["ready"]) - float(e["requested"])))
    out: dict[str, Any] = {"epoch_seconds": {str(g): s for g, s in sorted(epochs.items())}}
    if (u := _mean(overheads)) is not None:
        out["trial_overhead_seconds"] = u
    if (h := _mean(stage_overheads)) is not None:
        out["stage_overhead_seconds"] = h
    out["launch_seconds"] = {t: sum(v) / len(v) for t, v in sorted(launches.items())}
    return out


def run_state(storage: RunStorage, problem: Problem, instance_type: str, next_stage: int,
              now: float | None = None) -> dict[str, Any]:
    """The state JSON of the run before ``next_stage`` (stages before it done), for ``problem``:
    the live fleet of the problem's offers, each instance as the offer it was bought in
    (``offer_name``; ``instance_type`` is the plan's, which the problem must have). The
    elapsed time is the last stage's end, or ``now`` less the stage overhead if that is later."""
    now = time.time() if now is None else now
    started = float((storage.read_json("run.json") or {})["started"])
    results = StageResults(storage)
    end = results.end(next_stage - 1)
    elapsed = (end if end is not None else now) - started
    ledger = storage.ledger()
    problem.instance_type(instance_type)  # the plan's, which the problem must have
    prices = {t.name: t.price_per_hour for t in problem.instance_types}
    done = [e for e in ledger if e.get("terminated") is not None]
    restores = sum(problem.sha.trials(i) for i in range(2, next_stage))
    spent = billed_cost(done, prices, problem.billing) \
        + problem.billing.data_price_per_gb * problem.workload.checkpoint_gb * restores
    fleet = []
    names = {t.name for t in problem.instance_types}
    for e in ledger:
        label = offer_name(e)
        if e.get("terminated") is not None or label not in names:
            continue
        itype = problem.instance_type(label)
        requested = float(e.get("requested") or now)
        running = float(e["running"]) if e.get("running") is not None \
            else max(now, requested + itype.pending_seconds)
        ready = float(e["ready"]) if e.get("ready") is not None else max(now, running + itype.boot_seconds)
        fleet.append({"instance_type": label, "running_at_seconds": max(0.0, running - started),
                      "ready_at_seconds": max(0.0, running - started, ready - started)})
    measured = observed(storage, next_stage, results)
    # Re-planned long after its barrier (a start that failed at night, cleared in the morning), the
    # stage starts now, not the stage overhead after the barrier: the barrier moves up to now - h.
    h = measured.get("stage_overhead_seconds", problem.workload.stage_overhead_seconds)
    elapsed = max(elapsed, now - started - h)
    return {"next_stage": next_stage, "elapsed_seconds": max(0.0, elapsed), "spent_usd": spent, "fleet": fleet,
            "observed": measured}
