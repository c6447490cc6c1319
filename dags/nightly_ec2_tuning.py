"""Nightly EC2 tuning example: a DAG built from nightly_ec2_tuning.yaml."""

from pathlib import Path

from rubberband_airflow.dag_factory import tuning_dag

dag = tuning_dag(Path(__file__).with_suffix(".yaml"))
