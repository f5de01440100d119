-- Per landing batch and upload agent: images, archives, first and last upload.
SELECT
  batch_id,
  upload_agent,
  COUNT(*) AS images,
  COUNT(DISTINCT storage_uri) AS archives,
  MIN(uploaded_at) AS first_uploaded_at,
  MAX(uploaded_at) AS last_uploaded_at
FROM `{{ project }}.{{ dataset }}.{{ table }}`
GROUP BY batch_id, upload_agent
ORDER BY first_uploaded_at, batch_id, upload_agent NULLS LAST
