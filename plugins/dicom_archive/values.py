"""Header element values as rows hold them: JSON values for `DicomHeader`, text for STRING columns."""

from __future__ import annotations

from typing import Any

from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import IS, DSdecimal, DSfloat, PersonName


def dicom_value_to_json(value: Any) -> Any:
    """A JSON value for a header element's value; None for what must not or cannot go in."""
    if isinstance(value, bytes | bytearray | Sequence):
        return None
    if isinstance(value, MultiValue | list | tuple):
        items = [dicom_value_to_json(v) for v in value]
        return [v for v in items if v is not None] or None
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, DSfloat | DSdecimal | float):
        return float(value)
    if isinstance(value, int | bool):
        return value
    if isinstance(value, PersonName):
        return str(value) or None
    text = str(value).strip()
    return text or None


# DICOM's own value separator (PS3.5 6.4): a multi-valued text element is written joined by it.
VALUE_SEPARATOR = "\\"


def dicom_value_to_text(value: Any) -> str | None:
    """One string for a STRING column, as the header holds it: a multi-valued element (pydicom
    splits `CT\\CHEST` into two values) is joined again by `\\`, a number keeps its own spelling
    (`1.0` stays `1.0`); None for no value, binary data or a sequence. The NDJSON written locally
    and the rows loaded into BigQuery then carry the same string."""
    if value is None or isinstance(value, bytes | bytearray | Sequence):
        return None
    if isinstance(value, MultiValue | list | tuple):
        items = [dicom_value_to_text(v) for v in value]
        if all(item is None for item in items):
            return None
        return VALUE_SEPARATOR.join(item or "" for item in items)
    if isinstance(value, IS | DSfloat | DSdecimal):
        text = getattr(value, "original_string", None) or str(value)
    else:
        text = str(value)
    return text.strip() or None
