"""The profiler: fits on known data, and a real profile of the example that the planner accepts."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.planning.profile import fit_scaling, predict_epoch_seconds, to_problem
from rubberband_airflow.profiler import ProfileError, launch_latencies

RUBBERBAND = str(Path(sys.executable).parent / "rubberband")


def test_scaling_fit_recovers_the_curve_and_predicts_unmeasured_gpus():
    truth = {g: 4.0 + 60.0 / g for g in (1, 2, 4)}
    a, b = fit_scaling(truth)
    assert a == pytest.approx(4.0) and b == pytest.approx(60.0)
    curve = predict_epoch_seconds(truth, up_to=8)
    assert set(curve) == {1, 2, 4, 8} and curve[8] == pytest.approx(4.0 + 7.5)
    assert curve[2] == truth[2]  # measured values stay as measured


def test_one_measured_gpu_count_assumes_perfect_scaling():
    assert predict_epoch_seconds({1: 10.0}, up_to=4) == {1: 10.0, 2: 5.0, 4: 2.5}


def test_launch_latencies_from_ledgers():
    rng = np.random.default_rng(0)
    pending = 40 * np.exp(0.3 * rng.standard_normal(200) - 0.045)
    ledgers = [{"requested": 0.0, "running": p, "ready": p + 90.0} for p in pending]
    out = launch_latencies(ledgers)
    assert out["boot_seconds"] == pytest.approx(90.0)
    assert out["pending_seconds"] == pytest.approx(40, rel=0.1)
    assert out["pending_sigma"] == pytest.approx(0.3, rel=0.15)
    with pytest.raises(ProfileError):
        launch_latencies([{"requested": 0.0, "running": 1.0}])


def test_profile_of_the_example_becomes_a_problem_the_planner_accepts(tmp_path):
    profile_path = tmp_path / "profiles" / "local-2.json"  # --out takes a URL too, and makes the folder
    r = subprocess.run([RUBBERBAND, "profile", "--slots", "2", "--configs", "3", "--epochs", "2",
                        "--boot-seconds", "0.5", "--storage", f"file://{tmp_path}/profiles",
                        "--out", f"file://{profile_path}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    profile = json.loads(profile_path.read_text())
    assert set(profile["epoch_seconds_measured"]) == {"1", "2"}
    assert all(v > 0 for v in profile["epoch_seconds_measured"].values())
    assert profile["trial_overhead_seconds"] > 0 and profile["checkpoint_gb"] > 0
    assert profile["instance_type"]["boot_seconds"] >= 0.5
    assert profile["stage_overhead_seconds"] is not None and profile["measured_at"]

    tuning = {"sha": {"num_trials": 16, "eta": 2, "min_epochs": 2}, "deadline_seconds": 3600,
              "instance_types": [{"name": "local-2", "gpus": 2, "price_per_hour": 1.0, "max_instances": 1},
                                 {"name": "g5.12xlarge", "gpus": 4, "price_per_hour": 5.672, "max_instances": 4}]}
    (tmp_path / "tuning.json").write_text(json.dumps(tuning))
    r = subprocess.run([RUBBERBAND, "problem", str(profile_path), str(tmp_path / "tuning.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    problem = json.loads(r.stdout)
    assert set(problem["workload"]["epoch_seconds"]) == {"1", "2", "4"}  # g = 4 predicted by the fit
    parse_problem(problem)
    (tmp_path / "problem.json").write_text(r.stdout)
    r = subprocess.run([RUBBERBAND, "plan", str(tmp_path / "problem.json")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["predicted"]["jct_seconds"]["quantile"] <= 3600


def test_problem_needs_the_tuning_fields(tmp_path):
    profile = {"epoch_seconds_measured": {"1": 1.0}, "trial_overhead_seconds": 1.0, "straggler_sigma": 0.0,
               "checkpoint_gb": 0.0, "stage_overhead_seconds": 1.0,
               "instance_type": {"pending_seconds": 1.0, "boot_seconds": 1.0, "pending_sigma": 0.0}}
    with pytest.raises(ProblemError, match="tuning.sha"):
        to_problem(profile, {"deadline_seconds": 10, "instance_types": []})
    with pytest.raises(ProblemError, match="tuning.instance_types"):
        to_problem(profile, {"sha": {}, "deadline_seconds": 10, "instance_types": []})
    (tmp_path / "p.json").write_text(json.dumps(profile))
    (tmp_path / "t.json").write_text(json.dumps({"deadline_seconds": 10, "instance_types": []}))
    r = subprocess.run([RUBBERBAND, "problem", str(tmp_path / "p.json"), str(tmp_path / "t.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "tuning.sha" in r.stderr


def test_profile_refuses_more_slots_than_the_machine_has(tmp_path):
    r = subprocess.run([RUBBERBAND, "profile", "--slots", "4096", "--out", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "slots: must be between 1 and this machine's" in r.stderr
    assert not (tmp_path / "p.json").exists()
