#!/usr/bin/env bash
# make demo: Airflow on SQLite in .airflow/, a profile of the digits example from the profiler,
# a deadline at which the cheapest plan grows and shrinks the fleet, one run of the digits tuning DAG
# with `airflow dags test` at that deadline, then the report's summary and the run view (HTML).
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
echo "== The plan for this run: a deadline that needs two instances in stage 1 and one later"
PLAN_OUT="$AIRFLOW_HOME/demo-plan.json"
"$BIN/python" scripts/demo_plan.py dags/digits_tuning.yaml "$PROFILE" "$PLAN_OUT"
DEADLINE=$("$BIN/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["deadline_seconds"])' "$PLAN_OUT")

echo
echo "== Running the digits_tuning DAG with airflow dags test, deadline $DEADLINE s (a few minutes; log: $LOG)"
if ! "$BIN/airflow" dags test digits_tuning -c "{\"deadline_seconds\": $DEADLINE}" >>"$LOG" 2>&1; then
  echo "The DAG run failed; the end of the log:" >&2
  tail -40 "$LOG" >&2
  exit 1
fi
echo
DAG_DIR="$AIRFLOW_HOME/rubberband/digits_tuning"
"$BIN/rubberband" report "file://$DAG_DIR"
VIEW="$DAG_DIR/run-view.html"
"$BIN/rubberband" report --html "$VIEW" "file://$DAG_DIR" >/dev/null
echo
echo "Best configuration published to $DAG_DIR/best_config.json"
echo "The run view (fleet, cost, learning curves, leaderboard): open file://$VIEW in a browser"
