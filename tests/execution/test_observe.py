"""The run state a re-plan starts from, built from the files of a real run (local backend, sleeping
synthetic trials run by real agents), and the re-plan written once per stage."""

import errno

import fsspec
import pytest

from rubberband_airflow.execution import observe, replanning, runner
from rubberband_airflow.execution.runner import RunPlan, RunSpec
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.replan import parse_state
from rubberband_airflow.predictions import replan_lines, replan_rows
from rubberband_airflow.search_space import sample
from rubberband_airflow.workloads import synthetic
from tests.execution.conftest import plan_json, run_stage
from tests.execution.moto_cloud import moto_cloud  # noqa: F401 (the fixture)

SYNTHETIC = "rubberband_airflow.workloads.synthetic:train"
EPOCH = 0.4


def test_state_at_each_barrier_is_what_the_run_measured(storage, local_backend):
    backend = local_backend(slots=1)
    plan = plan_json("local-1", 1, [(1, 2), (1, 1), (1, 1)], num_trials=4, eta=2, min_epochs=2,
                     epoch_seconds=1.0)
    run_plan = RunPlan.from_json(plan)
    # Stage 2 on: every epoch 1.5x as long (the workload's slowdown knob).
    configs = [{**c, "epoch_seconds": EPOCH, "serial": 0.0, "slowdown": 1.5}
               for c in sample(synthetic.SEARCH_SPACE, 4, seed=2)]
    runner.start_run(storage, RunSpec(SYNTHETIC, synthetic.METRIC, synthetic.MODE), configs, plan, 1)
    started = storage.read_json("run.json")["started"]
    run_stage(storage, backend, run_plan, 1, synthetic.MODE)
    end1 = max(storage.read_result(t, 1)["finished"] for t in runner.stage_trials(storage, 1))
    state = observe.run_state(storage, run_plan.problem, "local-1", 2, now=end1)
    assert state["next_stage"] == 2 and state["elapsed_seconds"] == pytest.approx(end1 - started)
    obs = state["observed"]
    # A re-plan an hour after the barrier (its start failed at night, cleared in the morning)
    # starts the stage then: the barrier moves up to an hour less the stage overhead measured.
    late = observe.run_state(storage, run_plan.problem, "local-1", 2, now=end1 + 3600)
    assert late["elapsed_seconds"] == pytest.approx(end1 + 3600 - started - obs["stage_overhead_seconds"])
    after, record = replanning.revise(storage, plan, 2, now=end1 + 3600)
    assert after["predicted"]["jct_seconds"]["quantile"] > 3600 >= plan["problem"]["deadline_seconds"]
    assert "infeasible" in record  # the deadline passed while the run waited: the fastest plan
    # Stage 1's epochs slept EPOCH each; a trial took its epochs plus its process's start and writes.
    assert obs["epoch_seconds"]["1"] == pytest.approx(EPOCH, rel=0.25)
    assert 0 <= obs["trial_overhead_seconds"] < 5
    assert 0 <= obs["stage_overhead_seconds"] < 5
    ledger = storage.ledger()
    assert set(obs["launch_seconds"]) == {"local-1"}
    assert obs["launch_seconds"]["local-1"] == pytest.approx(
        sum(e["ready"] - e["requested"] for e in ledger) / len(ledger))
    # Both instances are live (stage 2 has not scaled in yet), oldest first, nothing spent yet.
    assert [f["running_at_seconds"] for f in state["fleet"]] == pytest.approx(
        [e["running"] - started for e in ledger])
    assert [f["ready_at_seconds"] for f in state["fleet"]] == pytest.approx([e["ready"] - started for e in ledger])
    assert state["spent_usd"] == 0.0
    parse_state(state, run_plan.problem)  # the planning core reads it as it is
    # The promoted stage's outcome holds each trial's result, which the re-plan reads in one request;
    # without them (a stage promoted before outcomes held them) each trial's own is read, the same.
    outcome = storage.read_json("stages", "1", "promoted.json")
    assert outcome["results"] == storage.read_results(1, runner.stage_trials(storage, 1))
    del outcome["results"]
    storage.write_json(outcome, "stages", "1", "promoted.json")
    assert observe.run_state(storage, run_plan.problem, "local-1", 2)["observed"] == obs
    # Each result records when its epochs of the stage ended, as its epoch records say; a result
    # written before results did (no epoch_ends) is measured from its epoch records, the same.
    for t in runner.stage_trials(storage, 1):
        result = storage.read_result(t, 1)
        assert result["epoch_ends"] == [m["time"] for m in storage.metrics(t) if m["stage"] == 1]
        del result["epoch_ends"]
        storage.write_json(result, "trials", t, "stage-1.json")
    assert observe.run_state(storage, run_plan.problem, "local-1", 2)["observed"] == obs

    run_stage(storage, backend, run_plan, 2, synthetic.MODE)
    state = observe.run_state(storage, run_plan.problem, "local-1", 3)
    # Stage 2 scaled in to one instance: the other is billed in what was spent; its epochs ran slower.
    assert len(state["fleet"]) == 1 and state["spent_usd"] > 0
    assert state["observed"]["epoch_seconds"]["1"] == pytest.approx(1.5 * EPOCH, rel=0.25)
    parse_state(state, run_plan.problem)

    # The re-plan before stage 3 is written once: a second call (a retried task) returns the first.
    before = replanning.current_plan(storage, 3)
    assert before == plan
    # A try that fails writing the re-plan's record (a storm) leaves no plan without its record.
    stormy = _RecordWriteFailsOnce(storage.uri)
    with pytest.raises(OSError, match="injected"):
        replanning.replan_stage(stormy, before, 3)
    after = replanning.replan_stage(stormy, before, 3)
    assert replanning.current_plan(storage, 3) == after and replanning.current_plan(storage, 2) == plan
    assert after["stages"][:2] == plan["stages"][:2] and after["replanned_before_stage"] == 3
    record = storage.read_json("stages", "3", "replan.json")
    assert record["before"] == plan and record["after"] == after
    assert record["time"] >= started + state["elapsed_seconds"]
    assert record["observed"]["epoch_seconds"]["1"] == pytest.approx(1.5 * EPOCH, rel=0.25)
    # The executed plan's problem has the observed epoch time, so its trial limits follow the slowdown.
    assert RunPlan.from_json(after).problem.workload.epoch_seconds[1] == pytest.approx(1.5 * EPOCH, rel=0.25)
    assert replanning.replan_stage(storage, plan, 3) == after
    # A retry an hour after the re-plan, before the stage acted on it (its start failed at night
    # and was cleared in the morning), re-plans from then; the record keeps the plan it replaced.
    late = record["time"] + 3600
    assert replanning.replan_stage(storage, plan, 3, continued=1, now=late, start_try=None) == after  # the same try
    again = replanning.replan_stage(storage, plan, 3, continued=1, now=late, start_try=2)
    renewed = storage.read_json("stages", "3", "replan.json")
    assert renewed["replaced"] == {"time": record["time"], "instances": [s["instances"] for s in after["stages"]],
                                   "predicted": after["predicted"]}
    h = renewed["observed"]["stage_overhead_seconds"]
    assert renewed["state"]["elapsed_seconds"] == pytest.approx(late - started - h)
    assert "infeasible" in renewed and again["predicted"]["jct_seconds"]["quantile"] > 3600
    assert replanning.current_plan(storage, 3) == again and renewed["after"] == again
    [row] = replan_rows([renewed], started)
    assert any(line.endswith("made again by a retry of the stage's start 3600.0 s after the re-plan before it")
               for line in replan_lines({"replans": [row]})), replan_lines({"replans": [row]})
    # Once the stage acted on its plan (its trials placed), a retry keeps it, however late.
    runner.start_stage(storage, backend, RunPlan.from_json(again), 3)
    assert replanning.replan_stage(storage, plan, 3, continued=2, now=late + 3600, start_try=3) == again
    backend.terminate_all()


class _RecordWriteFailsOnce(RunStorage):
    """Run storage whose first write of a re-plan's record fails, as in a storage error burst."""

    failed = False

    def write_json(self, value, *parts):
        if parts[-1] == "replan.json" and not self.failed:
            self.failed = True
            raise OSError(errno.EIO, "injected storage error")
        super().write_json(value, *parts)


def test_a_spot_plans_state_counts_its_spot_fleet_and_bills_each_instance_at_its_recorded_price(storage):
    plan = plan_json("g5.xlarge:spot", 1, [(1, 2), (1, 1)], num_trials=4, eta=2, min_epochs=1)
    plan["problem"]["instance_types"][0].update(market="spot", price_per_hour=0.3)
    problem = RunPlan.from_json(plan).problem
    runner.start_run(storage, RunSpec(SYNTHETIC, synthetic.METRIC, synthetic.MODE),
                     sample(synthetic.SEARCH_SPACE, 4, seed=1), plan, 1)
    t0 = storage.read_json("run.json")["started"]
    entry = {"batch": "stage-1-batch-0", "type": "g5.xlarge", "slots": 1, "requested": t0, "running": t0 + 10,
             "ready": t0 + 40}
    storage.write_ledger({**entry, "instance": "i-spot", "market": "spot", "price_per_hour": 0.3, "terminated": None})
    storage.write_ledger({**entry, "instance": "i-gone", "market": "spot", "price_per_hour": 0.3,
                          "terminated": t0 + 3610})
    storage.write_ledger({**entry, "instance": "i-od", "market": "on-demand", "price_per_hour": 1.0,
                          "terminated": t0 + 3610})
    state = observe.run_state(storage, problem, "g5.xlarge:spot", 2, now=t0 + 100)
    # The live spot instance is the plan's fleet; the terminated ones are billed at their own prices.
    assert state["fleet"] == [{"instance_type": "g5.xlarge:spot", "running_at_seconds": 10.0, "ready_at_seconds": 40.0}]
    assert state["spent_usd"] == pytest.approx(0.3 + 1.0)
    assert state["observed"]["launch_seconds"] == {"g5.xlarge:spot": 40.0, "g5.xlarge": 40.0}
    parse_state({**state, "observed": {}}, problem)


def test_a_stages_failed_and_resumed_trials_neither_shorten_it_nor_slow_its_epochs(storage):
    """What a re-plan measures of a stage with a trial that timed out, a trial after it on the same
    slot, and a trial resumed on another instance after its first was lost: the stage ends with its
    last trial, failed or not; a trial's slot time starts where the failed one before it ended; a
    resumed trial's epochs are its own worker's, not the gap across the loss."""
    plan = plan_json("local-1", 1, [(1, 2), (1, 1)], num_trials=5, eta=2, min_epochs=2)
    problem = RunPlan.from_json(plan).problem
    runner.start_run(storage, RunSpec(SYNTHETIC, synthetic.METRIC, synthetic.MODE),
                     sample(synthetic.SEARCH_SPACE, 5, seed=1), plan, 1)
    t0 = storage.read_json("run.json")["started"]
    a, b, c, d, e = runner.stage_trials(storage, 1)
    storage.write_json({"stage": 1, "placement": {
        "i-a": [{"trial": t, "gpus": 1, "start_epoch": 0, "stop_epoch": 2} for t in (a, b, c)],
        "i-b": [{"trial": t, "gpus": 1, "start_epoch": 0, "stop_epoch": 2} for t in (d, e)]}},
        "stages", "1", "placement.json")

    def ran(trial, instance, start, end, ends=None, **more):
        done = {"state": "done", "metric": 0.5, "epoch": 2, "epoch_ends": [t0 + x for x in ends]} if ends else \
            {"state": "failed", "error": "timed out"}
        storage.write_result(trial, 1, {"instance": instance, "slots": [0], "stage": 1, "spawned": t0 + start,
                                        "started": t0 + start, "finished": t0 + end, **done, **more})

    ran(a, "i-a", 0, 100, [50, 100])
    ran(b, "i-a", 100, 700)  # timed out
    ran(c, "i-a", 700, 800, [750, 800])
    ran(d, "i-b", 500, 640, [50, 590], resumed_from_epoch=1)  # its epoch 1 ended on an instance lost since
    ran(e, "i-b", 640, 1000)  # timed out: the stage's last trial to end
    state = observe.run_state(storage, problem, "local-1", 2, now=t0 + 1000)
    assert state["elapsed_seconds"] == pytest.approx(1000)
    assert state["observed"]["epoch_seconds"] == {"1": pytest.approx(50)}
    # a and c held their slot for their two epochs; d for its one epoch and its resume (90 s).
    assert state["observed"]["trial_overhead_seconds"] == pytest.approx(30)


@pytest.mark.parametrize("where", ["file", "s3"])
def test_the_metrics_of_many_trials_are_each_trials_own(where, storage, request):
    """What a re-plan reads of hundreds of trials at once is what it would read trial by trial: on
    the local disk and on S3 (moto's server), a trial whose id begins another's, a trial of the
    older one-file format, and one with no epoch yet."""
    if where == "s3":
        storage = request.getfixturevalue("moto_cloud").storage("metrics/run-1")
    for trial, epochs in (("trial-1", 3), ("trial-10", 2), ("trial-2", 0)):
        storage.write_config(trial, {"x": 1})
        for epoch in range(1, epochs + 1):
            storage.append_metrics(trial, {"epoch": epoch, "loss": 1 / epoch, "stage": 1, "time": 10.0 + epoch})
    old = b'{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "loss": 0.25}\n'
    storage.write_bytes(old, "trials", "trial-old", "metrics.jsonl")
    trials = ["trial-1", "trial-10", "trial-2", "trial-old"]
    many = storage.metrics_many(trials)
    assert many == {t: storage.metrics(t) for t in trials}
    assert [m["epoch"] for m in many["trial-1"]] == [1, 2, 3] and many["trial-2"] == []
    assert [m["loss"] for m in many["trial-old"]] == [0.5, 0.25]
    assert storage.metrics_many(["trial-10"]) == {"trial-10": many["trial-10"]}
    # What another process (an agent) writes after it is seen: s3fs would answer reads under a
    # folder it listed from its cache of that listing.
    agent = RunStorage(storage.uri, fsspec.filesystem(storage.fs.protocol[0], skip_instance_cache=True,
                                                      **storage.fs.storage_options))
    agent.write_result("trial-2", 1, {"state": "done", "stage": 1, "metric": 0.5})
    agent.append_metrics("trial-2", {"epoch": 1, "loss": 1.0, "stage": 1, "time": 11.0})
    assert storage.read_result("trial-2", 1)["metric"] == 0.5
    assert [m["epoch"] for m in storage.metrics_many(["trial-2"])["trial-2"]] == [1]
