"""Runs one stage of one trial: ``world_size`` co-located worker processes around the trainable.

Started by the agent as a fork of its fork server (``forked_main``; by hand: ``python -m
rubberband_airflow.execution.worker RUN_URI TRIAL STAGE INSTANCE``);
what to run comes from the run's files (``run.json``, the trial's ``config.json`` and the
stage assignment), never from the command line. Rank 0 writes the trial's stage result.
A storage error burst does not fail the trial: the worker's reads and writes (metrics,
checkpoint, result) are tried again, backing off as the agent does (``trainable.patiently``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
import time
import traceback
import zlib
from typing import Any

from rubberband_airflow.execution import checkpoint, interruption
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.trainable import TrialContext, TrialFailed, computes, load_trainable, patiently

INTERRUPTED_EXIT = 75  # EX_TEMPFAIL: stopped for a spot interruption, to resume elsewhere


def trial_seed(run_seed: int, trial: str) -> int:
    """The trial's own seed: fixed by the run's seed and the trial id, the same in every stage."""
    return (run_seed * 1_000_003 + zlib.crc32(trial.encode())) % (2**31)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torch() -> Any | None:
    """torch where it is installed: a one-slot trial of a plain-Python trainable runs without it."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _device(rank: int, slots: list[int], torch: Any | None) -> str:
    if torch is not None and torch.cuda.is_available():
        return f"cuda:{slots[rank] if rank < len(slots) else rank}"
    return "cpu"


def _rank_main(rank: int, world_size: int, port: int, run_uri: str, trial: str, stage: int,
               task: dict[str, Any], spec: dict[str, Any], slots: list[int]) -> list[dict[str, Any]]:
    """Run one rank of the trial; returns the records it reported."""
    from rubberband_airflow.execution import trial_clients

    interruption.install()
    # A trainable that does not compute (a sleeping synthetic one) runs without torch on the CPU.
    torch = _torch() if computes(spec["trainable"]) else None
    if torch is not None:
        torch.set_num_threads(1)  # one slot, one core: the speed the profiler measured
    device = _device(rank, slots, torch)
    if torch is not None and device.startswith("cuda"):
        torch.cuda.set_device(device)
    # Data parallel only: a one-rank trial needs no process group (nor torch).
    dist = importlib.import_module("torch.distributed") if world_size > 1 else None
    if dist is not None:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    storage = trial_clients.storage(run_uri)
    config = patiently(lambda: storage.read_config(trial), "reading the config")
    ctx = TrialContext(trial_id=trial, config=config, start_epoch=int(task["start_epoch"]),
                       stop_epoch=int(task["stop_epoch"]), rank=rank, world_size=world_size, device=device,
                       seed=trial_seed(int(spec.get("seed", 0)), trial), stage=stage, storage=storage)
    try:
        load_trainable(spec["trainable"])(ctx)
        if dist is not None:
            dist.barrier()
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        _check_reports(ctx, spec)
    return ctx.reports


def _check_reports(ctx: TrialContext, spec: dict[str, Any]) -> None:
    metric = spec["metric"]
    # Resumed at the stage's last epoch (lost after its last checkpoint): that epoch's report is stored.
    reports = (ctx.reports if ctx.start_epoch < ctx.stop_epoch
               else patiently(lambda: ctx.storage.metrics(ctx.trial_id), "reading the metrics"))
    final = [r for r in reports if r["epoch"] == ctx.stop_epoch]
    if not final:
        raise TrialFailed(f"the trainable returned without reporting epoch {ctx.stop_epoch}")
    if metric not in final[-1]:
        raise TrialFailed(f"the trainable did not report the metric {metric!r} (it reported "
                          f"{', '.join(k for k in final[-1] if k not in ('epoch', 'stage', 'time'))})")


def run_task(run_uri: str, trial: str, stage: int, instance: str, slots: list[int], try_number: int = 1,
             task: dict[str, Any] | None = None, spec: dict[str, Any] | None = None) -> int:
    """Run the trial's stage (its ``try_number``-th try) and write its result; returns the process
    exit status. Stopped at a checkpoint for a spot interruption, it writes none (the trial resumes elsewhere).

    ``task`` (its assignment) and ``spec`` (``run.json``) are read from the run's files unless the
    agent, which read them already, hands them over: a stage's assignments are several requests.
    """
    from rubberband_airflow.execution import trial_clients

    interruption.install()
    storage = trial_clients.storage(run_uri)
    if spec is None:
        spec = patiently(lambda: storage.read_json("run.json"), "reading run.json") or {}
    if task is None:
        task = patiently(lambda: next((t for t in storage.assignments(instance) if t["trial"] == trial
                                       and t["stage"] == stage and int(t.get("try") or 1) == try_number), None),
                         "reading the assignment")
    started = time.time()
    # When the agent spawned this process: the slot was busy from then (its fork included).
    spawned = float(os.environ.get("RUBBERBAND_SPAWNED", started))
    result: dict[str, Any] = {"instance": instance, "started": started, "spawned": spawned, "stage": stage,
                              "slots": slots}
    try:
        if task is None:
            raise TrialFailed(f"trial {trial} is not assigned to {instance} in stage {stage}")
        start = _resume_epoch(storage, trial, task)
        # Running from here: its storage client made (its first request) and its epoch known.
        result["started"] = time.time()
        resumed = start != int(task["start_epoch"])
        if resumed:
            result["resumed_from_epoch"] = start
        task = {**task, "start_epoch": start}
        world = int(task["gpus"])
        metrics: list[dict[str, Any]] = []
        if world == 1:
            metrics = _rank_main(0, 1, 0, run_uri, trial, stage, task, spec, slots)
        else:
            if _torch() is None:
                raise TrialFailed(f"a trial on {world} GPUs needs torch: install rubberband-airflow[torch]")
            import torch.multiprocessing as mp

            mp.spawn(_rank_main, args=(world, _free_port(), run_uri, trial, stage, task, spec, slots),
                     nprocs=world, join=True)
        # The stage's records are those this process reported, unless it ran only part of the stage
        # (resumed) or in other processes: then the stored ones (a listing and a read per epoch).
        if resumed or not any(m["epoch"] == task["stop_epoch"] for m in metrics):
            metrics = patiently(lambda: storage.metrics(trial), "reading the metrics")
        last = [m for m in metrics if m["epoch"] == task["stop_epoch"]][-1]
        # When the stage's epochs ended: what a re-plan measures epoch times by, without reading
        # every epoch record of hundreds of trials again.
        # (an epoch reported twice counts by its last report, as stored)
        ends = {int(m["epoch"]): float(m["time"]) for m in metrics if m.get("stage") == stage and "time" in m}
        result.update(state="done", epoch=int(task["stop_epoch"]), metric=last[spec["metric"]],
                      epoch_ends=[ends[e] for e in sorted(ends)])
        code = 0
    except BaseException as e:  # the reason is the product here: record it, whatever it is
        if interruption.requested():  # the instance is going, not the trial's fault: no result
            return INTERRUPTED_EXIT
        result.update(state="failed", error=_reason(e))
        code = 1
    result["finished"] = time.time()
    if try_number > 1:
        result["try"] = try_number
    patiently(lambda: storage.write_result(trial, stage, result, try_number), "writing the result")
    return code


def _resume_epoch(storage: RunStorage, trial: str, task: dict[str, Any]) -> int:
    """The epoch the trial's last checkpoint was taken at, checked against the assignment (see
    ``checkpoint.resume_epoch``): the stage's first epoch, or one inside it after a loss."""
    try:
        info = patiently(lambda: checkpoint.read_info(storage, trial), "reading the checkpoint")
        return checkpoint.resume_epoch(info, trial, int(task["start_epoch"]), int(task["stop_epoch"]))
    except checkpoint.CheckpointError as e:
        raise TrialFailed(str(e)) from None


def _reason(e: BaseException) -> str:
    text = str(e)
    if "ProcessRaisedException" in type(e).__name__ or "process " in text and "terminated" in text:
        # torch.multiprocessing wraps a rank's error; keep its last line, the actual exception
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else type(e).__name__
    if isinstance(e, TrialFailed):
        return text
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {text}{where}"


def main(argv: list[str] | None = None, task: dict[str, Any] | None = None,
         spec: dict[str, Any] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rubberband-worker")
    p.add_argument("run_uri")
    p.add_argument("trial")
    p.add_argument("stage", type=int)
    p.add_argument("instance")
    p.add_argument("--try", dest="try_number", type=int, default=1, help="the try of the trial's stage (1: the first)")
    a = p.parse_args(argv)
    slots = [int(s) for s in os.environ.get("RUBBERBAND_SLOTS", "").split(",") if s.strip()]
    return run_task(a.run_uri, a.trial, a.stage, a.instance, slots, a.try_number, task, spec)


def forked_main(argv: list[str], env: dict[str, str], stderr: str, task: dict[str, Any] | None = None,
                spec: dict[str, Any] | None = None) -> None:
    """A trial forked by the agent: the trial's environment, stderr to the agent's file, then ``main``
    with the assignment and ``run.json`` the agent read."""
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [__file__, *argv]  # as if started as ``python -m rubberband_airflow.execution.worker``
    out = os.open(stderr, os.O_WRONLY | os.O_APPEND)
    os.dup2(out, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.exit(main(argv, task, spec))


if __name__ == "__main__":
    sys.exit(main())
