-- Rows, patients and archives per collection, without withdrawn patients and studies: rows a
-- withdrawal has not removed yet (one in progress) are not counted.
SELECT
  T.collection,
  COUNT(*) AS row_count,
  COUNT(DISTINCT T.entity_id) AS entities,
  COUNT(DISTINCT T.storage_uri) AS archives
FROM `{{ project }}.{{ dataset }}.{{ table }}` AS T
WHERE NOT EXISTS (
  SELECT 1
  FROM `{{ project }}.{{ dataset }}.withdrawals` AS W
  WHERE W.entity_id = T.entity_id
    AND (W.item_id IS NULL OR W.item_id = T.item_id)
)
GROUP BY T.collection
ORDER BY T.collection
