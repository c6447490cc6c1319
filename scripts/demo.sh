#!/usr/bin/env bash
# make demo: Airflow on SQLite in .airflow/, a profile of the digits example from the profiler,
# one run of the digits tuning DAG with `airflow dags test`, then the report's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export AIRFLOW_HOME="$PWD/.airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
mkdir -p "$AIRFLOW_HOME"
LOG="$AIRFLOW_HOME/demo.log"
: >"$LOG"

echo "== Airflow metadata database (SQLite) in $AIRFLOW_HOME"
"$BIN/airflow" db migrate >>"$LOG" 2>&1

PROFILE="$AIRFLOW_HOME/rubberband/profiles/local-1.json"
if [ ! -f "$PROFILE" ]; then
  echo "== Profiling the digits example on a local instance (about 20 s)"
  "$BIN/rubberband" profile --slots 1 --out "$PROFILE" >>"$LOG" 2>&1
fi
echo "== The plan for this run"
"$BIN/python" - "$PROFILE" <<'PY'
import json, sys
from rubberband_airflow.planning.planner import plan_problem
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.planning.report import plan_table
from rubberband_airflow.spec import load_spec
from rubberband_airflow.tuning import planning_problem
spec = load_spec("dags/digits_tuning.yaml")
problem = planning_problem(spec, {}, json.load(open(sys.argv[1])))
print(plan_table(plan_problem(parse_problem(problem))))
PY

echo
echo "== Running the digits_tuning DAG with airflow dags test (a few minutes; log: $LOG)"
if ! "$BIN/airflow" dags test digits_tuning >>"$LOG" 2>&1; then
  echo "The DAG run failed; the end of the log:" >&2
  tail -40 "$LOG" >&2
  exit 1
fi
echo
"$BIN/rubberband" report "file://$AIRFLOW_HOME/rubberband/digits_tuning"
echo
echo "Best configuration published to $AIRFLOW_HOME/rubberband/digits_tuning/best_config.json"
