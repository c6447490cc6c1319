"""Downstream of tuning: whenever digits_tuning publishes a best configuration, train the final
model with it. Shows how a tuning DAG plugs into an existing pipeline through its Asset."""

import json
from datetime import UTC, datetime
from pathlib import Path

from airflow.sdk import ObjectStoragePath, dag, task

from rubberband_airflow.dag_factory import best_config_asset

best = best_config_asset(Path(__file__).with_name("digits_tuning.yaml"))


@dag(schedule=[best], start_date=datetime(2026, 1, 1, tzinfo=UTC), catchup=False,
     tags=["rubberband", "example"], description="Train the final digits model with the tuned configuration")
def train_best_digits():
    @task
    def train_final_model() -> dict:
        from rubberband_airflow.workloads.digits import train_final

        published = json.loads(ObjectStoragePath(best.uri).read_text())
        result = train_final(published["config"], epochs=30)
        print(f"final model from {published['trial']} of {published['run']}: accuracy {result['accuracy']:.4f} "
              f"(tuning saw {published['metric']:.4f})")
        return result

    train_final_model()


train_best_digits()
