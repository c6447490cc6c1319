"""The `rubberband` command as a user runs it: a real process, JSON on stdout, exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, WORKED_PLAN

RUBBERBAND = str(Path(sys.executable).parent / "rubberband")
EXAMPLE = str(EXAMPLES / "problem-resnet-p3.json")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RUBBERBAND, *args], capture_output=True, text=True, timeout=120)


def write(tmp_path: Path, name: str, data) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_simulate_worked_example(tmp_path):
    r = run("simulate", EXAMPLE, write(tmp_path, "plan.json", WORKED_PLAN))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["jct_seconds"] == {"mean": 2334.0, "p50": 2334.0, "p95": 2334.0, "quantile": 2334.0}
    assert round(out["cost_usd"]["mean"], 4) == 14.2766
    assert out["samples"] == 256


def test_plan_prints_plan_prediction_and_baselines(tmp_path):
    r = run("plan", EXAMPLE)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["instance_type"] in {"p3.2xlarge", "p3.8xlarge", "p3.16xlarge"}
    assert len(out["stages"]) == 4 and {"gpus_per_trial", "instances"} <= set(out["stages"][0])
    assert set(out["predicted"]["jct_seconds"]) == {"mean", "p50", "p95", "quantile"}
    assert set(out["predicted"]["cost_usd"]) == {"mean", "p50", "p95"}
    assert out["predicted"]["jct_seconds"]["quantile"] <= 2400
    assert set(out["baselines"]) == {"static_allocation", "static_cluster", "lower_bound"}
    # The printed plan is itself a valid plan: simulate gives the same prediction.
    again = run("simulate", EXAMPLE, write(tmp_path, "plan.json", r.stdout))
    sim = json.loads(again.stdout)
    assert sim["jct_seconds"] == out["predicted"]["jct_seconds"]
    assert sim["cost_usd"] == out["predicted"]["cost_usd"]


def test_plan_table_is_readable():
    r = run("plan", "--table", EXAMPLE)
    assert r.returncode == 0, r.stderr
    assert "Predicted JCT" in r.stdout and "static allocation" in r.stdout and "lower bound" in r.stdout
    assert "this plan saves" in r.stdout


def test_input_error_exits_2_and_names_the_field(tmp_path, resnet_problem):
    resnet_problem["workload"]["epoch_seconds"]["3"] = 25
    r = run("plan", write(tmp_path, "p.json", resnet_problem))
    assert r.returncode == 2
    assert "workload.epoch_seconds.3" in r.stderr and "power of two" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("content,words", [("{not json", "not valid JSON"), ('{"deadline_seconds": NaN}', "NaN")])
def test_unreadable_problem_exits_2(tmp_path, content, words):
    r = run("plan", write(tmp_path, "p.json", content))
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_missing_file_exits_2(tmp_path):
    r = run("simulate", EXAMPLE, str(tmp_path / "nope.json"))
    assert r.returncode == 2 and "plan: cannot read" in r.stderr


def test_bad_plan_exits_2(tmp_path):
    r = run("simulate", EXAMPLE, write(tmp_path, "plan.json", {**WORKED_PLAN, "instance_type": "x1"}))
    assert r.returncode == 2 and "plan.instance_type" in r.stderr


def test_impossible_deadline_exits_3_with_fastest_jct(tmp_path, resnet_problem):
    resnet_problem["deadline_seconds"] = 500
    r = run("plan", write(tmp_path, "p.json", resnet_problem))
    assert r.returncode == 3
    assert "no plan meets the deadline of 500 s" in r.stderr and "fastest achievable JCT" in r.stderr
    out = json.loads(r.stdout)
    assert out["fastest_jct_seconds"] > 500 and len(out["fastest_plan"]["stages"]) == 4
    assert f"{out['fastest_jct_seconds']:.1f} s" in r.stderr


def test_greedy_method(tmp_path):
    r = run("plan", "--method", "greedy", EXAMPLE)
    assert r.returncode == 0 and json.loads(r.stdout)["method"] == "greedy"


def test_usage_error_exits_2():
    r = run("plan")
    assert r.returncode == 2 and "usage" in r.stderr


def test_planning_core_imports_neither_airflow_nor_torch():
    code = ("import sys, rubberband_airflow.cli, rubberband_airflow.planning.planner; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('airflow', 'torch')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
