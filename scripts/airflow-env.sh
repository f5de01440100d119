# Sourced by the Makefile targets and scripts: the environment of a local run.
# Everything is overridable from the caller's environment.
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export AIRFLOW_HOME=${AIRFLOW_HOME:-$_root/.airflow}
export AIRFLOW__CORE__DAGS_FOLDER=${AIRFLOW__CORE__DAGS_FOLDER:-$_root/dags}
export AIRFLOW__CORE__PLUGINS_FOLDER=${AIRFLOW__CORE__PLUGINS_FOLDER:-$_root/plugins}
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__UNIT_TEST_MODE=${AIRFLOW__CORE__UNIT_TEST_MODE:-False}
export PATH=$_root/.venv/bin:$PATH
# plugins/ too, as Airflow puts it on sys.path: `python -c "from dicom_archive.sql_templates import ..."` works.
export PYTHONPATH=$_root:$_root/plugins${PYTHONPATH:+:$PYTHONPATH}
# Several local components share one SQLite file: let a writer wait for the lock (tools/airflow_sqlite.py).
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS=${AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS:-tools.airflow_sqlite.CONNECT_ARGS}

# The local emulators. Product code never looks at these: the Google clients do.
export GCS_EMULATOR_PORT=${GCS_EMULATOR_PORT:-9023}
export BQ_EMULATOR_PORT=${BQ_EMULATOR_PORT:-9050}
export STORAGE_EMULATOR_HOST=${STORAGE_EMULATOR_HOST:-http://127.0.0.1:$GCS_EMULATOR_PORT}
export BIGQUERY_EMULATOR_HOST=${BIGQUERY_EMULATOR_HOST:-http://127.0.0.1:$BQ_EMULATOR_PORT}

# Settings of the outputs spec, for the local demo.
export GOOGLE_PROJECT_NAME=${GOOGLE_PROJECT_NAME:-local-project}
export GOOGLE_CLOUD_STORAGE=${GOOGLE_CLOUD_STORAGE:-radiology}
export GOOGLE_STORAGE_COLLECTION=${GOOGLE_STORAGE_COLLECTION:-IRB41449}
export DICOM_LANDING_ROOT=${DICOM_LANDING_ROOT:-$_root/.demo/landing}
export DICOM_LOCAL_OUTPUT=${DICOM_LOCAL_OUTPUT:-$_root/.demo/output}
export SEND_TO_GOOGLE=${SEND_TO_GOOGLE:-true}
# The pools scripts/setup.sh creates (unset, the DAG uses default_pool), and extra links that open
# the "DICOM batches" view: the Cloud console cannot show the emulators.
export DICOM_GCS_POOL=${DICOM_GCS_POOL:-dicom_storage_gcs}
export DICOM_BIGQUERY_POOL=${DICOM_BIGQUERY_POOL:-dicom_storage_bigquery}
export DICOM_LINKS_TO=${DICOM_LINKS_TO:-batches-view}

# An anonymous google_cloud_default connection: the provider hooks then build anonymous
# clients, which the emulator hosts above redirect to loopback.
export AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT=${AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT:-"{\"conn_type\": \"google_cloud_platform\", \"extra\": {\"is_anonymous\": true, \"project\": \"$GOOGLE_PROJECT_NAME\"}}"}
unset _root
