-- One row per archive (study): where it is, whose, when, how many images and series.
-- A series is told apart by its SeriesInstanceUID, or by its SeriesNumber where the UID is blank;
-- images with neither make one series.
SELECT
  storage_uri,
  entity_id,
  item_id,
  StudyDate,
  COUNT(*) AS images,
  COUNT(DISTINCT COALESCE(SeriesInstanceUID, CONCAT('number:', CAST(SeriesNumber AS STRING)), 'none')) AS series,
  STRING_AGG(DISTINCT Modality, ',' ORDER BY Modality) AS modalities
FROM `{{ project }}.{{ dataset }}.{{ table }}`
GROUP BY storage_uri, entity_id, item_id, StudyDate
ORDER BY entity_id, StudyDate NULLS LAST, storage_uri
