"""RubberBand for Apache Airflow: deadline-aware, cost-minimal hyperparameter tuning on elastic GPUs."""

__version__ = "0.1.0"
