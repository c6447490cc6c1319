"""Executing a plan stage by stage, as docs/planning-model.md section 4 says, on any backend.

Each step is a function of the run's storage and the backend, so the Airflow tasks can call
them one by one (and retry them): start the run, scale for a stage (LIFO scale-in), place the
stage's trials on slots, wait for their results, promote the best, tear down, summarise.
``run_sha`` strings them together for use without Airflow.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Any

from rubberband_airflow.execution.backends.base import ComputeBackend
from rubberband_airflow.execution.storage import RunStorage


@dataclass(frozen=True)
class RunSpec:
    """What every trial of the run shares."""

    trainable: str  # "package.module:function"
    metric: str
    mode: str = "max"  # "max" or "min"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {self.mode!r}")


def trial_id(index: int) -> str:
    return f"trial-{index:04d}"


def start_run(storage: RunStorage, spec: RunSpec, configs: list[dict[str, Any]], plan: dict[str, Any],
              gpus_per_instance: int) -> list[str]:
    """Write the run's spec, plan and one config per trial; returns the trial ids (idempotent: a
    retry keeps the first attempt's start time, from which the run's JCT is measured)."""
    before = storage.read_json("run.json")
    started = before["started"] if before and "started" in before else time.time()
    storage.write_json({"trainable": spec.trainable, "metric": spec.metric, "mode": spec.mode, "seed": spec.seed,
                        "gpus_per_instance": gpus_per_instance, "started": started}, "run.json")
    storage.write_json(plan, "plan.json")
    trials = [trial_id(i) for i in range(len(configs))]
    for trial, config in zip(trials, configs):
        storage.write_config(trial, config)
    storage.write_json({"trials": trials}, "stages", "1", "trials.json")
    return trials


def stage_trials(storage: RunStorage, stage: int) -> list[str]:
    data = storage.read_json("stages", str(stage), "trials.json")
    if data is None:
        raise RuntimeError(f"stage {stage} has no trials yet: the stage before it was not promoted")
    return data["trials"]


def reconcile(backend: ComputeBackend) -> list[str]:
    """The run's live instances, once those that are gone (the cloud says so) or whose agent quit
    (its heartbeat says it stopped, e.g. idle) are terminated and so recorded: they get no more
    trials, and a stage that needs instances launches replacements."""
    live = backend.live()
    if not live:
        return []
    states = backend.describe(live)
    beats = backend.storage.read_json_many([("instances", i, "heartbeat.json") for i in live])
    gone = [i for i, beat in zip(live, beats)
            if states.get(i) == "terminated" or (beat or {}).get("state") == "stopping"]
    if gone:
        backend.terminate(gone)
    return [i for i in live if i not in gone]


def scale(backend: ComputeBackend, stage: int, instances: int) -> dict[str, list[str]]:
    """Grow or shrink the run's fleet to ``instances``: terminate the newest first, or launch the missing."""
    live = reconcile(backend)
    out: dict[str, list[str]] = {"launched": [], "terminated": [], "live": live}
    if len(live) > instances:
        surplus = live[instances:][::-1]  # most recently requested first
        backend.terminate(surplus)
        out["terminated"] = surplus
    elif len(live) < instances:
        out["launched"] = backend.launch(f"stage-{stage}", instances - len(live))
    out["live"] = backend.live()
    return out


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


def assign_stage(storage: RunStorage, stage: int, placement: dict[str, list[dict[str, Any]]]) -> None:
    for instance, tasks in placement.items():
        storage.write_assignment(stage, instance, tasks)


def stage_results(storage: RunStorage, stage: int, trials: list[str]) -> dict[str, dict[str, Any] | None]:
    return dict(zip(trials, storage.read_json_many([("trials", t, f"stage-{stage}.json") for t in trials])))


def wait_stage(storage: RunStorage, backend: ComputeBackend, stage: int, trials: list[str], timeout: float,
               poll: float = 0.5) -> dict[str, dict[str, Any]]:
    """Wait until every trial of the stage has a result; trials whose instance died, or that are
    still without a result at the timeout, are recorded as failed (nothing is silently dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        results = stage_results(storage, stage, trials)
        missing = [t for t, r in results.items() if r is None]
        if not missing:
            return results  # type: ignore[return-value]
        if time.monotonic() > deadline:
            for t in missing:
                results[t] = {"state": "failed", "stage": stage, "error": f"no result within {timeout:g} s"}
                storage.write_result(t, stage, results[t])
            return results  # type: ignore[return-value]
        live = set(backend.live())
        states = backend.describe(sorted(live)) if live else {}
        if live and all(s == "terminated" for s in states.values()):
            for t in missing:
                results[t] = {"state": "failed", "stage": stage, "error": "every instance of the run is gone"}
                storage.write_result(t, stage, results[t])
            return results  # type: ignore[return-value]
        time.sleep(poll)


def promote(storage: RunStorage, stage: int, results: dict[str, dict[str, Any]], keep: int, mode: str) -> list[str]:
    """Write and return the ``keep`` best trials that finished (failed trials are never promoted)."""
    done = [(r["metric"], t) for t, r in results.items() if r and r.get("state") == "done"
            and isinstance(r.get("metric"), (int, float)) and math.isfinite(r["metric"])]
    done.sort(key=lambda x: (-x[0] if mode == "max" else x[0], x[1]))
    chosen = [t for _, t in done[:keep]]
    storage.write_json({"trials": chosen, "from_stage": stage}, "stages", str(stage + 1), "trials.json")
    return chosen


def stop_instances(storage: RunStorage, backend: ComputeBackend) -> list[str]:
    """Teardown: ask every agent to stop and terminate every instance the run still has."""
    for instance in backend.live():
        storage.write_bytes(b"", "instances", instance, "stop")
    return backend.terminate_all()


def run_sha(storage: RunStorage, backend: ComputeBackend, spec: RunSpec, configs: list[dict[str, Any]],
            plan: dict[str, Any], gpus_per_instance: int, eta: int, min_epochs: int,
            expected_epoch_seconds: dict[int, float] | None = None, boot_seconds: float = 0.0,
            stage_timeout: float = 3600.0) -> dict[str, Any]:
    """Run successive halving under ``plan`` from start to teardown; returns a summary.

    Instances are always terminated at the end, however the run ends.
    """
    started = time.time()
    trials = start_run(storage, spec, configs, plan, gpus_per_instance)
    stages_out = []
    try:
        for i, alloc in enumerate(plan["stages"], start=1):
            g, c = int(alloc["gpus_per_trial"]), int(alloc["instances"])
            trials = stage_trials(storage, i)
            scaled = scale(backend, i, c)
            r_prev, r_now = min_epochs * eta ** (i - 2) if i > 1 else 0, min_epochs * eta ** (i - 1)
            per_epoch = (expected_epoch_seconds or {}).get(g, 1.0)
            ready = {inst: (boot_seconds if inst in scaled["launched"] else 0.0) for inst in scaled["live"]}
            placement = place(trials, scaled["live"], ready, gpus_per_instance // g, g,
                              per_epoch * (r_now - r_prev), r_prev, r_now)
            assign_stage(storage, i, placement)
            results = wait_stage(storage, backend, i, trials, stage_timeout)
            last = i == len(plan["stages"])
            keep = max(1, len(configs) // eta ** i)
            promoted = [] if last else promote(storage, i, results, keep, spec.mode)
            stages_out.append({"stage": i, "trials": trials, "promoted": promoted,
                               "failed": [t for t, r in results.items() if r["state"] != "done"],
                               "ended": time.time()})
    finally:
        stop_instances(storage, backend)
    return summarize(storage, spec, stages_out, started)


def summarize(storage: RunStorage, spec: RunSpec, stages: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """Best trial, per-stage outcome and the ledger of the run."""
    best = None
    final = stages[-1] if stages else None
    if final:
        results = stage_results(storage, final["stage"], final["trials"])
        done = [(r["metric"], t) for t, r in results.items() if r and r.get("state") == "done"]
        if done:
            metric, trial = (max if spec.mode == "max" else min)(done)
            best = {"trial": trial, "metric": metric, "config": storage.read_config(trial)}
    return {"best": best, "stages": stages, "ledger": storage.ledger(), "started": started, "ended": time.time()}
