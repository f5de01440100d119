"""Domain logic of the DICOM storage pipeline, free of Airflow.

Manifest parsing, the de-identification check, grouping into studies, deterministic streamed
archives, header-to-row extraction and object naming. Operators and hooks wire this to Airflow;
everything here can be used and tested with plain Python and the Google client libraries.
"""

PIPELINE_VERSION = "0.1.0"
