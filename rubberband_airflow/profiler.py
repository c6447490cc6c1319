"""The profiler: measures what the planning model needs by running the real trainable.

On one instance of the target type it runs short trials through the same agent and workers
a tuning run uses: several sampled configurations on one GPU (their spread of epoch times is
the straggler noise), then the first configuration on each larger power of two up to the
instance's GPUs (the scaling curve), each one resumed once from its checkpoint. From the
timings it fits:

- ``epoch_seconds``: the curve t(g) = a + b / g (scipy), so g that were not measured (larger
  instances) are predicted too; measured values are kept as measured;
- ``trial_overhead_seconds``: the time a slot is busy per task beyond its epochs, from tasks
  run back to back on one slot (process start, imports, checkpoint restore and save, the
  agent noticing the slot is free);
- ``straggler_sigma``: the standard deviation of log epoch time across configurations;
- ``checkpoint_gb``: the stored checkpoint's size;
- ``pending_seconds``/``boot_seconds``/``pending_sigma``: from the ledgers of this and earlier
  launches (request to running, running to ready; sigma of log pending latency);
- ``stage_overhead_seconds``: the orchestrator's time between one stage's last result and the
  next stage's start, from this profile's own stage changes unless measured elsewhere.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from rubberband_airflow.execution.backends.base import ComputeBackend
from rubberband_airflow.execution.results import Mode
from rubberband_airflow.execution.runner import RunSpec, assign_stage, start_run, stop_instances, wait_stage
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.profile import fit_scaling, powers_of_two
from rubberband_airflow.search_space import sample


class ProfileError(RuntimeError):
    """Profiling could not measure something (for example every trial failed)."""


def _log_sigma(values: Iterable[float]) -> float:
    logs = np.log([v for v in values if v > 0])
    return float(np.std(logs, ddof=1)) if len(logs) >= 2 else 0.0


def launch_latencies(ledgers: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Pending (request to running) and boot (running to ready) from ledger entries."""
    pending, boot = [], []
    for e in ledgers:
        if e.get("requested") is not None and e.get("running") is not None:
            pending.append(max(0.0, e["running"] - e["requested"]))
            if e.get("ready") is not None:
                boot.append(max(0.0, e["ready"] - e["running"]))
    if not boot:
        raise ProfileError("no launch in the ledgers reached ready: pending and boot latency are unknown")
    return {"pending_seconds": float(np.mean(pending)), "boot_seconds": float(np.mean(boot)),
            "pending_sigma": _log_sigma(pending) if len(pending) >= 3 else 0.0, "launches": len(boot)}


def _epoch_times(metrics: list[dict[str, Any]], stage: int) -> list[float]:
    times = [m["time"] for m in metrics if m.get("stage") == stage]
    return list(np.diff(times)) if len(times) >= 2 else []


def _slot_cycles(results: dict[str, dict[str, Any]], epoch_seconds: dict[str, float],
                 epochs: int) -> list[tuple[float, float, int]]:
    """(slot seconds, epoch seconds, epochs) of each task that followed another on the same slot.

    A slot is busy from one task's spawn to the next one's: its fork, the trainable's imports, checkpoint
    restore and save, and the agent noticing the slot is free all count, as they do in a run.
    """
    by_slot: dict[str, list[tuple[float, str]]] = {}
    for t, r in results.items():
        by_slot.setdefault(f"{r['instance']}/{r.get('slots')}", []).append((r.get("spawned", r["started"]), t))
    out = []
    for runs in by_slot.values():
        runs.sort()
        for (spawned, t), (next_spawned, _) in zip(runs, runs[1:]):
            out.append((next_spawned - spawned, epoch_seconds[t], epochs))
    if not out:
        raise ProfileError("no slot ran two profiling tasks in a row: profile more configurations than slots")
    return out


def _run_stage(storage: RunStorage, backend: ComputeBackend, instance: str, stage: int, trials: list[str],
               gpus: int, start: int, stop: int, timeout: float) -> dict[str, dict[str, Any]]:
    tasks = [{"trial": t, "gpus": gpus, "start_epoch": start, "stop_epoch": stop} for t in trials]
    assign_stage(storage, stage, {instance: tasks})
    results = wait_stage(storage, backend, stage, trials, timeout, poll=0.2)
    failed = {t: r["error"] for t, r in results.items() if r["state"] != "done"}
    if failed:
        raise ProfileError(f"profiling trials failed: {failed}")
    return results


def profile(storage: RunStorage, backend: ComputeBackend, *, trainable: str, search_space: dict[str, Any],
            metric: str, instance_type: str, gpus: int, configs: int = 4, epochs: int = 3, seed: int = 0,
            timeout: float = 900.0, past_ledgers: Iterable[dict[str, Any]] = (),
            conditions: dict[str, Any] | None = None) -> dict[str, Any]:
    """Profile ``trainable`` on one instance of ``instance_type`` (``gpus`` slots); returns the profile."""
    began = time.time()
    if configs <= gpus:
        raise ProblemError("configs", f"must be more than the instance's {gpus} slots, so a slot runs tasks "
                           "back to back and the overhead between them is measured")
    spec = RunSpec(trainable, metric, Mode.MAX, seed)
    trial_configs = sample(search_space, configs, seed)
    trials = start_run(storage, spec, trial_configs, {"profile": instance_type}, gpus)
    stage_gaps: list[float] = []
    task_records: list[tuple[float, float, int]] = []  # (wall seconds, epoch seconds, epochs) per task
    try:
        [instance] = backend.launch("profile", 1)
        stage = 1
        per_config: list[float] = []
        results = _run_stage(storage, backend, instance, stage, trials, 1, 0, epochs, timeout)
        for t in trials:
            per_config.append(float(np.median(_epoch_times(storage.metrics(t), stage))))
        task_records += _slot_cycles(results, dict(zip(trials, per_config)), epochs)
        measured = {1: float(np.exp(np.mean(np.log(per_config))))}
        ratio_base = per_config[0]
        last_end = max(r["finished"] for r in results.values())
        for g in powers_of_two(gpus):
            stage += 1
            # The first configuration again on g workers, resumed from its checkpoint (restore cost included);
            # on one GPU this measures the stage change and the resume without a new scaling point.
            res = _run_stage(storage, backend, instance, stage, trials[:1], g, epochs * (stage - 1),
                             epochs * stage, timeout)[trials[0]]
            stage_gaps.append(max(0.0, res["started"] - last_end))  # result noticed, next stage placed, picked up
            last_end = res["finished"]
            if g > 1:
                times = _epoch_times(storage.metrics(trials[0]), stage)
                measured[g] = measured[1] * float(np.median(times)) / ratio_base
        checkpoint = storage.fs.size(storage.path("trials", trials[0], "checkpoint.pt"))
    finally:
        stop_instances(storage, backend)
    overheads = [max(0.0, wall - n * per_epoch) for wall, per_epoch, n in task_records]
    latencies = launch_latencies([*past_ledgers, *storage.ledger()])
    return {
        "trainable": trainable,
        "metric": metric,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "profiling_seconds": round(time.time() - began, 1),
        "conditions": {"instance_type": instance_type, "gpus": gpus, "configs": configs, "epochs_per_task": epochs,
                       "host": platform.node(), "python": platform.python_version(), **(conditions or {})},
        "epoch_seconds_measured": {str(g): v for g, v in measured.items()},
        "scaling_fit": dict(zip(("a", "b"), fit_scaling(measured)), model="a + b / g"),
        "trial_overhead_seconds": float(np.median(overheads)),
        "straggler_sigma": _log_sigma(per_config),
        "checkpoint_gb": checkpoint / 1e9,
        "stage_overhead_seconds": float(np.mean(stage_gaps)) if stage_gaps else None,
        "instance_type": {"name": instance_type, "gpus": gpus, **latencies},
    }
