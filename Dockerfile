# The Airflow image used by docker-compose.yaml: the official Airflow image with this project's
# pinned requirements installed on top (instead of _PIP_ADDITIONAL_REQUIREMENTS, which would
# reinstall them at every container start). Built by `docker compose build`.
#
# requirements.txt is the fully pinned set a deployment installs, the same pins as the local venv
# (the test tools are in requirements-dev.txt, not here). Pinning apache-airflow to the image's own
# AIRFLOW_VERSION makes the build fail, rather than silently change Airflow, if the two disagree.
ARG AIRFLOW_BASE_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_BASE_IMAGE}

COPY requirements.txt /requirements.txt
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /requirements.txt
