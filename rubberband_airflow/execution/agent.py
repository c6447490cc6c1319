"""The instance agent (``rubberband-agent``): one per instance, it runs the trials assigned to it.

It announces itself with a heartbeat (the first one after boot marks the instance ready),
takes the trials assigned to it stage by stage from the run's storage, runs each in a worker
process on ``gpus_per_trial`` of its slots (GPUs, or CPU cores where there are none), records
each trial as done or failed with the reason (a crash, a NaN, a timeout), and stops when its
``stop`` file appears or it receives SIGTERM (the instance is being terminated), or, given an
idle timeout, when it has had nothing to run for that long (the orchestrator is gone: on EC2 the
instance then powers off and terminates). The run URI, the instance id and the slot count are
all it is given; hyperparameters come from storage.

On EC2 it also watches the metadata service for a spot interruption notice. At one it starts no
new trial, asks its running trials to stop at their next checkpoint (SIGUSR1: see
``execution.interruption``), waits for them until shortly before the interruption, and exits
with its heartbeat marked stopping and interrupted: the orchestrator places its unfinished
trials again at once, and they resume from their checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import multiprocessing.forkserver as _forkserver
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psutil

from rubberband_airflow.execution import worker
from rubberband_airflow.execution.backoff import MAX_BACKOFF_SECONDS, retry
from rubberband_airflow.execution.storage import RunStorage

log = logging.getLogger(__name__)

# How long a worker gets to die after SIGKILL before the agent leaves it (the heartbeat then
# shows it past its limit, and the runner retires the instance).
KILL_WAIT_SECONDS = 10.0
# How long the agent keeps asking EC2's metadata service for its id at boot.
IMDS_PATIENCE_SECONDS = 300.0
# How often the agent asks the metadata service for a spot interruption notice (AWS suggests 5 s;
# a notice comes two minutes ahead).
SPOT_POLL_SECONDS = 5.0
# After a notice, running trials get until this long before the interruption to reach a checkpoint.
SPOT_MARGIN_SECONDS = 15.0
SPOT_NOTICE_SECONDS = 120.0  # the notice's lead time, where its time cannot be read
# Trials start as forks of a server that imported the worker and the storage's filesystem once:
# an interpreter start and those imports were a CPU-second per trial, and on a 2-core machine a
# hundred trials starting at once waited half a minute for them.
_FORKS = multiprocessing.get_context("forkserver")
# Its S3 clients' service models too (``trial_clients``): parsing them was half of what remained.
_FORKS.set_forkserver_preload(["rubberband_airflow.execution.worker", "rubberband_airflow.execution.trial_clients",
                               "s3fs", "gcsfs", "adlfs"])


class TrialProcess:
    """A trial's worker, forked from the agent's fork server; waited for like a ``Popen``."""

    def __init__(self, argv: list[str], env: dict[str, str], stderr: str, task: dict[str, Any] | None = None,
                 spec: dict[str, Any] | None = None) -> None:
        self._process = _FORKS.Process(target=worker.forked_main, args=(argv, env, stderr, task, spec),
                                       name="rubberband-trial")
        self._process.start()
        assert self._process.pid is not None
        self.pid: int = self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired("rubberband-trial", timeout or 0.0)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


@dataclass
class _Running:
    task: dict[str, Any]
    slots: list[int]
    process: TrialProcess
    started: float
    limit: float  # seconds the trial may run
    stderr: Any = None  # the worker's stderr, a temporary file
    timed_out: bool = False
    tail: str | None = None  # the end of the worker's stderr, once it exited

    def overdue(self, now: float) -> bool:
        return now - self.started > self.limit


@dataclass
class Agent:
    storage: RunStorage
    instance: str
    slots: int
    trial_timeout: float = 3600.0  # the limit of a task whose assignment gives none
    poll_seconds: float = 0.5
    heartbeat_seconds: float = 5.0
    idle_timeout: float | None = None  # seconds with no trial running or assigned before it exits
    imds: Imds | None = None  # EC2's metadata service, watched for a spot interruption notice
    interruption: dict[str, Any] | None = None  # the spot interruption notice, once there is one
    running: list[_Running] = field(default_factory=list)
    seen: set[tuple[int, str, int]] = field(default_factory=set)  # (stage, trial, try)
    stopping: bool = False
    ready_at: float | None = None
    _last_beat: float = 0.0
    _busy: float = field(default_factory=time.monotonic)  # when it last had a trial running or assigned
    _failures: int = 0  # steps failed in a row (storage weather)
    _spot_checked: float = float("-inf")  # monotonic time of the last look for a notice
    _run: dict[str, Any] | None = None  # run.json, read once: the run writes it before any trial is assigned

    def free_slots(self) -> list[int]:
        busy = {s for r in self.running for s in r.slots}
        return [s for s in range(self.slots) if s not in busy]

    def beat(self, force: bool = False, **extra: Any) -> None:
        now = time.time()
        if not force and now - self._last_beat < self.heartbeat_seconds:
            return
        self._last_beat = now
        self.storage.write_json({"instance": self.instance, "time": now, "ready": self.ready_at, "pid": os.getpid(),
                                 "slots": self.slots, "state": "stopping" if self.stopping else "ready",
                                 "running": [[r.task["stage"], r.task["trial"]] for r in self.running],
                                 "tasks": [{"stage": r.task["stage"], "trial": r.task["trial"], "started": r.started,
                                            "limit_seconds": r.limit} for r in self.running],
                                 **({"interruption": self.interruption} if self.interruption else {}), **extra},
                                "instances", self.instance, "heartbeat.json")

    def pending(self) -> Iterator[dict[str, Any]]:
        """Assigned tasks not yet started here and not yet finished (a restarted agent skips those),
        in order. Lazily: a task's result is looked for only when it is next, not for every task
        of a long queue at every step (256 trials on one instance were 256 GETs a step)."""
        for task in self.storage.assignments(self.instance):
            key = _key(task)
            if key in self.seen:
                continue
            if self.storage.read_result(task["trial"], task["stage"], key[2]) is not None:
                self.seen.add(key)
                continue
            yield task

    def start(self, task: dict[str, Any], slots: list[int]) -> None:
        if self._run is None:
            self._run = self.storage.read_json("run.json")
        env = {**os.environ, "RUBBERBAND_SLOTS": ",".join(map(str, slots)), "OMP_NUM_THREADS": "1",
               "RUBBERBAND_SPAWNED": repr(time.time())}
        argv = [self.storage.uri, task["trial"], str(task["stage"]), self.instance, "--try", str(_key(task)[2])]
        # Workers stay in the agent's process group: terminating the instance ends them too. Their
        # stderr goes to a file (a pipe would block a worker that writes much), whose tail explains a crash.
        stderr = tempfile.NamedTemporaryFile(prefix="rubberband-trial-", suffix=".stderr")
        process = TrialProcess(argv, env, stderr.name, task, self._run)
        self.seen.add(_key(task))
        limit = float(task.get("limit_seconds") or self.trial_timeout)
        self.running.append(_Running(task, slots, process, time.time(), limit, stderr))

    def reap(self) -> None:
        """Record what finished; fail what crashed without a result or ran past its limit.

        A trial leaves ``running`` only once its result is recorded (by its worker or here), so a
        storage error on the way is tried again at the next step; a result is written once, so
        one recorded first (say by the orchestrator, after the stage ended) stands.
        """
        for r in list(self.running):
            code = r.process.poll()
            if code is None and not self.stopping and r.overdue(time.time()):  # stopping: not its fault
                r.timed_out = True
                _kill_tree(r.process)
                try:
                    code = r.process.wait(timeout=KILL_WAIT_SECONDS)
                except subprocess.TimeoutExpired:
                    log.error("%s of stage %s does not die past its limit", r.task["trial"], r.task["stage"])
            if code is None:
                continue
            if r.tail is None:
                r.tail = _tail(r.stderr)
            if r.timed_out:
                reason = f"timed out after {r.limit:g} s"
            elif self.storage.read_result(r.task["trial"], r.task["stage"], _key(r.task)[2]) is not None:
                self.running.remove(r)
                continue
            elif self.stopping or self.interruption:  # the instance is going: not the trial's fault, it is re-placed
                continue
            else:
                tail = " | ".join(r.tail.strip().splitlines()[-3:])
                reason = _exit_reason(code) + (f": {tail}" if tail else "")
            self.storage.write_result(r.task["trial"], r.task["stage"], {
                "state": "failed", "error": reason, "instance": self.instance, "stage": r.task["stage"],
                "started": r.started, "finished": time.time()}, _key(r.task)[2])
            self.running.remove(r)

    def step(self) -> None:
        had = [r.task for r in self.running]
        self.reap()
        # With every slot busy nothing could start: no listing of the assignments (requests on S3)
        pending = False
        for task in self.pending() if self.free_slots() else ():
            pending = True
            free = self.free_slots()
            if int(task["gpus"]) > len(free):
                break  # keep the assigned order: the next task waits for slots
            self.start(task, free[: int(task["gpus"])])
        if pending or self.running:
            self._busy = time.monotonic()
        # A trial started or ended is in the heartbeat at once: a watcher times a hang from there.
        self.beat(force=[r.task for r in self.running] != had)

    def idle_too_long(self) -> bool:
        return self.idle_timeout is not None and time.monotonic() - self._busy > self.idle_timeout

    def stop_requested(self) -> bool:
        return self.stopping or self.storage.exists("instances", self.instance, "stop")

    def shutdown(self, **extra: Any) -> None:
        """End the running trials and record them as failed; storage errors here are only logged."""
        self.stopping = True
        for r in self.running:
            _kill_tree(r.process)
        for r in self.running:
            try:
                r.process.wait(timeout=KILL_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                log.error("%s of stage %s does not die", r.task["trial"], r.task["stage"])
        for record in (self.reap_after_stop, lambda: self.beat(force=True, **extra)):
            try:
                record()
            except Exception:
                log.exception("could not record the agent's stop")

    def reap_after_stop(self) -> None:
        """Trials the stop interrupted get no result: not their fault; the orchestrator places them
        again (a lost instance) or records them as unfinished (the run is over)."""
        self.running.clear()

    def spot_notice(self) -> dict[str, Any] | None:
        """The spot interruption notice, asked for every SPOT_POLL_SECONDS (None: none yet, or not
        asked this time). A metadata service error raises, and the agent backs off as for storage."""
        if self.imds is None or time.monotonic() - self._spot_checked < SPOT_POLL_SECONDS:
            return None
        self._spot_checked = time.monotonic()
        body = self.imds.get("spot/instance-action")
        if body is None:
            return None
        try:
            notice = json.loads(body)
        except ValueError:
            notice = None
        return notice if isinstance(notice, dict) else {"action": "terminate", "time": None}

    def interrupted(self, notice: dict[str, Any]) -> None:
        """At a spot interruption notice: start nothing more, ask the running trials to stop at
        their next checkpoint, and give them until SPOT_MARGIN_SECONDS before the interruption."""
        log.warning("spot interruption notice: %s; %d trials to checkpoint", notice, len(self.running))
        self.interruption = {**notice, "noticed": time.time()}
        for r in self.running:
            _signal_tree(r.process, signal.SIGUSR1)
        deadline = time.monotonic() + _seconds_until(notice.get("time")) - SPOT_MARGIN_SECONDS
        while any(r.process.poll() is None for r in self.running) and time.monotonic() < deadline:
            try:
                self.reap()
                self.beat()
            except Exception as e:  # storage weather: the deadline stands
                log.warning("while draining: %s: %s", type(e).__name__, e)
            time.sleep(self.poll_seconds)

    def run(self) -> None:
        while True:
            try:
                if self.stop_requested():
                    break
                if self.ready_at is None:
                    self.ready_at = time.time()
                    self.beat(force=True)  # the first heartbeat: the instance is ready
                notice = self.spot_notice()
                if notice is not None:
                    self.interrupted(notice)
                    break
                self.step()
                self._failures = 0
            except Exception as e:  # storage weather: back off and try again
                self._failures += 1
                if any(r.process.poll() is None for r in self.running):
                    self._busy = time.monotonic()  # a trial still runs: the agent is not idle
                delay = min(MAX_BACKOFF_SECONDS, self.poll_seconds * 2 ** self._failures)
                log.warning("step failed (%s: %s); trying again in %.1f s", type(e).__name__, e, delay)
                if self.idle_too_long():
                    log.error("nothing ran and storage failed for %g s: the agent exits", self.idle_timeout)
                    self.shutdown(idle_exit=True)
                    return
                time.sleep(delay)
                continue
            if self.idle_too_long():
                log.info("nothing to run for %g s: the agent exits", self.idle_timeout)
                self.shutdown(idle_exit=True)
                return
            time.sleep(self.poll_seconds)
        self.shutdown()


def _key(task: dict[str, Any]) -> tuple[int, str, int]:
    """A task's stage, trial and try (1 unless a failed trial is run again after a clear)."""
    return int(task["stage"]), str(task["trial"]), int(task.get("try") or 1)


def _tail(f: Any, size: int = 8192) -> str:
    """The end of a worker's stderr file, which is then closed."""
    if f is None:
        return ""
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - size))
    text = f.read().decode(errors="replace")
    f.close()
    return text


def _kill_tree(process: TrialProcess) -> None:
    """Kill a worker and every process it started (its rank processes)."""
    _signal_tree(process, signal.SIGKILL)


def _exit_reason(code: int) -> str:
    """Why a trial's worker ended without a result, from its exit status (negative: a signal)."""
    if code >= 0:
        return f"worker exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    oom = " (the kernel's out-of-memory killer sends it: the trial may need more memory)" if -code == signal.SIGKILL \
        else ""
    return f"the worker was killed by {name}{oom}"


def _signal_tree(process: TrialProcess, sig: int) -> None:
    """Send ``sig`` to a worker's processes (its rank processes first) and the worker."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [*children]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    try:
        process.send_signal(sig)
    except ProcessLookupError:
        pass


def _seconds_until(when: Any) -> float:
    """Seconds until a notice's ISO 8601 time (such as 2026-07-01T02:00:00Z); the usual lead time
    where it has none that reads."""
    try:
        return datetime.fromisoformat(str(when).replace("Z", "+00:00")).timestamp() - time.time()
    except ValueError:
        return SPOT_NOTICE_SECONDS


class Imds:
    """EC2's instance metadata service, with IMDSv2 session tokens (renewed before they expire).

    The endpoint is botocore's: ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` or http://169.254.169.254.
    """

    TOKEN_SECONDS = 300

    def __init__(self, timeout: float = 5.0) -> None:
        self.base = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254").rstrip("/")
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never behind a proxy
        self._token: tuple[str, float] | None = None  # token, monotonic time it is renewed at

    def token(self) -> str:
        if self._token is None or time.monotonic() >= self._token[1]:
            put = urllib.request.Request(f"{self.base}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_SECONDS)})
            with self._opener.open(put, timeout=self.timeout) as r:
                self._token = (r.read().decode(), time.monotonic() + self.TOKEN_SECONDS / 2)
        return self._token[0]

    def get(self, path: str) -> str | None:
        """The metadata at ``/latest/meta-data/<path>``; None where the service has none (404)."""
        get = urllib.request.Request(f"{self.base}/latest/meta-data/{path}",
                                     headers={"X-aws-ec2-metadata-token": self.token()})
        try:
            with self._opener.open(get, timeout=self.timeout) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            if e.code == 401:
                self._token = None  # expired: a new one next time
            raise


def imds_instance_id(timeout: float = 5.0, patience: float = IMDS_PATIENCE_SECONDS, imds: Imds | None = None) -> str:
    """This EC2 instance's id, from the instance metadata service (``imds``, or a new client).

    The service can be slow to answer just after boot: errors are tried again, backing off, for
    ``patience`` seconds.
    """
    imds = imds or Imds(timeout)

    def ask() -> str:
        found = imds.get("instance-id")
        if found is None:
            raise OSError("the metadata service has no instance-id")
        return found.strip()

    # Just after boot the service may refuse, fail or not know yet: any error (URLError and
    # HTTPError are OSErrors) is tried again.
    return retry(ask, "the metadata service", patience, may_pass=lambda e: isinstance(e, OSError))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rubberband-agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the run's storage URI, e.g. s3://bucket/prefix/dag/run")
    p.add_argument("--instance", required=True, help="this instance's id, or 'imds' to ask EC2's metadata service")
    p.add_argument("--slots", type=int, required=True, help="GPUs (or CPU cores) this instance offers")
    p.add_argument("--trial-timeout", type=float, default=3600.0,
                   help="seconds before a trial is failed, where its assignment gives no limit of its own")
    p.add_argument("--pending-seconds", type=float, default=0.0, help="emulated: wait before 'running'")
    p.add_argument("--boot-seconds", type=float, default=0.0, help="emulated: wait from running to ready")
    p.add_argument("--poll-seconds", type=float, default=1.0)  # each look is a few requests to S3
    p.add_argument("--idle-timeout", type=float, help="exit after this many seconds with nothing to run")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    imds = Imds() if a.instance == "imds" else None
    if imds is not None:
        a.instance = imds_instance_id(imds=imds)
    agent = Agent(RunStorage(a.run), a.instance, a.slots, trial_timeout=a.trial_timeout, poll_seconds=a.poll_seconds,
                  idle_timeout=a.idle_timeout, imds=imds)
    def on_sigterm(*_: Any) -> None:  # the instance is going away: end the trials at once
        agent.stopping = True
        for r in agent.running:
            _kill_tree(r.process)

    signal.signal(signal.SIGTERM, on_sigterm)
    time.sleep(a.pending_seconds)
    if a.pending_seconds or a.boot_seconds:
        agent.storage.write_json({"instance": a.instance, "running": time.time()}, "instances", a.instance,
                                 "running.json")
    time.sleep(a.boot_seconds)
    _forkserver.ensure_running()  # the trials' fork server starts with the agent, not with its first trial
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
