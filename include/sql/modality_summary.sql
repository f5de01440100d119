-- Per modality: images, studies (archives), patients.
SELECT
  Modality,
  COUNT(*) AS images,
  COUNT(DISTINCT storage_uri) AS studies,
  COUNT(DISTINCT entity_id) AS patients
FROM `{{ project }}.{{ dataset }}.{{ table }}`
GROUP BY Modality
ORDER BY images DESC, Modality NULLS LAST
