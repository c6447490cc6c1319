"""Orchestration overhead per stage (the model's stage_overhead_seconds), measured from real runs.

Runs the digits tuning DAG with `airflow dags test` on SQLite (local backend, real training)
a few times in a fresh Airflow home, and records each run's per-stage overhead (from the end
of one stage's last trial to the start of the next stage) and its predicted against actual JCT
and cost. The planning operator feeds the measured overhead of past runs into the next plan.
Writes benchmarks/results/orchestration.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.doc_sections import write_section

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results" / "orchestration.json"
RUNS = 3


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="rubberband-bench-"))
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    profile = home / "rubberband" / "profiles" / "local-1.json"
    subprocess.run([str(BIN / "rubberband"), "profile", "--slots", "1", "--out", str(profile)], env=env, check=True,
                   capture_output=True)
    runs: list[dict[str, Any]] = []
    for k in range(RUNS):
        subprocess.run([str(BIN / "airflow"), "dags", "test", "digits_tuning"], env=env, check=True,
                       capture_output=True)
        folder = sorted((home / "rubberband" / "digits_tuning").glob("manual__*"), key=lambda p: p.stat().st_mtime)[-1]
        rep = json.loads((folder / "report.json").read_text())
        plan = json.loads((folder / "plan.json").read_text())
        runs.append({"run": k + 1, "history_runs": plan.get("history_runs"),
                     "planned_stage_overhead": plan["problem"]["workload"]["stage_overhead_seconds"],
                     "stage_overhead_seconds": rep["stage_overhead_seconds"],
                     "predicted_jct": rep["predicted"]["jct_seconds"]["mean"],
                     "actual_jct": rep["actual"]["jct_seconds"],
                     "predicted_cost": rep["predicted"]["cost_usd"]["mean"], "actual_cost": rep["actual"]["cost_usd"]})
        print(f"run {k + 1}: overheads {rep['stage_overhead_seconds']}", flush=True)
    between = [o for r in runs for o in r["stage_overhead_seconds"][1:] if o is not None]
    result = {"runs": runs, "stage_overhead_seconds": {"mean": statistics.mean(between),
                                                       "median": statistics.median(between),
                                                       "max": max(between), "n": len(between)},
              "profiler_stage_overhead_seconds": json.loads(profile.read_text())["stage_overhead_seconds"]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    s = result["stage_overhead_seconds"]
    lines = ["## Orchestration overhead per stage", "",
             "By `benchmarks/bench_orchestration.py`: the digits tuning DAG run "
             f"{RUNS} times with `airflow dags test` on SQLite (local backend, real training). A stage's overhead "
             "is the time from the previous stage's last trial result to the stage's start (promotion, "
             "scaling decisions, task scheduling): the model's `stage_overhead_seconds`.", "",
             f"Between stages: mean {s['mean']:.2f} s, median {s['median']:.2f} s, max {s['max']:.2f} s over "
             f"{s['n']} stage changes; the profiler's own estimate (agent and runner, no Airflow) was "
             f"{result['profiler_stage_overhead_seconds']:.2f} s. The planning operator uses the mean measured "
             "in the DAG's last runs unless the spec sets `stage_overhead_seconds`.", "",
             "| run | past runs used | planned overhead | measured per stage | predicted JCT | actual JCT | "
             "predicted cost | actual cost |", "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['run']} | {r['history_runs']} | {r['planned_stage_overhead']:.2f} s | "
                     f"{', '.join(f'{o:.2f}' for o in r['stage_overhead_seconds'])} s | {r['predicted_jct']:.1f} s | "
                     f"{r['actual_jct']:.1f} s | ${r['predicted_cost']:.4f} | ${r['actual_cost']:.4f} |")
    write_section("orchestration", "\n".join(lines))
    print("wrote", RESULTS.relative_to(ROOT), "and docs/benchmarks.md")


if __name__ == "__main__":
    main()
