"""The digits tuning example on the local backend: a DAG built from digits_tuning.yaml."""

from pathlib import Path

from rubberband_airflow.dag_factory import tuning_dag

dag = tuning_dag(Path(__file__).with_suffix(".yaml"))
