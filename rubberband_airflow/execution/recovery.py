"""Lost work is re-run, not dropped: the trials of a lost instance are placed again within their stage.

An instance is lost when the backend says it is gone (a dead agent process on the local backend,
a terminated or stopping instance on EC2), when its agent says it stopped, when its agent is hung
(its heartbeat shows a trial past its time limit that the agent has not ended), or when its
heartbeat goes silent. The trials it held in the stage, running there or waiting their turn, are placed
again: on idle slots of the live fleet first, the rest on a replacement batch named after the
stage and the lost instance (a retried launch finds it again). They resume from their last
checkpoint (the worker checks it: see ``checkpoint.resume_epoch``).

Each loss has one record, ``stages/<i>/recovery/<instance>.json``, written by the one caller that
claims it (a create-only ``<instance>.claim``); every other caller (several sensors of a stage see
the same loss at once) waits for the record and reads it. Agents read the record's placement
beside their stage assignment; the report reads it for what the loss cost. A trial whose
recovery is impossible (the backend refused a replacement, or the trial lost its instance
``MAX_RECOVERIES`` times in its try of the stage) is recorded as failed with that reason.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rubberband_airflow.execution import checkpoint
from rubberband_airflow.execution.backends.base import ComputeBackend
from rubberband_airflow.execution.storage import RunStorage, result_name

if TYPE_CHECKING:
    from rubberband_airflow.execution.runner import RunPlan

log = logging.getLogger(__name__)

# An agent beats every few seconds, rides out a storage error burst of up to 5 minutes
# (trainable.STORAGE_PATIENCE_SECONDS), backing off for at most half a minute: a heartbeat such
# a burst held back is up to about 330 s old when storage is back, and is not taken for a loss.
# An instance whose heartbeat has not changed for SILENT_SECONDS is lost.
SILENT_SECONDS = 400.0
# An instance that sent no heartbeat this long after it was first waited for is lost.
BOOT_SECONDS = 1200.0
# A heartbeat this old (or a trial this far past its limit and not ended) means the agent is hung,
# and the next stage's scaling retires its instance.
HUNG_SECONDS = 400.0
# A trial this far past its limit in its agent's heartbeat, and not ended, means the agent is hung
# and the trials it holds are placed again: a healthy agent ends a trial at its limit (allowing
# its worker 10 s to die), beats every 5 s, and backs off for at most 30 s when storage fails.
OVERDUE_GRACE_SECONDS = 60.0
# A trial whose instance is lost this many times in one try of a stage is failed.
MAX_RECOVERIES = 3
# A claim older than this with no record is taken over (its claimant died mid-recovery).
CLAIM_STALE_SECONDS = 300.0
# The claims this process is making now (their tokens): a claim of this process that is not one of
# them was abandoned (its maker failed, and storage failed to delete it).
_CLAIMING: set[str] = set()
_STAGE_FILES = ("trials.json", "start.json", "start-tries.json", "end.json")


def _record_path(stage: int, instance: str) -> tuple[str, ...]:
    return ("stages", str(stage), "recovery", f"{instance}.json")


def read_record(storage: RunStorage, stage: int, instance: str) -> dict[str, Any] | None:
    """The recovery record of an instance lost in a stage, if it was lost there."""
    return storage.read_json(*_record_path(stage, instance))


def records(storage: RunStorage, stage: int) -> list[dict[str, Any]]:
    """Every recovery record of a stage, oldest first."""
    names = [n for n in storage.listdir("stages", str(stage), "recovery") if n.endswith(".json")]
    found = [r for r in storage.read_json_many([("stages", str(stage), "recovery", n) for n in names]) if r]
    return sorted(found, key=lambda r: (r.get("time") or 0, r["lost"]))


def assigned_tasks(storage: RunStorage, stage: int) -> dict[str, list[dict[str, Any]]]:
    """The tasks the stage's placement assigned to each instance (recoveries left out)."""
    names = [n for n in storage.listdir("stages", str(stage)) if n.endswith(".json") and n not in _STAGE_FILES]
    files = storage.read_json_many([("stages", str(stage), n) for n in names])
    return {n.removesuffix(".json"): list(f["tasks"]) for n, f in zip(names, files)
            if isinstance(f, dict) and isinstance(f.get("tasks"), list)}


def trial_instances(storage: RunStorage, stage: int,
                    recs: Iterable[dict[str, Any]] | None = None) -> dict[str, tuple[str | None, dict[str, Any]]]:
    """Where each trial of a stage runs now, with its task: its assignment (that of its newest
    try, see ``RunStorage.retries``), followed through the recoveries of the instances it lost
    (None where its recovery was impossible)."""
    where = {t["trial"]: (inst, t) for inst, tasks in assigned_tasks(storage, stage).items() for t in tasks}
    for retry in storage.retries(stage):
        where.update({t["trial"]: (inst, t) for inst, tasks in retry.get("placement", {}).items() for t in tasks})
    moved = {r["lost"]: r.get("moved") or {} for r in (records(storage, stage) if recs is None else recs)}
    out: dict[str, tuple[str | None, dict[str, Any]]] = {}
    for trial, (inst, task) in where.items():
        current: str | None = inst
        seen: set[str] = set()
        while current is not None and current in moved and trial in moved[current] and current not in seen:
            seen.add(current)
            current = moved[current][trial]
        out[trial] = (current, task)
    return out


def trial_instance(storage: RunStorage, trial: str, stage: int) -> str | None:
    """The instance a trial of a stage runs on now (see ``trial_instances``)."""
    return trial_instances(storage, stage).get(trial, (None, {}))[0]


def held_tasks(storage: RunStorage, stage: int, instance: str,
               where: dict[str, tuple[str | None, dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """The tasks an instance holds in a stage: placed there now, with no result yet, in order."""
    where = trial_instances(storage, stage) if where is None else where
    mine = [task for inst, task in where.values() if inst == instance]
    results = storage.read_json_many([("trials", t["trial"], _result_name(stage, t)) for t in mine])
    return [task for task, result in zip(mine, results) if result is None]


def hung_reason(beat: Mapping[str, Any] | None, now: float, hung_after: float = HUNG_SECONDS,
                written: float | None = None) -> str | None:
    """Why an agent's heartbeat shows it hung, or None: the heartbeat was ``written`` (by the
    store's clock; else the time in it, by the agent's) ``hung_after`` seconds before ``now``, or
    it shows a trial running ``hung_after`` seconds past its limit when it was written (see
    ``overdue_reason``: by the agent's own clock)."""
    if not beat or beat.get("state") == "stopping":
        return None
    stamp = _number(beat.get("time"))
    stamp = now if stamp is None else stamp
    age = now - (stamp if written is None else written)
    if age > hung_after:
        return f"its agent's heartbeat has not changed for {age:.0f} s (limit {hung_after:g} s)"
    return overdue_reason(beat, stamp, hung_after)


def overdue_reason(beat: Mapping[str, Any] | None, now: float, grace: float) -> str | None:
    """Why an agent's heartbeat shows it hung by its trials, or None: it lists a trial running more
    than ``grace`` seconds past its limit at ``now`` (the agent should have ended it at the limit).
    ``now`` is on the agent's clock, which the trial's start is on: an instance's clock may be
    off the orchestrator's by more than the grace."""
    if not beat or beat.get("state") == "stopping":
        return None
    for task in beat.get("tasks", []):
        over = now - float(task["started"]) - float(task["limit_seconds"])
        if over > grace:
            return (f"its agent has not ended {task['trial']} of stage {task['stage']}, {over:.0f} s past "
                    f"its limit of {float(task['limit_seconds']):g} s")
    return None


def _number(value: Any) -> float | None:
    """A heartbeat's number, or None where it holds none (a heartbeat of another version)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def lost_reason(backend: ComputeBackend, instance: str) -> str | None:
    """Why an instance is gone by what the backend and its agent say now, or None (heartbeat
    silence is the watcher's to time: see ``LossWatch``)."""
    try:
        state = backend.describe([instance]).get(instance)
    except KeyError:  # not in the run's ledger: nothing to ask the backend about
        state = None
    beat = backend.storage.heartbeat(instance) or {}
    stopped = beat.get("state") == "stopping"
    notice = beat.get("interruption")
    if stopped and notice:  # its trials checkpointed where they could, and it went at once
        return (f"instance {instance} is gone: its agent stopped at a spot interruption notice "
                f"({notice.get('action')} at {notice.get('time')})")
    if state == "terminated":
        return f"instance {instance} is gone: the backend says it is terminated"
    if stopped:
        return f"instance {instance} is gone: its agent stopped"
    return None


class LossWatch:
    """Tells which instances holding a stage's unfinished trials are lost: what the backend says,
    a hung agent (a trial ``OVERDUE_GRACE_SECONDS`` past its limit in its heartbeat), and heartbeat
    silence, each timed by the watcher's own clock and the agent's, never one against the other
    (instance clocks may differ from the orchestrator's)."""

    def __init__(self, storage: RunStorage, backend: ComputeBackend | None, stage: int,
                 silent_seconds: float = SILENT_SECONDS, boot_seconds: float = BOOT_SECONDS) -> None:
        self.storage, self.backend, self.stage = storage, backend, stage
        self.silent_seconds, self.boot_seconds = silent_seconds, boot_seconds
        self.overdue_grace = OVERDUE_GRACE_SECONDS
        self._beats: dict[str, tuple[float | None, float]] = {}  # instance: (heartbeat time, when it changed)

    def reason(self, instance: str) -> str | None:
        """Why this instance is lost, or None while it looks alive."""
        if self.backend is not None:
            why = lost_reason(self.backend, instance)
            if why is not None:
                return why
        beat = self.storage.heartbeat(instance)
        stamp = _number(beat.get("time")) if beat else None
        now = time.monotonic()
        seen, changed = self._beats.get(instance, (None, None))
        if changed is None or stamp != seen:
            # First seen now, or changed: as of when storage says it was written, on first sight (a
            # watcher that starts after an agent froze does not take its last heartbeat for news).
            written = self.storage.written("instances", instance, "heartbeat.json") \
                if changed is None and stamp is not None else None
            changed = now - max(0.0, time.time() - written) if written is not None else now
        self._beats[instance] = (stamp, changed)
        quiet = now - changed
        # The agent's clock now, at the latest: its heartbeat's time plus how long it has not
        # changed by this watcher's clock (it was written at most one look before it was seen).
        hung = overdue_reason(beat, stamp + quiet, self.overdue_grace) if stamp is not None else None
        if hung is not None:
            return f"instance {instance} is hung: {hung}"
        if beat is None and quiet > self.boot_seconds:
            return f"instance {instance} sent no heartbeat within {self.boot_seconds:g} s: its agent never started"
        if beat is not None and quiet > self.silent_seconds:
            return f"instance {instance} was lost: no heartbeat for {quiet:.0f} s"
        return None

    def lost(self, trials: Iterable[str]) -> dict[str, str]:
        """The lost instances among those the given trials run on now, with why."""
        where = trial_instances(self.storage, self.stage)
        instances = sorted({i for t in trials if t in where and (i := where[t][0]) is not None})
        out = {}
        for instance in instances:
            why = self.reason(instance)
            if why is not None:
                out[instance] = why
        return out


# --- recovering ---------------------------------------------------------------------------------


def recover_trials(storage: RunStorage, backend: ComputeBackend, run_plan: RunPlan, stage: int, lost: str,
                   reason: str, wait: float = CLAIM_STALE_SECONDS + 60) -> dict[str, Any]:
    """Place the trials a lost instance held in a stage again, once however many callers ask;
    returns the loss's record: ``moved`` says where each trial went (None: failed, see ``error``)."""
    return once(storage, _record_path(stage, lost), lambda: _recover(storage, backend, run_plan, stage, lost, reason),
                f"the recovery of instance {lost} in stage {stage}", wait)


def once(storage: RunStorage, record: tuple[str, ...], make: Callable[[], dict[str, Any]], what: str,
         wait: float = CLAIM_STALE_SECONDS + 60) -> dict[str, Any]:
    """The JSON record at ``record``, made by ``make`` (which writes it) in the one caller that
    claims it first (a create-only ``.claim`` beside it); every other caller waits for it. A claim
    whose claimant died (older than ``CLAIM_STALE_SECONDS``, with no record; at once where it was
    made in this PID space by a process that has ended, or abandoned by this one) is taken over."""
    claim = (*record[:-1], record[-1].removesuffix(".json") + ".claim")
    deadline = time.monotonic() + wait
    while True:
        found = storage.read_json(*record)
        if found is not None:
            return found
        token = secrets.token_hex(8)
        _CLAIMING.add(token)
        try:
            if storage.create_json({"time": time.time(), "pid": os.getpid(), "pid_space": _pid_space(),
                                    "token": token}, *claim):
                try:
                    return make()
                except BaseException:
                    storage.delete(*claim)  # let a later call try again (a storage error may leave it)
                    raise
        finally:
            _CLAIMING.discard(token)
        held = storage.read_json(*claim)
        if held is not None and (time.time() - float(held.get("time", 0)) > CLAIM_STALE_SECONDS
                                 or _claimant_gone(held)):
            log.warning("Taking over %s: its claim is stale or its claimant is gone", what)
            storage.delete(*claim)
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was claimed by another task that has not finished it within {wait:g} s")
        time.sleep(0.5)


@functools.cache
def _pid_space() -> str:
    """Where a process id means one process: the host, its boot and (on Linux) the PID namespace,
    so that containers sharing a host's name (host networking) are not taken for one another."""
    marks = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            marks.append(read())
        except OSError:
            pass
    return " ".join(marks)


def _claimant_gone(claim: Mapping[str, Any]) -> bool:
    """Whether the claim was made in this PID space (``_pid_space``) by a process that has ended
    (a killed task, whose retry then need not wait out the claim's staleness), or by this process
    and left behind (its maker failed in a storage error burst that also failed the claim's
    deletion; the task, trying again, takes it over); a claim made elsewhere is never judged."""
    if claim.get("pid_space") != _pid_space():
        return False
    if claim.get("pid") == os.getpid():
        return claim.get("token") not in _CLAIMING
    try:
        os.kill(int(claim["pid"]), 0)
    except ProcessLookupError:
        return True
    except (KeyError, TypeError, ValueError, PermissionError):
        return False
    return False


def _recover(storage: RunStorage, backend: ComputeBackend, run_plan: RunPlan, stage: int, lost: str,
             reason: str) -> dict[str, Any]:
    """The claimed recovery: stop the lost instance, place what it held, write the record."""
    log.warning("Recovering the trials of %s in stage %s: %s", lost, stage, reason)
    backend.terminate([lost])  # it bills no more, and no straggler of it writes the trials' files
    recs = records(storage, stage)
    where = trial_instances(storage, stage, recs)
    held = held_tasks(storage, stage, lost, where)
    losses = {t["trial"]: _losses(recs, t) for t in held}
    infos = {t["trial"]: _checkpoint(storage, t["trial"]) for t in held}
    moved: dict[str, str | None] = {}
    errors: dict[str, str] = {}
    for task in held:
        if losses[task["trial"]] + 1 >= MAX_RECOVERIES:
            moved[task["trial"]] = None
            errors[task["trial"]] = f"its instance was lost {MAX_RECOVERIES} times in stage {stage}"
    movable = [t for t in held if t["trial"] not in moved]
    placement: dict[str, list[dict[str, Any]]] = {}
    slots = _idle_slots(storage, backend, run_plan, stage, lost, where)
    for task, instance in zip(movable, slots):
        placement.setdefault(instance, []).append({**_task(task), "recovered_from": lost})
    rest = movable[len(slots):]
    replacement = None
    if rest:  # one instance in place of the lost one, in the stage's market: its trials run there in order
        batch = f"stage-{stage}-recover-{lost}"
        try:
            ids = backend.launch(batch, 1, run_plan.market(stage))
        except Exception as e:  # the backend refused: these trials cannot run again in this stage
            why = f"the backend refused to launch a replacement for it: {type(e).__name__}: {e}"
            for task in rest:
                moved[task["trial"]] = None
                errors[task["trial"]] = why
        else:
            replacement = {"batch": batch, "instances": ids}
            for task in rest:
                placement.setdefault(ids[0], []).append({**_task(task), "recovered_from": lost})
    for instance, tasks in placement.items():
        for task in tasks:
            moved[task["trial"]] = instance
    record = {
        "stage": stage, "lost": lost, "reason": reason, "time": time.time(), "moved": moved,
        "placement": placement, "replacement": replacement, "errors": errors,
        "trials": [{"trial": t["trial"], "to": moved[t["trial"]], "from_epoch": _from_epoch(infos[t["trial"]], t),
                    "error": errors.get(t["trial"])} for t in held],
        "last_useful": _last_useful(storage, stage, lost, where, infos),
    }
    storage.write_json(record, *_record_path(stage, lost))
    tries = {t["trial"]: int(t.get("try") or 1) for t in held}
    for trial, error in errors.items():
        if storage.read_result(trial, stage, tries[trial]) is None:
            storage.write_result(trial, stage, {"state": "failed", "stage": stage, "instance": lost,
                                                "error": f"{reason}; it was not recovered: {error}",
                                                "finished": time.time()}, tries[trial])
    log.warning("Recovery of %s in stage %s: %s", lost, stage,
                ", ".join(f"{t} -> {i}" for t, i in moved.items()) or "it held no unfinished trial")
    return record


def _losses(recs: list[dict[str, Any]], task: dict[str, Any]) -> int:
    """How many times the task's try of its trial was placed again after a loss (a try after a
    clear starts from none)."""
    k = int(task.get("try") or 1)
    return sum(1 for r in recs for tasks in (r.get("placement") or {}).values() for x in tasks
               if x["trial"] == task["trial"] and int(x.get("try") or 1) == k)


def _task(task: dict[str, Any]) -> dict[str, Any]:
    """The task as placed again: its trial, GPUs, epochs and time limit."""
    return {k: task[k] for k in ("trial", "gpus", "start_epoch", "stop_epoch", "limit_seconds", "try") if k in task}


def _result_name(stage: int, task: dict[str, Any]) -> str:
    """The name of the result file of a task's try of a stage."""
    return result_name(stage, int(task.get("try") or 1))


def _checkpoint(storage: RunStorage, trial: str) -> checkpoint.CheckpointInfo | None:
    try:
        return checkpoint.read_info(storage, trial)
    except checkpoint.CheckpointError:
        return None  # the worker that resumes it fails it with the reason


def _from_epoch(info: checkpoint.CheckpointInfo | None, task: dict[str, Any]) -> int:
    """The epoch a recovered trial resumes from (as the worker will pick it, when it can)."""
    try:
        return checkpoint.resume_epoch(info, task["trial"], int(task["start_epoch"]), int(task["stop_epoch"]))
    except checkpoint.CheckpointError:
        return int(task["start_epoch"])


def _idle_slots(storage: RunStorage, backend: ComputeBackend, run_plan: RunPlan, stage: int, lost: str,
                where: dict[str, tuple[str | None, dict[str, Any]]]) -> list[str]:
    """One entry per idle slot (``gpus_per_trial`` GPUs) of the live fleet, oldest instance first:
    a slot nothing is running on or queued for in the stage, on an instance that is neither being
    recovered itself (a loss seen at once by several waits is recovered concurrently) nor hung."""
    live = [i for i in backend.live() if i != lost]
    if not live:
        return []
    states = backend.describe(live)
    beats = storage.read_json_many([("instances", i, "heartbeat.json") for i in live])
    written = storage.modified("instances")  # by the store's clock: an instance's may be off
    recovering = {n.rsplit(".", 1)[0] for n in storage.listdir("stages", str(stage), "recovery")}
    now = time.time()
    gpus = run_plan.allocation(stage).gpus_per_trial
    out = []
    for instance, beat in zip(live, beats):
        if (states.get(instance) == "terminated" or (beat or {}).get("state") == "stopping"
                or instance in recovering
                or hung_reason(beat, now, written=written.get(f"{instance}/heartbeat.json")) is not None):
            continue
        busy = sum(int(t["gpus"]) for t in held_tasks(storage, stage, instance, where))
        out += [instance] * ((run_plan.instance_type.gpus - busy) // gpus)
    return out


def _last_useful(storage: RunStorage, stage: int, lost: str, where: dict[str, tuple[str | None, dict[str, Any]]],
                 infos: dict[str, checkpoint.CheckpointInfo | None]) -> float | None:
    """When the lost instance last did work that was kept: its last checkpoint or finished trial in
    the stage (else when it became ready); what it billed after that was lost."""
    ledger = storage.read_json("ledger", f"{lost}.json") or {}
    beat = storage.heartbeat(lost) or {}
    times = [t for t in (beat.get("ready"), ledger.get("ready"), ledger.get("running")) if t is not None]
    times += [i.time for i in infos.values() if i is not None and i.stage == stage]
    for result in storage.read_json_many([("trials", t, _result_name(stage, task)) for t, (_, task) in where.items()]):
        if result and result.get("instance") == lost and result.get("finished"):
            times.append(result["finished"])
    return max(times) if times else None
