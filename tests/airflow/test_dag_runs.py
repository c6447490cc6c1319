"""The digits tuning DAG run end to end with `airflow dags test` (dag.test) on SQLite, real training."""

import json
from pathlib import Path

import psutil

from rubberband_airflow.execution.storage import RunStorage
from tests.airflow.conftest import BIN, airflow_env, run


def _run_dir(home: Path) -> Path:
    runs = sorted((home / "rubberband" / "digits_tuning").glob("manual__*"), key=lambda p: p.stat().st_mtime)
    return runs[-1]


def _agents_alive(home: Path) -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if str(home) in " ".join(p.info["cmdline"] or [])
            and "rubberband_airflow.execution" in " ".join(p.info["cmdline"] or [])]


def test_digits_dag_tunes_and_reports_prediction_and_bill(airflow_home):
    r = run([str(BIN / "airflow"), "dags", "test", "digits_tuning"], airflow_env(airflow_home), timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    storage = RunStorage(f"file://{_run_dir(airflow_home)}")
    rep = storage.read_json("report.json")
    best = rep["best"]
    assert best is not None and set(best["config"]) >= {"lr", "momentum", "width", "dropout", "batch_size"}
    assert best["metric"] > rep["median_stage1_metric"]
    pred, act = rep["predicted"], rep["actual"]
    # The report sets what happened beside what the plan predicted. How close they come is measured by
    # `make bench` on a sleeping workload (docs/benchmarks.md): real training on two shared cores
    # times the machine's contention as much as the plan, so this test checks the figures, not a bound.
    assert pred["jct_seconds"]["mean"] > 0 and pred["cost_usd"]["mean"] > 0
    assert act["cost_usd"] > 0 and act["jct_seconds"] > rep["stages"][0]["end"] - rep["stages"][0]["start"] > 0
    assert act["jct_seconds"] <= rep["deadline_seconds"]
    # Every trial is in the report, with a result for every stage it ran.
    assert len(rep["trials"]) == 8 and all(t["results"]["1"]["state"] == "done" for t in rep["trials"].values())
    assert [s["trials"] for s in rep["stages"]] == [8, 4, 2, 1]
    # The best configuration is published for downstream DAGs (the Asset's file).
    published = json.loads((airflow_home / "rubberband" / "digits_tuning" / "best_config.json").read_text())
    assert published["config"] == best["config"] and published["metric"] == best["metric"]
    # Nothing is left running and the ledger is complete.
    assert all(e["terminated"] is not None for e in rep["ledger"])
    assert _agents_alive(airflow_home) == []
    assert "Best: trial-" in r.stdout + r.stderr
    # `rubberband report` prints the same summary for the DAG's newest run.
    out = run([str(BIN / "rubberband"), "report", f"file://{airflow_home}/rubberband/digits_tuning"],
              airflow_env(airflow_home), timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"Best: {best['trial']}" in out.stdout and "JCT:  predicted" in out.stdout
    missing = run([str(BIN / "rubberband"), "report", f"file://{airflow_home}/nothing-here"], airflow_env(airflow_home))
    assert missing.returncode == 2 and "no report under" in missing.stderr
    # The downstream example DAG, scheduled on the Asset, trains the final model with the published config.
    down = run([str(BIN / "airflow"), "dags", "test", "train_best_digits"], airflow_env(airflow_home), timeout=600)
    assert down.returncode == 0, (down.stdout + down.stderr)[-3000:]
    assert f"final model from {best['trial']}" in down.stdout + down.stderr


def test_impossible_deadline_fails_planning_with_fastest_jct(airflow_home):
    r = run([str(BIN / "airflow"), "dags", "test", "digits_tuning", "-c", json.dumps({"deadline_seconds": 3})],
            airflow_env(airflow_home), timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "no plan meets the deadline of 3 s" in out and "fastest achievable JCT" in out
