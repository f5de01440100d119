#!/usr/bin/env bash
# `make airflow`: the Airflow UI on http://127.0.0.1:${AIRFLOW_PORT:-8080} (login admin / admin),
# with the emulators and the demo landing zone. Stop it with Ctrl-C, or `make airflow-stop` /
# `make clean` from another shell.
#
# Ports (all on 127.0.0.1): AIRFLOW_PORT (API server and UI, 8080). The scheduler and the
# triggerer open no log server (see scripts/standalone-bin/airflow); if you bypass that, their
# ports are AIRFLOW_WORKER_LOG_PORT (8793) and AIRFLOW_TRIGGER_LOG_PORT (8794).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
. scripts/airflow-env.sh
port=${AIRFLOW_PORT:-8080}
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT=$port
export AIRFLOW__API__WORKERS=${AIRFLOW__API__WORKERS:-1}
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$port/execution/
export AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=${AIRFLOW_WORKER_LOG_PORT:-8793}
export AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=${AIRFLOW_TRIGGER_LOG_PORT:-8794}
# LocalExecutor starts `parallelism` worker processes (Airflow's default, 32, is about 2 GiB):
# two per core, at least 4, is plenty for this DAG.
cores=$(nproc 2>/dev/null || echo 2)
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-$((cores * 2 > 4 ? cores * 2 : 4))}
# dicom_storage starts unpaused here, so a run triggered from the UI or the REST API runs at once.
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-False}
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=$AIRFLOW_HOME/simple_auth_passwords.json
mkdir -p "$AIRFLOW_HOME"
printf '{"admin": "%s"}\n' "${AIRFLOW_ADMIN_PASSWORD:-admin}" > "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
if [ ! -f "$AIRFLOW_HOME/airflow.db" ]; then  # a fresh AIRFLOW_HOME: the database and the pools named below
  airflow db migrate >/dev/null
  airflow pools set "$DICOM_GCS_POOL" 4 "Concurrent archive uploads" >/dev/null
  airflow pools set "$DICOM_BIGQUERY_POOL" 2 "Concurrent BigQuery loads" >/dev/null
fi
# The setting above applies only to a DAG seen for the first time: one already in the database
# (`make demo`'s `airflow dags test` creates them paused) keeps its state unless unpaused here, before
# the scheduler starts (a CLI write while standalone runs can lose SQLite's lock). Both DAGs, as on a
# fresh AIRFLOW_HOME. A DAG not in the database yet is not an error ("No paused DAGs were found").
case ${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION,,} in
  false | 0) airflow dags unpause --treat-dag-id-as-regex --yes '^dicom_(storage|withdraw)$' >/dev/null ;;
esac
# The demo landing zone, unless the configured one already holds batches.
[ -n "$(ls -A "$DICOM_LANDING_ROOT" 2>/dev/null)" ] || python -m tools.demo --prepare-only
export AIRFLOW_REAL_BIN
AIRFLOW_REAL_BIN=$(command -v airflow)
export PATH=$PWD/scripts/standalone-bin:$PATH
echo "Airflow UI: http://127.0.0.1:$port  (login admin / ${AIRFLOW_ADMIN_PASSWORD:-admin}); batches: http://127.0.0.1:$port/plugin/dicom-batches"
echo "Trigger dicom_storage with {\"batch_ids\": [...]}; Ctrl-C (or make airflow-stop) stops everything."
echo $$ > "$AIRFLOW_HOME/standalone.pid"  # this process becomes airflow standalone
exec "$AIRFLOW_REAL_BIN" standalone
