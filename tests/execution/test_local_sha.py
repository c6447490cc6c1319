"""A two-stage successive-halving job with real training on the local backend."""

from rubberband_airflow.execution.runner import RunSpec, run_sha
from rubberband_airflow.search_space import sample
from rubberband_airflow.workloads import digits
from tests.execution.conftest import agent_processes, plan_json

SPEC = RunSpec("rubberband_airflow.workloads.digits:train", "accuracy", "max", seed=3)
PLAN = plan_json("local-1", 1, [(1, 2), (1, 1)], num_trials=4, eta=2, min_epochs=3, pending=0.3, boot=0.5)


def test_two_stage_job_trains_resumes_and_tears_down(storage, local_backend):
    backend = local_backend(slots=1, boot=0.5, pending=0.3)
    configs = sample(digits.SEARCH_SPACE, 4, seed=11)
    out = run_sha(storage, backend, SPEC, configs, PLAN)

    first, second = out["stages"]
    assert first["failed"] == [] and second["failed"] == []
    assert len(first["promoted"]) == 2 and second["trials"] == first["promoted"]
    # The promoted trials are the two best of stage 1.
    stage1 = {t: storage.read_result(t, 1)["metric"] for t in first["trials"]}
    assert sorted(first["promoted"]) == sorted(sorted(stage1, key=stage1.get, reverse=True)[:2])

    for trial in first["promoted"]:
        metrics = storage.metrics(trial)
        assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # epochs continue after promotion
        assert [m["stage"] for m in metrics] == [1, 1, 1, 2, 2, 2]
        assert metrics[-1]["loss"] < metrics[0]["loss"]  # training goes on where it stopped
        assert storage.read_result(trial, 2)["epoch"] == 6
    best = out["best"]
    assert best["trial"] in first["promoted"] and best["metric"] > 0.8
    assert best["metric"] == storage.read_result(best["trial"], 2)["metric"]
    assert best["config"] == configs[int(best["trial"].split("-")[1])]

    for trial in first["trials"]:  # every trial's files are there
        assert storage.read_config(trial) == configs[int(trial.split("-")[1])]
        assert storage.exists("trials", trial, "checkpoint.pt")
        assert storage.read_result(trial, 1)["state"] == "done"

    ledger = out["ledger"]
    assert len(ledger) == 2
    for e in ledger:
        assert e["requested"] <= e["running"] <= e["ready"] <= e["terminated"]
        assert e["running"] - e["requested"] >= 0.3 and e["ready"] - e["running"] >= 0.5
    # LIFO scale-in: the newer instance went at the start of stage 2, the older stayed to the end.
    older, newer = ledger
    assert newer["terminated"] < older["terminated"]
    assert backend.live() == []
    assert agent_processes(storage) == []
