-- Per coded patient: studies (archives), images, first and last study date, modalities.
SELECT
  entity_id,
  COUNT(DISTINCT storage_uri) AS studies,
  COUNT(*) AS images,
  MIN(StudyDate) AS first_study_date,
  MAX(StudyDate) AS last_study_date,
  STRING_AGG(DISTINCT Modality, ',' ORDER BY Modality) AS modalities
FROM `{{ project }}.{{ dataset }}.{{ table }}`
GROUP BY entity_id
ORDER BY entity_id
