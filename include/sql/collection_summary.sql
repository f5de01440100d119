-- Per table of the collection's dataset: rows, bytes, last change (the old __TABLES_SUMMARY__).
-- __TABLES__ answers in standard SQL on BigQuery and on the emulator; INFORMATION_SCHEMA.TABLES
-- has no row counts on BigQuery.
SELECT
  table_id AS table_name,
  row_count,
  size_bytes,
  TIMESTAMP_MILLIS(last_modified_time) AS last_modified
FROM `{{ project }}.{{ dataset }}.__TABLES__`
ORDER BY table_name
