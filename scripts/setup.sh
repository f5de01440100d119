#!/usr/bin/env bash
# One-command, idempotent setup: the project venv, the two emulator venvs, and a local
# AIRFLOW_HOME. Each step is skipped when its stamp matches its inputs, so a second run
# takes seconds. Nothing here relies on anything installed by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY311=${PYTHON:-python3.11}
command -v "$PY311" >/dev/null || PY311=python3
STAMPS=.run/stamps
mkdir -p "$STAMPS"

log() { printf '[setup] %s\n' "$*"; }

stamp_ok() {  # stamp_ok NAME CONTENT -> 0 when the stamp holds CONTENT
  [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]
}

# uv when it is on PATH; otherwise pip installs uv into a small bootstrap venv (pip is
# four times slower than uv on this dependency tree).
UV=$(command -v uv || true)
if [ -z "$UV" ]; then
  if [ ! -x .run/bootstrap/bin/uv ]; then
    log "installing uv into .run/bootstrap with pip"
    "$PY311" -m venv .run/bootstrap
    .run/bootstrap/bin/pip install --quiet uv==0.13.8
  fi
  UV=$ROOT/.run/bootstrap/bin/uv
fi

# --- project venv ------------------------------------------------------------------------
# requirements.txt: what a deployment installs; requirements-dev.txt: the test and lint tools,
# locked against it (the same version of every package both need).
req_hash=$(sha256sum requirements.txt | cut -c1-16)
venv_hash=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || ! stamp_ok venv "$venv_hash"; then
  log "installing requirements.txt and requirements-dev.txt into .venv"
  [ -x .venv/bin/python ] || "$PY311" -m venv .venv
  "$UV" pip install --quiet --python .venv/bin/python -r requirements.txt -r requirements-dev.txt
  echo "$venv_hash" > "$STAMPS/venv"
fi

# --- Cloud Storage emulator (own venv: its pins must not touch the project's) --------------
GCS_PKG="gcp-storage-emulator==2026.7.19"
if [ ! -x .emulators/gcs/bin/gcp-storage-emulator ] || ! stamp_ok gcs "$GCS_PKG"; then
  log "installing $GCS_PKG into .emulators/gcs"
  "$PY311" -m venv .emulators/gcs
  "$UV" pip install --quiet --python .emulators/gcs/bin/python "$GCS_PKG"
  echo "$GCS_PKG" > "$STAMPS/gcs"
fi

# --- BigQuery emulator ---------------------------------------------------------------------
# local-bigquery needs Python 3.13; DuckDB is pinned and its extensions come from PyPI
# packages, because the emulator would otherwise download them at start (offline here).
find_py313() {
  if command -v python3.13 >/dev/null && python3.13 -c 'import sys' 2>/dev/null; then
    command -v python3.13; return
  fi
  if command -v pyenv >/dev/null; then
    for d in "$(pyenv root)"/versions/3.13*/bin; do
      [ -x "$d/python3.13" ] && { echo "$d/python3.13"; return; }
    done
  fi
}
PY313=$(find_py313 || true)
DUCK="duckdb==1.5.5 duckdb-extensions==1.5.5"
if [ -n "$PY313" ]; then
  BQ_PKGS="local-bigquery==0.3.2 $DUCK duckdb-extension-ducklake==1.5.5 duckdb-extension-icu==1.5.5 duckdb-extension-spatial==1.5.5"
  BQ_EXTS="ducklake icu spatial"
  BQ_KIND=local-bigquery
  BQ_PY=$PY313
else
  BQ_PKGS="bqemulator==1.4.0 $DUCK duckdb-extension-spatial==1.5.5 numpy"
  BQ_EXTS="spatial"
  BQ_KIND=bqemulator
  BQ_PY=$PY311
fi
if [ ! -x .emulators/bq/bin/python ] || ! stamp_ok bq "$BQ_KIND $BQ_PKGS"; then
  log "installing $BQ_KIND into .emulators/bq ($BQ_PY)"
  rm -rf .emulators/bq .emulators/bq-home
  "$BQ_PY" -m venv .emulators/bq
  # shellcheck disable=SC2086
  "$UV" pip install --quiet --python .emulators/bq/bin/python $BQ_PKGS
  mkdir -p .emulators/bq-home
  for ext in $BQ_EXTS; do
    HOME=$ROOT/.emulators/bq-home .emulators/bq/bin/python -c \
      "from duckdb_extensions import import_extension as i; i('$ext')"
  done
  echo "$BQ_KIND" > .emulators/bq-kind
  echo "$BQ_KIND $BQ_PKGS" > "$STAMPS/bq"
fi

# --- local Airflow home ------------------------------------------------------------------
# shellcheck source=/dev/null
. scripts/airflow-env.sh
if [ ! -f "$AIRFLOW_HOME/airflow.db" ] || ! stamp_ok airflow "$req_hash"; then
  log "migrating the Airflow metadata database in $AIRFLOW_HOME"
  mkdir -p "$AIRFLOW_HOME"
  .venv/bin/airflow db migrate >/dev/null
  # The DAG's pools bound Cloud Storage and BigQuery concurrency.
  .venv/bin/airflow pools set dicom_storage_gcs 4 "Concurrent archive uploads" >/dev/null
  .venv/bin/airflow pools set dicom_storage_bigquery 2 "Concurrent BigQuery loads" >/dev/null
  echo "$req_hash" > "$STAMPS/airflow"
fi
# --- headless Chromium for the browser test (tests/test_browser_ui.py) ------------------------
# Debian's chromium and chromium-driver (a browser download by Playwright cannot work offline).
# Quick when they are there; installing needs root (apt-get) and takes a minute or two once.
install_chromium() {
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "chromium/chromedriver missing and apt-get is not usable here: the browser test will fail"
    return
  fi
  log "installing chromium and chromium-driver (Debian packages) for the browser test"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
}
install_chromium

log "ready (.venv, .emulators/gcs, .emulators/bq [$(cat .emulators/bq-kind)], $AIRFLOW_HOME)"
