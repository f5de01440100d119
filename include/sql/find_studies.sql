{%- from "_macros.sql" import age_years -%}
-- Archives with at least one image matching every given filter; a NULL parameter means no filter.
-- Parameters: @modality, @body_part, @sex (case-insensitive), @date_from, @date_to (StudyDate,
-- inclusive), @age_min, @age_max (completed years, inclusive).
-- Every parameter is CAST: a NULL arrives typed STRING, and the BigQuery emulator does not
-- coerce a STRING parameter to DATE by itself.
WITH images AS (
  SELECT
    storage_uri,
    entity_id,
    item_id,
    StudyDate,
    Modality,
    BodyPartExamined,
    PatientSex,
    {{ age_years('PatientAge') }} AS age
  FROM `{{ project }}.{{ dataset }}.{{ table }}`
)
SELECT
  storage_uri,
  entity_id,
  item_id,
  StudyDate,
  COUNT(*) AS matching_images,
  STRING_AGG(DISTINCT Modality, ',' ORDER BY Modality) AS modalities
FROM images
WHERE (@modality IS NULL OR UPPER(Modality) = UPPER(CAST(@modality AS STRING)))
  AND (@body_part IS NULL OR UPPER(BodyPartExamined) = UPPER(CAST(@body_part AS STRING)))
  AND (@sex IS NULL OR UPPER(PatientSex) = UPPER(CAST(@sex AS STRING)))
  AND (@date_from IS NULL OR StudyDate >= CAST(@date_from AS DATE))
  AND (@date_to IS NULL OR StudyDate <= CAST(@date_to AS DATE))
  AND (@age_min IS NULL OR age >= CAST(@age_min AS FLOAT64))
  AND (@age_max IS NULL OR age <= CAST(@age_max AS FLOAT64))
GROUP BY storage_uri, entity_id, item_id, StudyDate
ORDER BY StudyDate NULLS LAST, storage_uri
