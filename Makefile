# The README's commands. Every target that needs the environment runs setup first;
# setup is idempotent and takes seconds when nothing changed.
SHELL := /bin/bash
ENV := source scripts/airflow-env.sh &&
PY := .venv/bin/python

.PHONY: setup test lint emulators emulators-stop emulators-status demo airflow airflow-stop distributed distributed-stop bench phi-audit clean

setup:
	@bash scripts/setup.sh

test: setup
	@$(ENV) $(PY) -m ruff check .
	@$(ENV) $(PY) -m pytest

lint: setup
	@$(PY) -m ruff check .
	@$(PY) -m ruff format --check .

emulators: setup
	@$(ENV) $(PY) -m tools.emulators start

emulators-stop:
	@if [ -x $(PY) ]; then $(PY) -m tools.emulators stop; fi

emulators-status:
	@if [ -x $(PY) ]; then $(PY) -m tools.emulators status; else printf 'gcs: not running\nbigquery: not running\n'; fi

airflow-stop:
	@if [ -x $(PY) ]; then $(ENV) $(PY) -m tools.emulators airflow-stop; fi

demo: setup emulators
	@$(ENV) $(PY) -m tools.demo

airflow: setup emulators
	@$(ENV) bash scripts/airflow-standalone.sh

# A distributed Airflow without containers (tools/distributed.py): PostgreSQL, Redis, the emulators,
# scheduler, dag-processor, api-server and two Celery workers with no shared disk; runs the demo's
# batches, then prints the UI address. PostgreSQL and Redis come from Debian packages (apt-get).
distributed: setup
	@$(PY) -m tools.distributed start

distributed-stop:
	@if [ -x $(PY) ]; then $(PY) -m tools.distributed stop; fi

# The PHI leak audit of the demo's outputs (see tools/phi_audit.py to point it at your own).
phi-audit: setup
	@$(ENV) $(PY) -m tools.phi_audit --raw .demo/raw_identifiers.json --outputs "gs://$$GOOGLE_CLOUD_STORAGE" \
		--reports "$$DICOM_LANDING_ROOT" --bigquery "$$GOOGLE_PROJECT_NAME.$$GOOGLE_STORAGE_COLLECTION.dicom"

bench: setup
	@$(ENV) $(PY) -m bench.run

clean: airflow-stop distributed-stop emulators-stop
	rm -rf .run .airflow .demo .bench
