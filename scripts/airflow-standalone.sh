#!/usr/bin/env bash
# `make airflow`: the Airflow UI on http://127.0.0.1:${AIRFLOW_PORT:-8080} (login admin / admin),
# with the emulators and the demo landing zone. Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
. scripts/airflow-env.sh
port=${AIRFLOW_PORT:-8080}
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT=$port
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$port/execution/
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=admin:admin
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=$AIRFLOW_HOME/simple_auth_passwords.json
printf '{"admin": "%s"}\n' "${AIRFLOW_ADMIN_PASSWORD:-admin}" > "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
python -m tools.demo --prepare-only
echo "Airflow UI: http://127.0.0.1:$port  (login admin / ${AIRFLOW_ADMIN_PASSWORD:-admin})"
echo "Trigger dicom_storage with {\"batch_ids\": [...]} or unpause it; Ctrl-C stops everything."
exec airflow standalone
