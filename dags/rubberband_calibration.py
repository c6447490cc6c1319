"""Measure this Airflow deployment's stage overhead: trigger once after deploying (the spec beside
this file says more). Tuning DAGs under the same storage root plan their first runs with it."""

from pathlib import Path

from rubberband_airflow.dag_factory import tuning_dag

dag = tuning_dag(Path(__file__).with_suffix(".yaml"))
