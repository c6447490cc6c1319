"""The embedded default backend: an "instance" is a local agent process with a number of slots.

A slot is a GPU where the machine has them and a CPU core where it does not; the instance type
says how many slots an instance has, and ``max_instances`` keeps the machine from being
oversubscribed, so that the speed the profiler measured is the speed a run gets (only a spec
whose trainable does not compute may opt out: ``backend.oversubscribe``). Pending and boot
latency can be injected so the planning model's latencies are exercised.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import psutil

from rubberband_airflow.execution import backoff
from rubberband_airflow.execution.backends.base import ComputeBackend, Market, refuse_if_superseded
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.errors import ProblemError

log = logging.getLogger(__name__)

AGENT_MODULE = "rubberband_airflow.execution.agent"
# Processes this Python process started, so their exit can be reaped (no zombies).
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class LocalInstanceType:
    name: str = "local"
    slots: int = 1
    pending_seconds: float = 0.0
    boot_seconds: float = 0.0
    price_per_hour: float = 0.0

    def max_instances(self) -> int:
        """How many such instances fit on this machine without sharing a core or GPU; an error
        naming ``backend.slots`` if not even one does."""
        have = machine_slots()
        if self.slots > have:
            raise ProblemError("backend.slots", f"{self.slots} slots do not fit this machine's {have} GPUs (or CPU "
                               "cores, where it has no GPU): a trial would share a core and run slower than "
                               "profiled (backend.oversubscribe is for a trainable that does not compute)")
        return have // self.slots


def poll_seconds(storage: RunStorage) -> float:
    """How often a local agent looks for work: 0.2 s on a local disk; 1 s on object storage, where
    each look is a few requests (16 agents at 0.2 s were hundreds of requests a second)."""
    return 0.2 if storage.uri.startswith(("file://", "/")) else 1.0


def machine_slots() -> int:
    """GPUs of this machine, or its usable CPU cores where it has none."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class LocalBackend(ComputeBackend):
    def __init__(self, storage: RunStorage, instance_type: LocalInstanceType, trial_timeout: float = 3600.0,
                 env: dict[str, str] | None = None, idle_timeout: float | None = None) -> None:
        self.storage = storage
        self.instance_type = instance_type
        self.trial_timeout = trial_timeout
        # An agent with nothing to run this long exits: one whose orchestrator is gone ends too.
        self.idle_timeout = idle_timeout if idle_timeout is not None else 2 * trial_timeout
        self.env = env

    def launch(self, batch: str, count: int, market: Market | None = None) -> list[str]:
        if market == Market.SPOT:
            raise ValueError(f"batch {batch!r} asks for spot instances: the local backend has no spot market "
                             "(plan it on demand, or run it on the ec2 backend)")
        refuse_if_superseded(self.storage)
        self.adopt()  # an agent of this batch started by a try whose ledger write failed is not started twice
        existing = {e["instance"] for e in self.storage.ledger() if e.get("batch") == batch}
        t = self.instance_type
        ids = []
        for k in range(count):
            instance = f"local-{batch}-{k}"
            ids.append(instance)
            if instance in existing:
                continue
            requested = time.time()
            cmd = [sys.executable, "-m", AGENT_MODULE, "--run", self.storage.uri,
                   "--instance", instance, "--slots", str(t.slots), "--trial-timeout", str(self.trial_timeout),
                   "--pending-seconds", str(t.pending_seconds), "--boot-seconds", str(t.boot_seconds),
                   "--poll-seconds", str(poll_seconds(self.storage)), "--idle-timeout", str(self.idle_timeout)]
            process = subprocess.Popen(cmd, start_new_session=True, env=self.env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            _CHILDREN[process.pid] = process
            self._record(instance, process.pid, requested)
        return ids

    def _record(self, instance: str, pid: int, requested: float, terminated: float | None = None) -> None:
        """A new agent's ledger entry (create-only: an entry already there, adopted and perhaps
        terminated since, stands)."""
        t = self.instance_type
        self.storage.create_json({"instance": instance, "batch": instance.removeprefix("local-").rsplit("-", 1)[0],
                                  "type": t.name, "slots": t.slots, "pid": pid, "requested": requested,
                                  "running": requested if t.pending_seconds == 0 else None, "ready": None,
                                  "terminated": terminated}, "ledger", f"{instance}.json")

    def _owns_group(self, pid: int, instance: str) -> bool:
        """Whether the process group ``pid`` is still the instance's agent's: led by that agent, or
        by no process (its workers outlived it). A pid the system gave to another process after the
        agent ended is not (its process group is not this run's)."""
        try:
            cmd = psutil.Process(pid).cmdline()
        except psutil.NoSuchProcess:
            return True
        except psutil.AccessDenied:
            return False
        return (AGENT_MODULE in cmd and _option(cmd, "--run") == self.storage.uri
                and _option(cmd, "--instance") == instance)

    def _agents(self) -> dict[str, psutil.Process]:
        """This run's agent processes on this machine, by instance (whatever the ledger says)."""
        found = {}
        for p in psutil.process_iter(["cmdline", "create_time"]):
            cmd = p.info["cmdline"] or []
            if AGENT_MODULE in cmd and _option(cmd, "--run") == self.storage.uri and p.pid == _session_leader(p):
                instance = _option(cmd, "--instance")
                if instance:
                    found[instance] = p
        return found

    def adopt(self) -> list[str]:
        """This run's agent processes on this machine whose instance the ledger lacks (spawned,
        but the ledger write failed) get their entries."""
        known = {e["instance"] for e in self.storage.ledger()}
        lost = {i: p for i, p in self._agents().items() if i not in known}
        for instance, p in sorted(lost.items(), key=lambda x: x[1].info["create_time"]):
            self._record(instance, p.pid, p.info["create_time"])
        return list(lost)

    def terminate_all(self) -> list[str]:
        """Terminate every agent the run has: those the ledger lists, then any other of this run's
        agent processes (also when the ledger cannot be read or written)."""
        ids: list[str] = []
        try:
            ids = super().terminate_all()
        finally:
            for instance, p in self._agents().items():
                _stop_group(p.pid)
                if instance not in ids:
                    ids.append(instance)
                    try:  # its time in the bill, where storage lets it be recorded
                        self._record(instance, p.pid, p.info["create_time"], terminated=time.time())
                    except backoff.STORAGE_ERRORS as e:
                        log.warning("could not record the end of %s in the ledger: %s", instance, e)
        return ids

    def _entry(self, instance: str) -> dict[str, Any]:
        entry = self.storage.read_json("ledger", f"{instance}.json")
        if entry is None:
            raise KeyError(f"instance {instance} is not in this run's ledger")
        if entry.get("running") is None:
            marker = self.storage.read_json("instances", instance, "running.json")
            if marker:
                entry["running"] = marker["running"]
        return entry

    def describe(self, instances: list[str]) -> dict[str, str]:
        out = {}
        for instance in instances:
            e = self._entry(instance)
            if e.get("terminated") is not None or not _alive(e["pid"]):
                out[instance] = "terminated"
            else:
                out[instance] = "running" if e.get("running") is not None else "pending"
        return out

    def terminate(self, instances: list[str]) -> None:
        """Stop every agent first, then record when in the ledger (a storage error stops none the less)."""
        stopped = []
        for instance in instances:
            e = self._entry(instance)
            if e.get("terminated") is None:
                if self._owns_group(int(e["pid"]), instance):
                    _stop_group(e["pid"])
                else:
                    log.warning("%s's agent (pid %s) is gone and its pid now leads another process: not "
                                "signalled", instance, e["pid"])
                stopped.append({**e, "terminated": time.time()})
        for e in stopped:
            self.storage.write_ledger(e)


def _option(cmd: list[str], name: str) -> str | None:
    """The value given to option ``name`` on a command line, or None."""
    return cmd[cmd.index(name) + 1] if name in cmd[:-1] else None


def _session_leader(p: psutil.Process) -> int | None:
    """The process that leads ``p``'s session (an agent leads its own), or None if it is gone."""
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _stop_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the agent's process group, then SIGKILL what is left after ``grace`` seconds (a
    stopped, hung group is continued, so that it ends at the SIGTERM as a machine going down does)."""
    try:
        os.killpg(pid, signal.SIGTERM)
        os.killpg(pid, signal.SIGCONT)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline and _alive(pid):
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.wait()
