"""Airflow assets for what the pipeline writes, so downstream DAGs can be scheduled on them.

The bucket prefix and the table depend on the collection of each batch, known only at run time:
each operator declares an asset alias as its outlet and adds the concrete asset
(`gs://<bucket>/Collection/<collection>`, `bigquery://<project>/<collection>/dicom`) when it
writes. Schedule on an alias to hear of every collection, or on one asset for one collection.
Names and extras carry buckets, collections, batch ids and counts: never a patient id.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetAlias

ARCHIVES_ALIAS = AssetAlias("dicom_storage_archives")
TABLES_ALIAS = AssetAlias("dicom_storage_tables")


def archive_prefix_asset(bucket: str, collection: str) -> Asset:
    return Asset(uri=f"gs://{bucket}/Collection/{collection}")


def table_asset(project: str, dataset: str, table: str) -> Asset:
    return Asset(uri=f"bigquery://{project}/{dataset}/{table}")
