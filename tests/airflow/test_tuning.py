"""A spec plus trigger-form values plus past runs become the planning problem."""

import dataclasses

import pytest
import yaml

from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.spec import SpecError, load_spec, parse_spec
from rubberband_airflow.tuning import (
    CALIBRATION_DAG_ID,
    DEFAULT_INTERRUPTIONS_PER_HOUR,
    RunSnapshot,
    calibration_runs,
    like_this_run,
    measured_stage_overhead,
    past_runs,
    planning_problem,
    read_snapshot,
    run_uri,
    settings,
    stage_overhead,
    teardown,
    trial_overhead,
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


def test_the_overhead_comes_from_the_spec_then_past_runs_then_calibration_then_the_profile(spec):
    past, calibration = [{"stage_overhead_seconds": [0.1, 2.0]}], [{"stage_overhead_seconds": [0.3, 5.0, 7.0]}]
    assert stage_overhead(spec, past, calibration) == (2.0, "past runs")
    assert stage_overhead(spec, [{"stage_overhead_seconds": [0.1]}], calibration) == (6.0, "calibration")
    assert stage_overhead(spec, [], []) == (None, "profile")
    assert planning_problem(spec, {}, PROFILE, [], [])["workload"]["stage_overhead_seconds"] == 1.4
    assert planning_problem(spec, {}, PROFILE, [], calibration)["workload"]["stage_overhead_seconds"] == 6.0
    fixed = dataclasses.replace(spec, stage_overhead_seconds=0.5)
    assert stage_overhead(fixed, past, calibration) == (0.5, "spec")
    # The calibration runs are read only where neither the spec nor past runs give the overhead, or
    # past runs the teardown (reports from before it was measured; a spec that fixes the overhead).
    reads = []

    def read():
        reads.append(1)
        return calibration

    measured = [{**past[0], "teardown_seconds": 3.0}]
    assert calibration_runs(spec, "tune", [], read) == calibration and len(reads) == 1
    assert calibration_runs(spec, "tune", measured, read) == [] and len(reads) == 1
    assert calibration_runs(spec, "tune", past, read) == calibration and len(reads) == 2
    assert calibration_runs(fixed, "tune", [], read) == calibration and len(reads) == 3
    assert stage_overhead(fixed, past, calibration) == (0.5, "spec")  # the spec's all the same
    assert calibration_runs(spec, CALIBRATION_DAG_ID, [], read) == [] and len(reads) == 3


def test_a_relative_profile_path_is_the_spec_files_folders(tmp_path):
    data = {**yaml.safe_load((ROOT / "dags" / "digits_tuning.yaml").read_text()), "profile": "profiles/p.json"}
    (tmp_path / "dags").mkdir()
    path = tmp_path / "dags" / "x.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_spec(path).profile == str(tmp_path / "dags" / "profiles" / "p.json")
    for kept in ("/abs/p.json", "s3://bucket/p.json"):
        path.write_text(yaml.safe_dump({**data, "profile": kept}))
        assert load_spec(path).profile == kept
    assert load_spec(ROOT / "dags" / "rubberband_calibration.yaml").profile == \
        str(ROOT / "dags" / "rubberband_calibration.profile.json")


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


def _ec2_types(spec, types: list[dict]):
    data = spec.to_dict()
    data["backend"] = {**data["backend"], "instance_types": types}
    return parse_spec(data, "spot.yaml")


def test_spot_offers_become_instance_types_the_planner_chooses_from(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    nightly = load_spec(ROOT / "dags" / "nightly_ec2_tuning.yaml")
    spec = _ec2_types(nightly, [
        {"name": "g5.xlarge", "max_instances": 4, "spot_price_per_hour": 0.4},  # both markets
        {"name": "g5.12xlarge", "max_instances": 2, "market": "spot", "interruptions_per_hour": 0.2},  # spot only
        {"name": "g6.xlarge", "max_instances": 2},  # on demand only
    ])
    types = {t.name: t for t in parse_problem(planning_problem(spec, {}, PROFILE)).instance_types}
    assert set(types) == {"g5.xlarge", "g5.xlarge:spot", "g5.12xlarge:spot", "g6.xlarge"}
    assert types["g5.xlarge"].market == "on-demand" and types["g5.xlarge"].price_per_hour == 1.006
    assert (types["g5.xlarge:spot"].market, types["g5.xlarge:spot"].price_per_hour) == ("spot", 0.4)
    assert types["g5.xlarge:spot"].interruptions_per_hour == DEFAULT_INTERRUPTIONS_PER_HOUR
    assert types["g5.xlarge:spot"].max_instances == 4
    # Spot without a spot price is planned at the on-demand price, the most AWS charges for it.
    assert (types["g5.12xlarge:spot"].price_per_hour, types["g5.12xlarge:spot"].interruptions_per_hour) == (5.672, 0.2)
    # The form's instance types name the EC2 types; each brings its offers.
    only = parse_problem(planning_problem(spec, {"instance_types": ["g5.xlarge"]}, PROFILE)).instance_types
    assert [t.name for t in only] == ["g5.xlarge", "g5.xlarge:spot"]


def test_a_plan_on_a_spot_offer_runs_on_a_spot_backend_of_its_ec2_type(tmp_path, monkeypatch):
    import boto3

    from rubberband_airflow.execution.backends.base import Market
    from rubberband_airflow.tuning import backend_for

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    spec = _ec2_types(load_spec(ROOT / "dags" / "nightly_ec2_tuning.yaml"),
                      [{"name": "g5.xlarge", "max_instances": 4, "spot_price_per_hour": 0.4}])
    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    storage = RunStorage(f"file://{tmp_path}/run")
    spot = backend_for(spec, storage, "d", "r", "g5.xlarge:spot", ec2_client=client)
    on_demand = backend_for(spec, storage, "d", "r", "g5.xlarge", ec2_client=client)
    assert (spot.instance_type, spot.market, spot.spot_price) == ("g5.xlarge", Market.SPOT, 0.4)
    assert (on_demand.instance_type, on_demand.market) == ("g5.xlarge", Market.ON_DEMAND)
    with pytest.raises(ProblemError) as err:
        backend_for(spec, storage, "d", "r", "g6.xlarge:spot", ec2_client=client)
    assert err.value.field == "backend.instance_types"


def test_a_bad_interruption_rate_names_its_field(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    data = load_spec(ROOT / "dags" / "nightly_ec2_tuning.yaml").to_dict()
    data["backend"]["instance_types"][0]["interruptions_per_hour"] = "often"
    with pytest.raises(SpecError) as err:
        parse_spec(data, "bad.yaml")
    assert str(err.value) == ("bad.yaml: backend.instance_types[0].interruptions_per_hour: "
                              "must be a number, got string 'often'")


def test_past_runs_give_the_trial_overhead_else_the_profile(spec):
    past = [{"trial_overhead_seconds": 1.5}, {"trial_overhead_seconds": None}, {"trial_overhead_seconds": 2.5}]
    assert trial_overhead(past) == (pytest.approx(2.0), "past runs")
    assert trial_overhead([{"stage_overhead_seconds": [0.1, 2.0]}]) == (None, "profile")  # reports from before
    assert planning_problem(spec, {}, PROFILE, past, [])["workload"]["trial_overhead_seconds"] == pytest.approx(2.0)
    profiled = planning_problem(spec, {}, PROFILE, [], [{"trial_overhead_seconds": 9.0}])
    assert profiled["workload"]["trial_overhead_seconds"] == PROFILE["trial_overhead_seconds"]  # never calibration's


def test_a_run_plans_its_overheads_with_past_runs_of_as_many_trials_where_there_are_any():
    runs = [{"trials": dict.fromkeys(range(n)), "trial_overhead_seconds": u} for n, u in
            [(256, 8.0), (16, 1.0), (256, 6.0), (64, 3.0)]]
    assert [r["trial_overhead_seconds"] for r in like_this_run(runs, 256)] == [8.0, 6.0]
    assert trial_overhead(like_this_run(runs, 256)) == (pytest.approx(7.0), "past runs")
    assert like_this_run(runs, 32) == runs[:5]  # none of its size: the latest of all sizes
    assert like_this_run(runs * 2, 32) == (runs * 2)[:5]


def test_past_runs_give_the_teardown_by_their_median_else_calibration_else_none(spec):
    past = [{"teardown_seconds": 4.0}, {"teardown_seconds": None}, {"teardown_seconds": 3600.0},
            {"teardown_seconds": 5.0}, {}]
    # One night whose teardown waited an hour for Airflow does not make the next runs plan with it
    assert teardown(past, [{"teardown_seconds": 9.0}]) == (pytest.approx(5.0), "past runs")
    assert teardown(past[:1] + past[3:4], []) == (pytest.approx(4.5), "past runs")
    assert teardown([{}], [{"teardown_seconds": 9.0}]) == (pytest.approx(9.0), "calibration")
    assert teardown([], []) == (None, "none")
    assert planning_problem(spec, {}, PROFILE, past, [])["workload"]["teardown_seconds"] == pytest.approx(5.0)
    assert "teardown_seconds" not in planning_problem(spec, {}, PROFILE, [], [])["workload"]
