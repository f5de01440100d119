"""Connect arguments for a local Airflow on SQLite (AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS).

`airflow standalone` runs a scheduler, a dag-processor, a triggerer and an api-server on one
SQLite file; a CLI command such as `airflow backfill create` then competes with them for the write
lock. SQLite's default wait of 5 s is not always enough on a 2-core machine: wait up to 60 s.
"""

CONNECT_ARGS = {"timeout": 60}
