-- Withdrawals of the collection, by scope (a whole patient or one study) and reason code:
-- requests, archives and rows deleted, first and last completion. From the `withdrawals` log
-- that the dicom_withdraw DAG writes (one row per completed request; coded ids, no PHI).
SELECT
  IF(item_id IS NULL, 'entity', 'study') AS scope,
  reason,
  COUNT(*) AS requests,
  SUM(objects_deleted) AS objects_deleted,
  SUM(rows_deleted) AS rows_deleted,
  MIN(completed_at) AS first_completed_at,
  MAX(completed_at) AS last_completed_at
FROM `{{ project }}.{{ dataset }}.withdrawals`
GROUP BY scope, reason
ORDER BY scope, reason
