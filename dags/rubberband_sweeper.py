"""The net behind each tuning run's teardown: every 15 minutes, terminate the EC2 instances of
tuning runs (of the EC2 specs in this folder) that have ended or were deleted."""

from pathlib import Path

from rubberband_airflow.sweeper import sweeper_dag

dag = sweeper_dag(Path(__file__).parent)
