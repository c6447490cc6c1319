"""Provider metadata Airflow reads through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    """The provider's metadata, in the shape of Airflow's ``provider_info.schema.json``."""
    return {
        "package-name": "rubberband-airflow",
        "name": "RubberBand",
        "description": "Deadline-aware, cost-minimal hyperparameter tuning on elastic GPU instances "
                       "(RubberBand, EuroSys 2021).",
        "integrations": [{"integration-name": "RubberBand", "external-doc-url": "https://doi.org/10.1145/3447786.3456245",
                          "tags": ["software"]}],
        "operators": [{"integration-name": "RubberBand", "python-modules": ["rubberband_airflow.operators.planning"]}],
        "sensors": [{"integration-name": "RubberBand", "python-modules": ["rubberband_airflow.sensors.trial"]}],
        "hooks": [{"integration-name": "RubberBand", "python-modules": ["rubberband_airflow.hooks.storage",
                                                                       "rubberband_airflow.hooks.backend"]}],
        "triggers": [{"integration-name": "RubberBand", "python-modules": ["rubberband_airflow.triggers.trial"]}],
        "config": {"rubberband": {
            "description": "RubberBand tuning DAGs.",
            "options": {"deployment": {
                "description": "This Airflow deployment's name. Every EC2 instance a tuning run launches is tagged "
                               "with it (rubberband:deployment), and a deployment's teardown and sweeper touch only "
                               "instances with its own name: give two deployments that share an AWS account "
                               "different names.",
                "version_added": "0.1.0", "type": "string", "example": "prod-eu", "default": "default"},
                "waits_start_on_triggerer": {
                "description": "Start each trial's wait on the triggerer (start_from_trigger) and end it there "
                               "when the trial is done, so that it never takes a worker slot or a worker's process "
                               "launch. Needs a running triggerer: `airflow dags test` has none, keep it False there.",
                "version_added": "0.2.0", "type": "boolean", "example": "True", "default": "False"}},
        }},
    }
