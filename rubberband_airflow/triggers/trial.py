"""Trigger that waits, on the triggerer, for one trial's result of one stage in run storage."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

from rubberband_airflow import trainable
from rubberband_airflow.execution import backoff, recovery, runner
from rubberband_airflow.execution.backends.base import ComputeBackend
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.hooks.storage import run_storage

log = logging.getLogger(__name__)

# A trial's instance is lost when its agent's heartbeat (written every few seconds) has not
# changed for this long, or when no heartbeat has appeared this long after the wait began.
SILENT_SECONDS = recovery.SILENT_SECONDS
BOOT_SECONDS = recovery.BOOT_SECONDS
# How often the heartbeat is looked at (the result is read every poll interval).
LIVENESS_INTERVAL = 30.0
# How long the triggers of a stage ride out storage errors (as long as a trial's process does) before
# their waits fail: meanwhile each keeps what it last read and reads again at its next poll.
STORAGE_PATIENCE_SECONDS = trainable.STORAGE_PATIENCE_SECONDS
_FAILED = object()  # a read that storage errors failed, within the patience


def boot_limit(plan: dict[str, Any] | None) -> float:
    """How long to wait for a trial's instance's first heartbeat: ``BOOT_SECONDS``, or three times
    the launch latency (pending and boot) the plan expects of its instance type, if longer."""
    types = ((plan or {}).get("problem") or {}).get("instance_types") or []
    chosen = next((t for t in types if t.get("name") == (plan or {}).get("instance_type")), None)
    expected = float(chosen.get("pending_seconds", 0)) + float(chosen.get("boot_seconds", 0)) if chosen else 0.0
    return max(BOOT_SECONDS, 3 * expected)


def assigned_instance(storage: RunStorage, trial: str, stage: int) -> str | None:
    """The instance a trial of a stage runs on now: where it was placed, or where the recovery
    of an instance it lost placed it again."""
    return recovery.trial_instance(storage, trial, stage)


def lost_result(stage: int, reason: str, instance: str | None) -> dict[str, Any]:
    """The failed result recorded for a trial whose instance is lost."""
    return {"state": "failed", "stage": stage, "error": reason, "instance": instance}


class Liveness:
    """Tells when a trial's instance is lost, by the watcher's own clock (instance clocks may differ).

    The trigger, or a sensor that pokes, keeps one for the whole wait: it remembers when the
    instance's heartbeat last changed. Given the run's backend, an instance the backend says is
    terminated (or whose agent says it stopped) is lost at once; so is one whose heartbeat shows
    a trial past its time limit that the agent has not ended (a hung agent, see
    ``recovery.LossWatch``), so that a hung agent costs about the trial's limit, not the silence.
    It follows the trial to the instance a recovery placed it on.

    :param storage: the run's storage
    :param trial: the trial id
    :param stage: the stage the trial runs
    :param silent_seconds: an instance whose heartbeat has not changed for this long is lost
    :param boot_seconds: an instance with no heartbeat this long after the wait began is lost
    :param backend: the run's backend, or None to go by heartbeats alone
    """

    def __init__(self, storage: RunStorage, trial: str, stage: int, silent_seconds: float,
                 boot_seconds: float, backend: ComputeBackend | None = None) -> None:
        self.storage, self.trial, self.stage = storage, trial, stage
        self.silent_seconds, self.boot_seconds = silent_seconds, boot_seconds
        self.backend = backend
        self.instance: str | None = None
        self.watch = recovery.LossWatch(storage, backend, stage, silent_seconds, boot_seconds)
        self.began = time.monotonic()

    def lost(self) -> str | None:
        """Why the trial's instance is considered gone, or None while it looks alive."""
        self.instance = assigned_instance(self.storage, self.trial, self.stage)
        if self.instance is None:
            if time.monotonic() - self.began > self.boot_seconds:
                return (f"no instance (the trial was never placed) sent a heartbeat within {self.boot_seconds:g} s: "
                        f"its agent never started")
            return None
        return self.watch.reason(self.instance)


class StageWatch:
    """What every trigger of one stage of a run in a triggerer shares: the run's storage, backend,
    plan and placement, read once; one listing of the stage's results per poll interval and one
    look at the instances of its unfinished trials per liveness interval, instead of a GET per
    trial per poll (256 waiting trials on S3 were 128 requests a second). Storage and the backend
    are called in threads, off the event loop.

    :param stage: the stage
    :param silent_seconds: an instance whose heartbeat has not changed for this long is lost
    :param boot_seconds: an instance with no heartbeat this long after the first look is lost;
        None for ``boot_limit`` of the run's plan
    """

    def __init__(self, stage: int, silent_seconds: float, boot_seconds: float | None) -> None:
        self.stage, self.silent_seconds, self.boot_seconds = stage, silent_seconds, boot_seconds
        self.storage: RunStorage | None = None
        self.watch: recovery.LossWatch | None = None
        self.placed: list[str] = []  # the stage's trials in the order of its waits' map indexes
        self.users = 0
        self.listed = float("-inf")  # monotonic start of the latest listing of results
        self.looked = float("-inf")  # monotonic start of the latest look at the instances
        self.done: dict[str, int] = {}  # trial: the try of its result (the newest), as last listed
        self.where: dict[str, str | None] = {}  # trial: its instance now (None: recovery impossible)
        self.lost: dict[str, str] = {}  # instance: why it is lost
        self.failing_since: float | None = None  # monotonic time of the first of the storage errors now
        self._lock = asyncio.Lock()

    async def patiently(self, call: Callable[[], Any], what: str) -> Any:
        """``call()`` in a thread; ``_FAILED`` where a transient storage error (``backoff.transient``)
        failed it while storage has failed for less than ``STORAGE_PATIENCE_SECONDS``, else its error."""
        try:
            out = await asyncio.to_thread(call)
        except backoff.STORAGE_ERRORS as e:
            now = time.monotonic()
            self.failing_since = now if self.failing_since is None else self.failing_since
            if not backoff.transient(e) or now - self.failing_since > STORAGE_PATIENCE_SECONDS:
                raise
            log.warning("%s failed (%s); trying again at the next poll", what, e)
            return _FAILED
        self.failing_since = None
        return out

    async def open(self, trigger: TrialResultTrigger) -> RunStorage:
        """The run's storage, with what the stage's triggers share read from it by the first one."""
        async with self._lock:
            while self.storage is None:
                if await self.patiently(lambda: self._open(trigger), "reading the stage's placement") is _FAILED:
                    await asyncio.sleep(trigger.poll_interval)
        assert self.storage is not None
        return self.storage

    def _open(self, trigger: TrialResultTrigger) -> None:
        storage = run_storage(trigger.run_uri, trigger.storage_conn_id)
        if self.boot_seconds is None:
            self.boot_seconds = boot_limit(storage.read_json("plan.json"))
        self.watch = recovery.LossWatch(storage, trigger.backend(storage), self.stage, self.silent_seconds,
                                        self.boot_seconds)
        placement = storage.read_json("stages", str(self.stage), "placement.json")
        self.placed = runner.placed_trials(placement["placement"] if placement else {},
                                           runner.stage_trials(storage, self.stage))
        self.storage = storage

    async def results(self, interval: float) -> dict[str, int]:
        """The trials with a result, each with its try, listed at most once per ``interval`` for all
        the stage's triggers (a trial run again after a clear counts by its newest try)."""
        async with self._lock:
            if time.monotonic() - self.listed >= interval:
                began = time.monotonic()
                storage = self.storage
                assert storage is not None
                listed = await self.patiently(lambda: storage.stage_result_tries(self.stage), "listing the results")
                if listed is not _FAILED:
                    self.done = listed
                self.listed = began
        return self.done

    def next_listing(self, interval: float) -> float:
        """Seconds until the results are listed again: a trigger that read a listing made before its
        own look sleeps until the next one, not a whole interval from its look (up to two intervals
        from a result to its trigger seeing it)."""
        return max(interval / 10, self.listed + interval - time.monotonic())

    async def look(self, interval: float) -> float:
        """Look at the instances of the unfinished trials at most once per ``interval``; returns
        when the latest look began (a trigger trusts only a look that began after its own wait)."""
        async with self._lock:
            if time.monotonic() - self.looked >= interval:
                began = time.monotonic()
                seen = await self.patiently(self._look, "looking at the instances")
                if seen is not _FAILED:  # else a look as old as the last one: no loss is judged on it
                    self.where, self.lost = seen
                    self.looked = began
        return self.looked

    def _look(self) -> tuple[dict[str, str | None], dict[str, str]]:
        assert self.storage is not None and self.watch is not None
        where = {t: inst for t, (inst, _) in recovery.trial_instances(self.storage, self.stage).items()}
        busy = sorted({i for t, i in where.items() if i is not None and t not in self.done})
        lost = {i: why for i in busy if (why := self.watch.reason(i)) is not None}
        return where, lost


# One StageWatch per (event loop, run, stage, how the instances are watched) in this process.
_WATCHES: dict[tuple[Any, ...], StageWatch] = {}


class TrialResultTrigger(BaseTrigger):
    """
    Wait on the triggerer for one trial's result of one stage in a tuning run's storage.

    Waits until the trial's result of the stage exists (``trials/<trial>/stage-<stage>.json``, or
    that of its newest try after a clear: ``stage-<stage>.try-<k>.json``), then fires with
    ``{"trial", "stage", "result"}``. The triggers of one stage in a triggerer share a
    ``StageWatch``: one listing of the stage's results per poll interval, one look at its
    instances per liveness interval. Fires with a failed result, ``"lost": True`` and the lost
    ``"instance"`` instead when the trial's instance is lost (see ``Liveness``), so a dead
    instance cannot stall the run while the rest of the fleet bills: the sensor then has the
    trial placed again. Given the spec and the run's ids, the trigger makes the run's backend
    and asks it about the instance (a dead agent or a terminated instance is noticed at the next
    look, not after the heartbeat silence). Storage and the backend are called in threads, off
    the triggerer's event loop.

    :param run_uri: the run's storage root, ``<storage>/<dag_id>/<run_id>``
    :param trial: the trial id, e.g. ``trial-0003``; None for the one at the task's map index in the
        stage's placement (a wait started on the triggerer)
    :param stage: the stage (from 1) whose result to wait for
    :param poll_interval: seconds between reads of the result
    :param silent_seconds: the instance is lost when its heartbeat has not changed for this long
    :param boot_seconds: the instance is lost when no heartbeat appeared this long after the wait
        began; None for ``boot_limit`` of the run's plan
    :param liveness_interval: seconds between looks at the instance
    :param storage_conn_id: the Airflow connection run storage is reached through; None for
        fsspec's own credentials (local paths always use them)
    :param spec_path: the tuning spec, from which the run's backend is made; None to go by
        heartbeats alone
    :param dag_id: the tuning DAG's id (with ``spec_path``)
    :param run_id: the DAG run's id (with ``spec_path``)
    :param finish_task: end the task on the triggerer when the trial is done (``TaskSuccessEvent``
        with the sensor's XCom), instead of resuming the sensor on a worker
    """

    def __init__(self, run_uri: str, trial: str | None, stage: int, poll_interval: float = 5.0,
                 silent_seconds: float = SILENT_SECONDS, boot_seconds: float | None = BOOT_SECONDS,
                 liveness_interval: float = LIVENESS_INTERVAL, storage_conn_id: str | None = None,
                 spec_path: str | None = None, dag_id: str | None = None, run_id: str | None = None,
                 finish_task: bool = False) -> None:
        super().__init__()
        self.run_uri = run_uri
        self.trial = trial
        self.stage = stage
        self.poll_interval = poll_interval
        self.silent_seconds = silent_seconds
        self.boot_seconds = boot_seconds
        self.liveness_interval = liveness_interval
        self.storage_conn_id = storage_conn_id
        self.spec_path = spec_path
        self.dag_id = dag_id
        self.run_id = run_id
        self.finish_task = finish_task

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """The class path and every constructor argument, as the triggerer recreates the trigger."""
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"run_uri": self.run_uri, "trial": self.trial, "stage": self.stage,
                 "poll_interval": self.poll_interval, "silent_seconds": self.silent_seconds,
                 "boot_seconds": self.boot_seconds, "liveness_interval": self.liveness_interval,
                 "storage_conn_id": self.storage_conn_id, "spec_path": self.spec_path, "dag_id": self.dag_id,
                 "run_id": self.run_id, "finish_task": self.finish_task})

    def backend(self, storage: RunStorage) -> ComputeBackend | None:
        """The run's backend (blocking: call it in a thread), or None without a spec."""
        if not (self.spec_path and self.dag_id and self.run_id):
            return None
        from rubberband_airflow.hooks.backend import backend_of_run

        return backend_of_run(self.spec_path, storage, self.dag_id, self.run_id)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        ti = self.task_instance  # started on the triggerer: the run's ids are its task instance's
        if self.spec_path and ti is not None:
            self.dag_id, self.run_id = self.dag_id or ti.dag_id, self.run_id or ti.run_id
        key = (asyncio.get_running_loop(), self.run_uri, self.storage_conn_id, self.stage, self.spec_path, self.dag_id,
               self.run_id, self.silent_seconds, self.boot_seconds)
        watch = _WATCHES.setdefault(key, StageWatch(self.stage, self.silent_seconds, self.boot_seconds))
        watch.users += 1
        try:
            storage = await watch.open(self)
            if self.trial is None:  # started on the triggerer: its trial is at its map index in the placement
                self.trial = watch.placed[ti.map_index]
            if self.boot_seconds is None:
                self.boot_seconds = watch.boot_seconds
            async for event in self._wait(watch, storage):
                yield event
                return
        finally:
            watch.users -= 1
            if watch.users == 0 and _WATCHES.get(key) is watch:
                del _WATCHES[key]

    async def _wait(self, watch: StageWatch, storage: RunStorage) -> AsyncIterator[TriggerEvent]:
        began = time.monotonic()
        while True:
            done = await watch.results(self.poll_interval)
            if self.trial in done:
                # The trial's newest try (a failed trial run again after a clear has a later one) counts.
                read = functools.partial(storage.read_result, self.trial, self.stage, done[self.trial])
                result = await watch.patiently(read, "reading a result")
                if result is not None and result is not _FAILED:
                    self.log.info("%s has a result for stage %s: %s", self.trial, self.stage, result.get("state"))
                    yield self._event(result)
                    return
            if await watch.look(self.liveness_interval) >= began:  # a look since this wait began
                instance = watch.where.get(self.trial)
                reason = watch.lost.get(instance) if instance is not None else None
                boot = float(self.boot_seconds or 0)
                if instance is None and time.monotonic() - began > boot:
                    reason = (f"no instance (the trial was never placed) sent a heartbeat within "
                              f"{boot:g} s: its agent never started")
                if reason is not None:
                    self.log.warning("%s of stage %s is lost: %s", self.trial, self.stage, reason)
                    yield TriggerEvent({"trial": self.trial, "stage": self.stage, "lost": True, "instance": instance,
                                        "result": lost_result(self.stage, reason, instance)})
                    return
            await asyncio.sleep(watch.next_listing(self.poll_interval))

    def _event(self, result: dict[str, Any]) -> TriggerEvent:
        """The event of a result: with ``finish_task``, a done trial ends its task here (its XCom the
        sensor's), so the task never goes back to a worker; anything else resumes the sensor."""
        if self.finish_task and result.get("state") == "done":
            return TaskSuccessEvent(xcoms={"return_value": {"trial": self.trial, "stage": int(self.stage),
                                                            "metric": result.get("metric")}})
        return TriggerEvent({"trial": self.trial, "stage": self.stage, "result": result})
