"""The "DICOM batches" view in the Airflow UI, labels and outcomes of dicom_storage runs.

Every module here is light at import time: Airflow imports each file under plugins/ when it
loads plugins (the DAG processor does, to serialize DAGs), so nothing heavy runs at the top
level; the web app is built only when the API server asks for it.
"""
