{%- from "_macros.sql" import age_years -%}
-- Age bands (completed years at the study, from PatientAge) by PatientSex.
WITH images AS (
  SELECT
    entity_id,
    storage_uri,
    COALESCE(NULLIF(UPPER(TRIM(PatientSex)), ''), 'unknown') AS sex,
    {{ age_years('PatientAge') }} AS age
  FROM `{{ project }}.{{ dataset }}.{{ table }}`
)
SELECT
  CASE
    WHEN age IS NULL THEN 'unknown'
    WHEN age < 18 THEN '00-17'
    WHEN age < 40 THEN '18-39'
    WHEN age < 65 THEN '40-64'
    ELSE '65+'
  END AS age_band,
  sex AS PatientSex,
  COUNT(DISTINCT entity_id) AS patients,
  COUNT(DISTINCT storage_uri) AS studies,
  COUNT(*) AS images
FROM images
GROUP BY age_band, PatientSex
ORDER BY age_band, PatientSex
