# Airflow 3.3 with the RubberBand provider: the image of the scheduler, dag-processor,
# triggerer, api-server and workers in compose.yaml. Build from the repository root:
#   docker build -f docker/airflow.Dockerfile -t rubberband-airflow .
FROM apache/airflow:3.3.2-python3.11
COPY --chown=airflow:root . /opt/rubberband-airflow
# The `airflow` extra is the provider side (apache-airflow, the amazon provider); no torch here.
RUN pip install --no-cache-dir "apache-airflow==3.3.2" "/opt/rubberband-airflow[airflow]"
