"""A spec plus trigger-form values plus past runs become the planning problem."""

import dataclasses

import pytest

from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.spec import load_spec, parse_spec
from rubberband_airflow.tuning import (
    RunSnapshot,
    measured_stage_overhead,
    past_runs,
    planning_problem,
    read_snapshot,
    run_uri,
    settings,
    write_snapshot,
)
from tests.airflow.conftest import ROOT

PROFILE = {"epoch_seconds_measured": {"1": 0.02}, "trial_overhead_seconds": 4.0, "straggler_sigma": 0.2,
           "checkpoint_gb": 0.00003, "stage_overhead_seconds": 1.4,
           "instance_type": {"pending_seconds": 0.1, "boot_seconds": 0.3, "pending_sigma": 0.0}}


@pytest.fixture
def spec(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    return load_spec(ROOT / "dags" / "digits_tuning.yaml")


def test_form_values_override_the_spec(spec):
    s = settings(spec, {"deadline_seconds": 900, "num_trials": 16, "eta": 4, "max_instances": None})
    assert s.deadline_seconds == 900 and s.sha.num_trials == 16 and s.sha.eta == 4
    assert s.sha.min_epochs == spec.sha.min_epochs
    problem = parse_problem(planning_problem(spec, {"num_trials": 16, "max_instances": 1}, PROFILE))
    assert problem.sha.num_trials == 16 and problem.instance_types[0].max_instances == 1
    assert problem.workload.stage_overhead_seconds == 1.4  # no past run yet: the profile's estimate
    with pytest.raises(ProblemError, match="params.instance_types"):
        settings(spec, {"instance_types": ["p5.48xlarge"]})


def test_past_runs_give_the_stage_overhead(spec):
    root = f"{spec.storage}/digits_tuning"
    for k, overheads in enumerate([[0.2, 2.0, 3.0], [0.1, 1.0, 2.0, 3.0]]):
        RunStorage(f"{root}/manual__{k}").write_json(
            {"stage_overhead_seconds": overheads, "stages": [{"end": 100.0 + k}]}, "report.json")
    RunStorage(root).write_json({"config": {}}, "best_config.json")  # a file beside the runs
    RunStorage(f"{root}/manual__unfinished").write_json({}, "run.json")
    reports = past_runs(RunStorage(root))
    assert [r["stages"][0]["end"] for r in reports] == [101.0, 100.0]  # newest first, unfinished left out
    assert measured_stage_overhead(reports) == pytest.approx((2 + 3 + 1 + 2 + 3) / 5)  # stage 1 left out
    problem = planning_problem(spec, {}, PROFILE, reports)
    assert problem["workload"]["stage_overhead_seconds"] == pytest.approx(2.2)


def test_run_uri_is_safe_for_any_run_id(spec):
    uri = run_uri(spec, "digits_tuning", "manual__2026-11-28T18:00:00+00:00")
    assert uri.endswith("/digits_tuning/manual__2026-11-28T18_00_00_00_00")


def test_each_attempt_of_a_run_has_its_own_folder_beside_the_others(spec):
    first = run_uri(spec, "digits_tuning", "manual__2026-11-28T18:00:00+00:00")
    assert run_uri(spec, "digits_tuning", "manual__2026-11-28T18:00:00+00:00", 1) == first
    third = run_uri(spec, "digits_tuning", "manual__2026-11-28T18:00:00+00:00", 3)
    assert third == f"{first}.attempt-3" and third.rsplit("/", 1)[0] == first.rsplit("/", 1)[0]
    # Both are runs of the DAG's folder, each with its own report.
    for k, uri in enumerate((first, third)):
        RunStorage(uri).write_json({"stages": [{"end": 10.0 + k}]}, "report.json")
    assert [r["stages"][0]["end"] for r in past_runs(RunStorage(f"{spec.storage}/digits_tuning"))] == [11.0, 10.0]
    with pytest.raises(ValueError, match="attempt"):
        run_uri(spec, "digits_tuning", "r", 0)


@pytest.mark.parametrize("name", ["digits_tuning.yaml", "nightly_ec2_tuning.yaml"])
def test_a_runs_snapshot_reads_back_the_spec_it_was_taken_of(spec, tmp_path, name):
    original = load_spec(ROOT / "dags" / name)
    assert parse_spec(original.to_dict(), original.path) == original
    storage = RunStorage(f"file://{tmp_path}/run")
    write_snapshot(storage, RunSnapshot(original, {"num_trials": 16, "max_instances": None}, 2, "prod"))
    back = read_snapshot(storage)
    assert back.spec == dataclasses.replace(original, path=back.spec.path)
    assert (back.params, back.attempt, back.deployment) == ({"num_trials": 16, "max_instances": None}, 2, "prod")
    assert back.spec.path.endswith("/run/spec.json")
    with pytest.raises(FileNotFoundError, match="start_run"):
        read_snapshot(RunStorage(f"file://{tmp_path}/never-started"))
