"""The agent and its workers: resume exactness, data parallel trials, failing trainables."""

import errno
import os
import signal
import time

import pytest

from rubberband_airflow.execution import worker
from rubberband_airflow.execution.backends.local import LocalBackend, LocalInstanceType
from rubberband_airflow.execution.runner import (
    RunPlan,
    RunSpec,
    assign_stage,
    recorded_launches,
    scale,
    start_run,
    wait_stage,
)
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.search_space import sample
from rubberband_airflow.workloads import digits
from tests.execution.conftest import ROOT, agent_processes, plan_json

CONFIG = {"lr": 0.05, "momentum": 0.9, "width": 64, "dropout": 0.2, "batch_size": 32, "weight_decay": 1e-4}


def _start(storage, trainable="rubberband_airflow.workloads.digits:train", configs=None):
    spec = RunSpec(trainable, "accuracy", "max", seed=5)
    return start_run(storage, spec, configs or [CONFIG], {"instance_type": "local", "stages": []}, 2)


def _task(trial, gpus=1, start=0, stop=2):
    return {"trial": trial, "gpus": gpus, "start_epoch": start, "stop_epoch": stop}


def test_resumed_trial_continues_exactly_where_it_stopped(tmp_path):
    from rubberband_airflow.execution.storage import RunStorage

    straight, split = RunStorage(f"file://{tmp_path}/a"), RunStorage(f"file://{tmp_path}/b")
    for storage in (straight, split):
        _start(storage)
    straight.write_assignment(1, "i0", [_task("trial-0000", stop=4)])
    assert worker.run_task(straight.uri, "trial-0000", 1, "i0", []) == 0
    split.write_assignment(1, "i0", [_task("trial-0000", stop=2)])
    split.write_assignment(2, "i0", [_task("trial-0000", start=2, stop=4)])
    assert worker.run_task(split.uri, "trial-0000", 1, "i0", []) == 0
    assert worker.run_task(split.uri, "trial-0000", 2, "i0", []) == 0
    a, b = straight.metrics("trial-0000"), split.metrics("trial-0000")
    assert [m["epoch"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6)
        assert ma["accuracy"] == pytest.approx(mb["accuracy"], rel=1e-6)


def test_two_gpu_trial_runs_two_synchronised_processes(storage, local_backend):
    backend = local_backend(slots=2)
    _start(storage, "tests.trainables:ddp_probe")
    [instance] = backend.launch("stage-1", 1)
    assign_stage(storage, 1, {instance: [_task("trial-0000", gpus=2, stop=2)]})
    results = wait_stage(storage, backend, 1, ["trial-0000"], timeout=180)
    assert results["trial-0000"]["state"] == "done", results
    probes = [storage.read_json("trials", "trial-0000", f"probe-rank-{r}.json") for r in (0, 1)]
    assert {p["rank"] for p in probes} == {0, 1} and all(p["world_size"] == 2 for p in probes)
    assert probes[0]["pid"] != probes[1]["pid"]  # two worker processes
    assert all(p["backend"] == "gloo" and p["grads_equal"] for p in probes)  # gradients all-reduced
    assert probes[0]["checkpoint_epoch"] == 2
    backend.terminate_all()
    assert agent_processes(storage) == []


@pytest.mark.parametrize("trainable,reason", [
    ("tests.trainables:raises", "ValueError: the learning rate is not a learning rate"),
    ("tests.trainables:nan_metric", "metric loss is nan at epoch 2"),
    ("tests.trainables:hangs", "timed out after 6 s"),
    ("tests.trainables:no_metric", "did not report the metric 'accuracy'"),
    ("tests.trainables:missing", "has no missing"),
    ("tests.trainables:killed", "the worker was killed by SIGKILL (the kernel's out-of-memory killer sends it"),
])
def test_bad_trainable_fails_the_trial_and_the_agent_survives(storage, local_backend, trainable, reason):
    # Only the hang waits for the limit: the others fail by themselves, however slowly a loaded machine starts them.
    backend = local_backend(slots=1, timeout=6 if trainable.endswith(":hangs") else 60)
    _start(storage, trainable, configs=[CONFIG])
    [instance] = backend.launch("stage-1", 1)
    assign_stage(storage, 1, {instance: [_task("trial-0000")]})
    result = wait_stage(storage, backend, 1, ["trial-0000"], timeout=120)["trial-0000"]
    assert result["state"] == "failed" and reason in result["error"], result
    # The agent is still alive and takes the next stage's work.
    assert backend.describe([instance]) == {instance: "running"}
    beat = storage.heartbeat(instance)
    time.sleep(6)
    assert storage.heartbeat(instance)["time"] > beat["time"]
    backend.terminate_all()
    assert agent_processes(storage) == []


def test_launching_the_same_batch_twice_leaves_one_batch(storage, local_backend):
    backend = local_backend(slots=1)
    first = backend.launch("stage-1", 2)
    again = backend.launch("stage-1", 2)
    assert first == again and len(backend.live()) == 2
    backend.terminate_all()
    assert backend.live() == [] and agent_processes(storage) == []


def test_terminating_an_agent_that_ended_long_ago_signals_no_process_that_took_its_pid(storage, local_backend):
    """An agent that died (lost) left its pid in the ledger; the system may give that pid to another
    process, even a process group leader of its own. The teardown must not signal that one."""
    import subprocess

    backend = local_backend(slots=1)
    [instance] = backend.launch("stage-1", 1)
    entry = storage.read_json("ledger", f"{instance}.json")
    os.killpg(entry["pid"], signal.SIGKILL)  # the agent dies with its group
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)  # leads a process group of its own
    try:
        storage.write_json({**entry, "pid": stranger.pid}, "ledger", f"{instance}.json")  # as if its pid came again
        backend.terminate([instance])
        assert stranger.poll() is None  # not signalled
        assert backend.describe([instance]) == {instance: "terminated"} and backend.live() == []
    finally:
        stranger.kill()
        stranger.wait()


def test_terminating_an_instance_ends_its_running_trial(storage, local_backend):
    backend = local_backend(slots=1)
    _start(storage, "tests.trainables:hangs")
    [instance] = backend.launch("stage-1", 1)
    assign_stage(storage, 1, {instance: [_task("trial-0000")]})
    deadline = time.time() + 60
    while time.time() < deadline and not (storage.heartbeat(instance) or {}).get("running"):
        time.sleep(0.2)
    assert agent_processes(storage), "the trial should be running"
    backend.terminate([instance])
    assert agent_processes(storage) == []
    assert backend.describe([instance]) == {instance: "terminated"}
    result = storage.read_result("trial-0000", 1)
    assert result is None or result["state"] == "failed"


def test_search_space_sampling_is_seeded_and_in_range():
    a, b = sample(digits.SEARCH_SPACE, 50, seed=1), sample(digits.SEARCH_SPACE, 50, seed=1)
    assert a == b and a != sample(digits.SEARCH_SPACE, 50, seed=2)
    assert all(1e-3 <= c["lr"] <= 0.5 and c["width"] in (16, 32, 64, 128, 256) for c in a)
    assert len(a[0]) >= 5


def test_the_best_configuration_trains_a_final_model():
    result = digits.train_final(CONFIG, epochs=5)
    assert result["accuracy"] > 0.8 and result["val_loss"] > 0


def test_an_agent_with_nothing_to_run_past_its_idle_timeout_exits(storage, monkeypatch):
    """The backstop for a run whose orchestrator is gone; a trial outlasting the timeout is not idleness."""
    from rubberband_airflow.execution.agent import Agent

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("RUBBERBAND_TEST_SLOW_SECONDS", "4")
    _start(storage, "tests.trainables:slow")
    storage.write_assignment(1, "i0", [_task("trial-0000", stop=1)])
    began = time.monotonic()
    Agent(storage, "i0", 1, poll_seconds=0.1, idle_timeout=2.0).run()
    took = time.monotonic() - began
    assert storage.read_result("trial-0000", 1)["state"] == "done"  # it ran the 4 s trial first
    assert 6.0 <= took < 60 and storage.heartbeat("i0")["idle_exit"] is True
    assert agent_processes(storage) == []


def test_a_retried_start_keeps_the_first_start_time(storage):
    """start_run is a task with a retry: a second attempt must not shorten the run's measured JCT."""
    _start(storage)
    first = storage.read_json("run.json")["started"]
    time.sleep(0.05)
    _start(storage)
    assert storage.read_json("run.json")["started"] == first
    assert storage.read_config("trial-0000") == CONFIG


def test_a_trial_writing_much_to_stderr_is_not_blocked(storage, local_backend):
    backend = local_backend(timeout=60)
    _start(storage, "tests.trainables:chatty")
    [instance] = backend.launch("stage-1", 1)
    assign_stage(storage, 1, {instance: [_task("trial-0000", stop=1)]})
    result = wait_stage(storage, backend, 1, ["trial-0000"], timeout=120)["trial-0000"]
    assert result["state"] == "done", result
    backend.terminate_all()


class _SecondLedgerWriteFails(RunStorage):
    """Run storage whose first write of the second agent's ledger entry fails (a storm), after the
    agent started: the stage's start fails there, its third agent never started."""

    failed = False

    def create_json(self, value, *parts):
        if parts == ("ledger", "local-stage-1-batch-0-1.json") and not self.failed:
            self.failed = True
            raise OSError(errno.EIO, "injected storage error")
        return super().create_json(value, *parts)


def _failed_first_try(tmp_path, env):
    """A stage of three local instances whose start's first try failed mid-launch: storage, backend, plan."""
    storage = _SecondLedgerWriteFails(f"file://{tmp_path}/run")
    _start(storage)
    backend = LocalBackend(storage, LocalInstanceType("local-1", 1), trial_timeout=120, env=env)
    run_plan = RunPlan.from_json(plan_json("local-1", 1, [(1, 3)], num_trials=3, eta=3, min_epochs=1))
    with pytest.raises(OSError, match="injected"):
        scale(backend, run_plan, 1)
    assert len(storage.ledger()) == 1 and len(agent_processes(storage)) == 2
    return storage, backend, run_plan


def _none_left(storage):
    deadline = time.monotonic() + 30
    while agent_processes(storage) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert agent_processes(storage) == []


def test_an_agent_spawned_without_its_ledger_entry_is_adopted_not_launched_again_and_ends_with_the_run(
        tmp_path, env):
    """The retry adopts the second agent, starts only the third, and teardown ends every agent,
    one the ledger lost too."""
    storage, backend, run_plan = _failed_first_try(tmp_path, env)
    try:
        first = {p.pid for p in agent_processes(storage)}
        again = scale(backend, run_plan, 1)
        assert sorted(again["live"]) == [f"local-stage-1-batch-0-{k}" for k in range(3)]
        alive = agent_processes(storage)
        assert len(alive) == 3 and first <= {p.pid for p in alive}  # only the third started now
        [adopted] = [e for e in storage.ledger() if e["instance"] == "local-stage-1-batch-0-1"]
        assert adopted["batch"] == "stage-1-batch-0" and adopted["terminated"] is None

        # An agent the ledger lost at teardown's time is ended by teardown all the same.
        storage.delete("ledger", "local-stage-1-batch-0-0.json")
        assert sorted(backend.terminate_all()) == sorted(again["live"])
    finally:
        backend.terminate_all()
    _none_left(storage)


def test_an_instance_lost_between_a_starts_tries_is_replaced_by_the_retry(tmp_path, env):
    """Between the failed try and its retry the first agent dies: the retry launches the recorded
    batch's missing agent and, under a new batch, one in place of the dead one."""
    storage, backend, run_plan = _failed_first_try(tmp_path, env)
    try:
        dead = next(p for p in agent_processes(storage) if "local-stage-1-batch-0-0" in " ".join(p.cmdline()))
        os.killpg(dead.pid, signal.SIGKILL)
        dead.wait(10)
        again = scale(backend, run_plan, 1)
        assert sorted(again["live"]) == ["local-stage-1-batch-0-1", "local-stage-1-batch-0-2",
                                         "local-stage-1-batch-1-0"]
        assert len(agent_processes(storage)) == 3
        assert [[b.name for b in d] for d in recorded_launches(storage, 1)] == [["stage-1-batch-0"],
                                                                                ["stage-1-batch-1"]]
        assert scale(backend, run_plan, 1)["live"] == again["live"]  # a third try changes nothing
        assert len(agent_processes(storage)) == 3
    finally:
        backend.terminate_all()
    _none_left(storage)


def test_reconcile_forgets_an_instance_that_died_and_keeps_the_rest(storage, local_backend):
    """A dead instance must get no more trials, and a stage that needs it launches a replacement."""
    import os
    import signal

    from rubberband_airflow.execution.runner import RunPlan, reconcile, scale
    from tests.execution.conftest import plan_json

    backend = local_backend()
    _start(storage)
    first, second = backend.launch("stage-1", 2)
    deadline = time.monotonic() + 60
    while not (storage.heartbeat(first) and storage.heartbeat(second)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(storage.heartbeat(first)["pid"], signal.SIGKILL)
    time.sleep(0.5)
    assert reconcile(backend) == [second]
    assert next(e for e in storage.ledger() if e["instance"] == first)["terminated"] is not None
    run_plan = RunPlan.from_json(plan_json("local-1", 1, [(1, 1), (1, 2)], num_trials=4, eta=2, min_epochs=1))
    out = scale(backend, run_plan, 2)  # the next stage wants two: one replacement
    assert len(out["launched"]) == 1 and len(out["live"]) == 2 and first not in out["live"]
    backend.terminate_all()
    assert agent_processes(storage) == []


def test_the_fork_servers_s3_preload_reads_no_aws_config_and_opens_no_connection(tmp_path):
    """The agent's fork server imports ``trial_clients``: a broken AWS config or an unknown profile
    must not stop it (every trial would fail to start), nor may it read a secret or reach the network."""
    import subprocess
    import sys

    (tmp_path / "config").write_text("[profile broken\nregion = \n")  # not even INI
    (tmp_path / "credentials").write_text("[default]\naws_secret_access_key = SECRET-IN-FILE\n")
    probe = ("import socket, gc\n"
             "def no(*a, **k): raise SystemExit('a connection from the preload: %r' % (a,))\n"
             "socket.socket.connect = no\n"
             "from rubberband_airflow.execution import trial_clients\n"
             "assert trial_clients.LOADER is not None, 'nothing preloaded'\n"
             "gc.collect()\n"
             "assert not [o for o in gc.get_objects() if isinstance(o, str) and o == 'SECRET-IN-FILE']\n"
             "print('ok')\n")
    env = {**os.environ, "AWS_CONFIG_FILE": str(tmp_path / "config"), "AWS_PROFILE": "nope",
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"), "AWS_DEFAULTS_MODE": "auto"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
