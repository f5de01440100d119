{#- Shared SQL expressions; imported by the summary templates, not run on its own. -#}

{#- Completed years of a DICOM AS value ('045Y', '006M', '012W', '030D'); NULL when malformed. -#}
{%- macro age_years(column) -%}
CASE
    WHEN REGEXP_CONTAINS(UPPER(TRIM({{ column }})), r'^[0-9]{3}[DWMY]$') THEN
      CAST(FLOOR(
        CAST(SUBSTR(TRIM({{ column }}), 1, 3) AS INT64)
        / CASE UPPER(SUBSTR(TRIM({{ column }}), 4, 1))
            WHEN 'Y' THEN 1
            WHEN 'M' THEN 12
            WHEN 'W' THEN 365.25 / 7
            ELSE 365.25
          END
      ) AS INT64)
  END
{%- endmacro -%}
