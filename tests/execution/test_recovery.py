"""Lost work is re-run, not dropped: an instance lost mid-stage (its agent's process group killed
with SIGKILL, or the instance terminated from outside on EC2) has its trials placed again in the
same stage, where they resume from their last checkpoint; the report lists the recovery."""

import os
import signal
import threading
import time

import pytest

from rubberband_airflow.execution import checkpoint, recovery
from rubberband_airflow.execution.runner import RunSpec, run_sha
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.report import build_report, summary_lines
from tests.execution.conftest import agent_processes, plan_json
from tests.execution.moto_cloud import moto_cloud  # noqa: F401 (the fixture)
from tests.execution.test_run_view import fleet_events

SPEC = RunSpec("tests.trainables:steady", "accuracy", "max", seed=3)
CONFIGS = [{"lr": 0.05 * (k + 1)} for k in range(4)]
EPOCHS = 4  # in stage 1; stage 2 trains to 8


class Fault(threading.Thread):
    """Once the second instance of stage 1 runs a trial that has checkpointed ``min_epoch`` epochs,
    injects the fault (``kill(instance, heartbeat)``) and records what it saw."""

    def __init__(self, storage: RunStorage, kill, min_epoch: int = 2) -> None:
        super().__init__(daemon=True)
        self.storage, self.kill, self.min_epoch = storage, kill, min_epoch
        self.seen: dict = {}
        self.error: str | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            ledger = [e for e in self.storage.ledger() if e.get("batch") == "stage-1-batch-0"]
            if len(ledger) == 2:
                instance = ledger[1]["instance"]
                beat = self.storage.heartbeat(instance) or {}
                # The trial running there now: checkpointed in stage 1 and without a result (the
                # heartbeat's list of running trials can be seconds old).
                tasks = (self.storage.read_json("stages", "1", f"{instance}.json") or {}).get("tasks", [])
                for trial in [t["trial"] for t in tasks if self.storage.read_result(t["trial"], 1) is None]:
                    info = checkpoint.read_info(self.storage, trial)
                    if beat and info is not None and info.stage == 1 and info.epoch >= self.min_epoch:
                        pid = next((m["pid"] for m in self.storage.metrics(trial) if m["epoch"] == info.epoch), None)
                        if pid is None:
                            continue
                        self.kill(instance, beat)
                        # The instance's trials still without a result: the one running and any queued
                        # after it (a trial that ended before the fault has its result and stays).
                        tasks = (self.storage.read_json("stages", "1", f"{instance}.json") or {}).get("tasks", [])
                        pending = [t["trial"] for t in tasks if self.storage.read_result(t["trial"], 1) is None]
                        self.seen = {"instance": instance, "trial": trial, "epoch": info.epoch, "time": time.time(),
                                     "worker_pid": pid, "pending": pending}
                        return
            time.sleep(0.1)
        self.error = "the fault was never injected: no trial of the second instance checkpointed in time"


def _check_recovered_run(storage: RunStorage, out: dict, fault: Fault) -> None:
    """What a user checks in the morning after a night with a lost instance."""
    assert fault.error is None, fault.error
    lost, trial, seen = fault.seen["instance"], fault.seen["trial"], fault.seen["epoch"]
    first, second = out["stages"]
    assert first["failed"] == [] and second["failed"] == [], out["stages"]
    assert sorted(first["trials"]) == [f"trial-{k:04d}" for k in range(4)]
    for t in first["trials"]:  # every trial of the lost instance too: done, not dropped
        assert storage.read_result(t, 1)["state"] == "done", storage.read_result(t, 1)

    [record] = recovery.records(storage, 1)
    assert record["lost"] == lost and record["errors"] == {}
    moved = {t["trial"]: t for t in record["trials"]}
    assert trial in moved and set(moved) <= set(fault.seen["pending"])  # the running trial and any queued after it
    resumed_at = moved[trial]["from_epoch"]
    assert seen <= resumed_at < EPOCHS
    queued = [t for t in moved if t != trial]
    assert all(moved[t]["from_epoch"] == 0 for t in queued)
    for t, m in moved.items():
        assert m["to"] != lost and storage.read_result(t, 1)["instance"] == m["to"]

    # The resumed trial: the epochs before the loss were not trained again, the rest went on from
    # the checkpoint (its state evolves as w = (1 - lr)^epoch: from scratch would start over).
    metrics = [m for m in storage.metrics(trial) if m["stage"] == 1]
    lr = storage.read_config(trial)["lr"]
    assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1))
    for m in metrics:
        assert m["loss"] == pytest.approx((1 - lr) ** m["epoch"], rel=1e-5)
        if m["epoch"] <= resumed_at:
            assert m["started_from"] == 0 and m["pid"] == fault.seen["worker_pid"] and m["time"] < fault.seen["time"]
        else:
            assert m["started_from"] == resumed_at and m["pid"] != fault.seen["worker_pid"]
    assert storage.read_result(trial, 1)["resumed_from_epoch"] == resumed_at
    for t in queued:  # a trial that had not started there starts from scratch where it went
        assert [m["started_from"] for m in storage.metrics(t) if m["stage"] == 1] == [0] * EPOCHS

    # Nothing is left running; the lost instance's termination is in the ledger.
    ledger = {e["instance"]: e for e in out["ledger"]}
    assert ledger[lost]["terminated"] is not None
    assert all(e["terminated"] is not None for e in ledger.values())
    # Trials go to idle slots of live instances first, and to one replacement only where none is free.
    replacements = [i for i, e in ledger.items() if e["batch"] == f"stage-1-recover-{lost}"]
    assert len(replacements) <= 1 and all(m["to"] in ledger for m in moved.values())
    assert bool(replacements) == any(m["to"] in replacements for m in moved.values())

    report = build_report(storage, "recovery-test")
    [rec] = report["recoveries"]
    assert rec["stage"] == 1 and rec["lost"] == lost and bool(rec["replacement"]) == bool(replacements)
    assert {t["trial"] for t in rec["trials"]} == set(moved)
    assert rec["lost_idle_seconds"] >= 0 and (rec["replacement_seconds"] > 0) == bool(replacements)
    assert rec["extra_seconds"] == pytest.approx(rec["lost_idle_seconds"] + rec["replacement_seconds"])
    assert rec["extra_usd"] == pytest.approx(rec["extra_seconds"] / 3600.0)  # every instance at $1/h
    assert any(line.startswith("Recovery in stage 1:") and f"{trial} from epoch {resumed_at}" in line
               for line in summary_lines(report))
    # The run view marks it on the fleet chart when it happened, with where each trial went.
    [mark] = fleet_events(storage).values()
    assert mark["label"] == f"recovery of {lost}" and mark["kind"] == "recovery"
    assert mark["t"] == pytest.approx(record["time"] - storage.read_json("run.json")["started"], abs=1e-3)
    assert all(f"{t} to {m['to']} from epoch {m['from_epoch']}" in mark["detail"] for t, m in moved.items())


def test_an_agent_killed_mid_trial_loses_no_trial_and_its_trials_resume(storage, local_backend, env):
    env["RUBBERBAND_TEST_EPOCH_SECONDS"] = "0.6"
    backend = local_backend(slots=1)
    plan = plan_json("local-1", 1, [(1, 2), (1, 1)], num_trials=4, eta=2, min_epochs=EPOCHS)
    fault = Fault(storage, lambda instance, beat: os.killpg(beat["pid"], signal.SIGKILL))
    fault.start()
    began = time.monotonic()
    out = run_sha(storage, backend, SPEC, CONFIGS, plan, stage_timeout=300)
    fault.join(timeout=5)
    _check_recovered_run(storage, out, fault)
    record = recovery.records(storage, 1)[0]
    assert record["time"] - fault.seen["time"] < 60  # noticed within about a minute (a dead pid)
    assert "the backend says it is terminated" in record["reason"]
    assert time.monotonic() - began < 280
    assert backend.live() == [] and agent_processes(storage) == []


def test_an_instance_terminated_from_outside_mid_stage_loses_no_trial_on_ec2(moto_cloud):
    from rubberband_airflow.execution import prices
    from rubberband_airflow.execution.backends.ec2 import EC2Backend

    storage = moto_cloud.storage("tune_digits/run-lost")
    backend = EC2Backend(storage, "g5.xlarge", moto_cloud.image_id, moto_cloud.subnets, [moto_cloud.security_group],
                         moto_cloud.instance_profile, dag_id="tune_digits", run_id="manual__lost",
                         slots=prices.lookup("g5.xlarge").gpus, trial_timeout=120, client=moto_cloud.client("ec2"))
    plan = plan_json("g5.xlarge", 1, [(1, 2), (1, 1)], num_trials=4, eta=2, min_epochs=EPOCHS)
    moto_cloud.hypervisor.env["RUBBERBAND_TEST_EPOCH_SECONDS"] = "0.6"  # what the instances' agents run with
    client = moto_cloud.client("ec2")
    fault = Fault(storage, lambda instance, beat: client.terminate_instances(InstanceIds=[instance]))
    fault.start()
    out = run_sha(storage, backend, SPEC, CONFIGS, plan, stage_timeout=300)
    fault.join(timeout=5)
    _check_recovered_run(storage, out, fault)
    assert moto_cloud.instances(dag_id="tune_digits", run_id=backend.run_id) == []
    moto_cloud.hypervisor.sync()
    assert agent_processes(storage) == []
